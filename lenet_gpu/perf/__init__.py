"""The performance core of lenet_gpu, shared by the benchmark (``python -m bench.run``, its command line and
report) and the self-test's benchmark phase (``python -m lenet_gpu.selftest``), so that both time and
validate the same way, and the self-test can run installed, where bench/ is absent:

- ``timing``: the timers (CPU perf_counter / process_time, CUDA events with an L2 flush), statistics and
  spreads, the machine-load monitor, the CPU's FP32 peak estimate;
- ``peer``: the same LeNet-5 in PyTorch, eager, torch.compile, and the whole step as one CUDA graph;
- ``ops``: each op's cost (FLOPs, bytes) and its benchmark cases at LeNet's shapes, validated against
  the float64 reference before they are timed;
- ``model``: end-to-end forward and training-step validation and interleaved timing, epochs, counters.
"""

from .model import peer_epochs

__all__ = ["peer_epochs"]
