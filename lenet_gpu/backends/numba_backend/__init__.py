"""The numba backend: every op of the protocol as Numba CUDA kernels (``@cuda.jit``), one module per
op family with the stems of the CUDA C files (batch, conv2d, pool2x2, dense, loss, optim); the
NumbaBackend class in backend.py; static compile checks in compile_report.py.

Kernels (``<op>_v<N>``, the same names as the CUDA C kernels; the default is the last of each op).
The faster variants take flat arrays and int32 sizes (every offset in int32: ≤ 64 registers on sm_90):

  batch_prepare      v1 one thread per output pixel; reads OFFSET/EPOCH/SEED/SHIFT from the step state
                     and draws the augmentation shift with the reference hash (masked uint32 arithmetic)
  conv2d_fwd         v1 one thread per output; v2 weights in shared memory + 8 filters per thread;
                     v3 v2 + the input rows in shared memory (default; steps down if shared is short)
  conv2d_pool_fwd    (optional fused conv + 2×2 pooling) v1 one thread per window; v2 v3's shared
                     tiling, 4 taps × 3 filters a thread
  conv2d_bwd_data    v1 one thread per dx (gather); v2 weights in shared + 8 channels per thread
  conv2d_bwd_data_pool (optional fused bwd_data + pool2x2_bwd + act') v1 one thread per output;
                     v2 one thread per pooled position × 8 channels, weights in shared, 4 taps written
  conv2d_bwd_weight  v1 one thread per weight; v2 one block per (k, 8 columns of c·r·s + bias),
                     fixed-order shared-memory tree reduction over batch × positions; v3 v2 split over
                     the batch (about a wave of blocks, sized from the SM count), fixed-order sum of the
                     splits by the last block (ticket tagged with the state's STEP)
  pool2x2_fwd/bwd    v1 one thread per output / per input-gradient element (act' fused in bwd)
  dense_fwd          v1 one thread per output; v2 16×16 shared-memory tiles
  dense_bwd          v1 one thread per dx/dw/db element; v2 tiled dx and [dw | db] in one launch
  softmax_xent       v1 one block, fixed-order tree reduction; writes stats[STEP_IN_EPOCH mod S]
  adam_step/sgd_step v1 one thread per parameter; lr and bias corrections from the schedule row
  step_advance       v1 one thread: the step state's counters

The four-kernel step's ops (docs/step4.md), the same kernels as the CUDA C ones:

  step_fwd           v1 a block per image: batch gather + C1/pool + C3/pool + the schedule row (step4_fwd.py)
  step_bwd           v1 a block per image group: C3 wgrad, C3 routed dgrad (gz1 in shared memory), C1 wgrad,
                     each output owned by one thread in a fixed order (step4_bwd.py)
  step_adam/step_sgd v1 the groups' partials summed in group order + the optimizer + step_advance (step4_fwd.py)

``record(fn)`` replays a step's launches as prepared cuLaunchKernel calls; ``graph(fn, steps)`` captures
steps of them as one CUDA graph (launch.py). A training step with max pooling is 5 launches (the four-kernel
step; head_train is two kernels), 10 as the nine-op routed step, 16 dense with both fused ops.

Under ``NUMBA_ENABLE_CUDASIM=1`` (set before Numba is imported) everything runs in Numba's CUDA
simulator: slow, for tiny debugging runs and the CI parity tests.
"""

from .backend import DEFAULT_VARIANTS, KERNELS, SIGNATURES, VARIANTS, NumbaBackend

__all__ = ["DEFAULT_VARIANTS", "KERNELS", "SIGNATURES", "VARIANTS", "NumbaBackend"]
