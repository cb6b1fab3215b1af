"""The numba backend: every op of the protocol as Numba CUDA kernels (``@cuda.jit``), one module per
op family with the stems of the CUDA C files (batch, conv2d, pool2x2, dense, loss, optim); the
NumbaBackend class in backend.py; static compile checks in compile_report.py.

Kernels (``<op>_v<N>``, the same names as the CUDA C kernels; the default is the last of each op):

  batch_prepare      v1 one thread per output pixel
  conv2d_fwd         v1 one thread per output; v2 weights in shared memory + 8 filters per thread;
                     v3 v2 + the input rows in shared memory (default; steps down if shared is short)
  conv2d_pool_fwd    (the optional fused conv + 2×2 pooling: the model then makes 16 launches a step,
                     not 18) v1 one thread per window; v2 v3's shared tiling, 4 taps × 4 filters a thread
  conv2d_bwd_data    v1 one thread per dx (gather); v2 weights in shared + 8 channels per thread
  conv2d_bwd_weight  v1 one thread per weight; v2 one block per (k, 8 columns of c·r·s + bias),
                     fixed-order shared-memory tree reduction over batch × positions
  pool2x2_fwd/bwd    v1 one thread per output / per input-gradient element (act' fused in bwd)
  dense_fwd          v1 one thread per output; v2 16×16 shared-memory tiles
  dense_bwd          v1 one thread per dx/dw/db element; v2 tiled dx and [dw | db] in one launch
  softmax_xent       v1 one block, fixed-order tree reduction of loss and correct count
  adam_step/sgd_step v1 one thread per parameter

Under ``NUMBA_ENABLE_CUDASIM=1`` (set before Numba is imported) everything runs in Numba's CUDA
simulator: slow, for tiny debugging runs and the CI parity tests.
"""

from .backend import DEFAULT_VARIANTS, KERNELS, SIGNATURES, VARIANTS, NumbaBackend

__all__ = ["DEFAULT_VARIANTS", "KERNELS", "SIGNATURES", "VARIANTS", "NumbaBackend"]
