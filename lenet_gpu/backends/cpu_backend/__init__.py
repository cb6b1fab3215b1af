"""The cpu backend: every op of the protocol as Numba @njit kernels on the CPU, one module per op family
with the stems of the GPU kernels (batch, conv2d, pool2x2, dense, head, loss, optim, lenet_fwd, routed); the
CpuBackend class in backend.py; the lane layout, stack tiles and activations in common.py.

Kernels (``<op>_v<N>``, the names of the GPU kernels; "auto" picks lanes or rows by the map's width):

  batch_prepare_v1         one image per iteration; the augmentation hash of reference.augment_shift
  conv2d_fwd_v1, conv2d_bwd_data_v1, conv2d_bwd_weight_v1, pool2x2_*_v1, dense_*_v1, softmax_xent_v1
                           simple loops, the innermost along a contiguous row (the unfused baseline)
  conv2d_bwd_weight_v2/v3  lanes / rows: KB filters × 5 taps of accumulators in registers
  conv2d_pool_fwd_v1/v2    lanes / rows: conv + bias + act + 2×2 pool, a window × KB filters in registers
  conv2d_bwd_data_pool_v1  rows: the data gradient in register blocks, routed through the pool's argmax
  head_train_v1            lanes: C5 → F6 → output → loss → backward in one op; weight gradients by rows
  lenet_fwd_v1             lanes: the whole forward pass of 16 images in one thread's workspace
  conv2d_bwd_weight_routed_v1/v2/v3, conv2d_bwd_data_routed_v1
                           the routed backward of max pooling (routed.py, docs/routed_backward.md): only the
                           taps the pool chose, a patch row a vector (v2: the dense rows kernel on dz rows
                           made from the routes; v3: a whole patch of a 1-channel input, 25 of 32 floats, from
                           a row stack: C1's weight gradient, routed); with head_train(yconv=None) and conv2d_pool_fwd
                           without yconv, the model's routed step
  step_fwd_v1, step_bwd_v1, step_adam_v1, step_sgd_v1
                           the four-kernel step of max pooling (step4.py, docs/step4.md): the routed step's
                           chunk functions fused into one parallel loop per op; the model's default step
  adam_step_v1, sgd_step_v1, step_advance_v1

Parallel over fixed chunks of 16 images (``prange``; the step's ops and lenet_fwd through the one parallel kernel of
launch.py); sums over the batch per chunk, then in chunk order:
results repeat bit for bit whatever the number of threads. Compiled with ``cache=True`` at LLVM -O2
(common.OPT_LEVEL: the speed of -O3 in two thirds of the compile time): the first run compiles, on two
cores when it can (warm.py: a helper process compiles part of the step into the cache), and later runs
load the machine code from Numba's cache.
"""

import os

# Numba's OpenMP threading layer reads this when it first loads. OpenMP's default lets idle threads spin,
# which on a machine with other busy processes (or PyTorch's own OpenMP pool in the same process) made
# both Numba and PyTorch about 10x slower (measured on 2 shared cores); passive threads sleep at once.
# Set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# before the first @njit function: 512-bit code on AVX-512 CPUs, Intel's included (target.py)
from . import target  # noqa: E402, F401, I001
from . import cachelock  # noqa: E402
from .backend import DEFAULT_VARIANTS, KERNELS, VARIANTS, CpuBackend  # noqa: E402

# one writer at a time in a function's cache entry, across processes (a first run compiles in two: warm.py)
cachelock.install()

__all__ = ["DEFAULT_VARIANTS", "KERNELS", "VARIANTS", "CpuBackend"]
