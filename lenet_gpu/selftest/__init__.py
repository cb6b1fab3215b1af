"""``python -m lenet_gpu.selftest``: one command that proves and times both GPU backends on a real GPU.

Phases (each in a process of its own, with a time budget; results.json and report.md are rewritten after
every phase, so a kill at any moment keeps every finished phase):

1. environment: the GPU, its driver and runtime, the versions of CuPy, Numba, numba-cuda, PyTorch;
2. compile: every kernels/*.cu module with the cupy backend's options and every Numba kernel at its launch
   signature, compiled and loaded for the device's architecture;
3. op parity: every op × variant × activation × pool mode of each backend against the float64 reference,
   outputs poisoned with NaN, at LeNet-5's sizes, batch 1 and an odd batch, and odd shapes;
4. whole steps: training steps against the numpy backend, CUDA-graph replay against eager launches bit for
   bit, two runs bit for bit, and the launches/allocations/copies/syncs of a step;
5. training: the default recipe on mnist-sample with each backend (and the --data-dir dataset): time to
   97 % and 98 % test accuracy, final accuracy, images/s;
6. benchmark: per-op CUDA-event timings, training and inference images/s over batch sizes, against PyTorch
   (cuDNN eager and torch.compile) when it is installed;
7. summary: PASS or FAIL per phase, the first lines of every failure.

``--emulate`` runs the same phases with no GPU on cupy-host and the Numba simulator at tiny sizes (CI).
"""

from .runner import main

__all__ = ["main"]
