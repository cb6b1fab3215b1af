"""Benchmarks of lenet_gpu: per-op kernels and the whole network, against PyTorch as the peer.

One command runs everything and writes JSON, a markdown report and PNG plots::

    python -m bench.run            # full run, every backend that can run here
    python -m bench.run --quick    # a few minutes

It fails loudly: a case that crashes or fails its validation is a failure (listed in results.json's
``errors``, named at the top of report.md, exit status 1); a skip is only ever for a reason that is not an
error (a backend that cannot run here, no PyTorch, a case over the time budget, an op with no case).

The performance core lives in the package, ``lenet_gpu.perf``, so that the self-test's benchmark phase
(``python -m lenet_gpu.selftest``) uses the same timers, peer and cases where bench/ is absent:

- ``lenet_gpu.perf.timing``: CPU and GPU (device events, L2 flush) timers, statistics and spreads, the
  machine-load monitor, the CPU's FP32 peak estimate;
- ``lenet_gpu.perf.ops``: one cost function per op (FLOPs and bytes) and the op cases at LeNet shapes,
  each validated against lenet_gpu.reference before it is timed;
- ``lenet_gpu.perf.model``: end-to-end validation (against a reference computed afresh from each backend's
  own parameters) and interleaved timing, epochs, time to accuracy, counters;
- ``lenet_gpu.perf.peer``: the same LeNet-5 in PyTorch: eager, torch.compile, and the whole training step
  as one CUDA graph.

bench/ is the command line and the report over it: ``bench.run`` (the command line), ``bench.report``
(JSON, markdown, PNG), ``bench.kernels`` (the static compile table; scripts/kernel_report.py is its
command line), ``bench.launches`` (the launch fill table), ``bench.host`` (host overhead per step),
``bench.peer_recipe`` (PyTorch's plain recipe) and ``bench.cpu_peak``.
"""
