"""Benchmarks of lenet_gpu: per-op kernels and the whole network, against PyTorch as the peer.

One command runs everything and writes JSON, a markdown report and PNG plots::

    python -m bench.run            # full run, every backend that can run here
    python -m bench.run --quick    # a minute or two

pytest-benchmark entry points live beside it (``pytest bench --benchmark-only``); the project's test
suite (testpaths = ["tests"]) does not collect them. Modules:

- ``bench.ops``: one cost function per op (FLOPs and bytes, formula in its docstring) and the op
  cases at LeNet shapes, each validated against lenet_gpu.reference before it is timed;
- ``bench.timing``: CPU (perf_counter) and GPU (device events, L2 flush) timers, statistics, and the
  machine-load monitor;
- ``bench.model``: end-to-end forward / training-step throughput, epochs, time to accuracy, counters;
- ``bench.peer``: the same LeNet-5 in PyTorch;
- ``bench.kernels``: the static compile table (reports/kernels.json);
- ``bench.report``: JSON, markdown, PNG; ``bench.run``: the command line.
"""
