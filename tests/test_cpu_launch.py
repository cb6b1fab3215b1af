"""cpu_backend/launch.py: one parallel kernel (par_tasks) runs every op's tasks; an op's arguments reach its tasks
through a tuple on the op kernel's stack (stash / unstash), and a task is found in Numba's cache by another process."""

from __future__ import annotations

import json
import subprocess
import sys

import numba
import numpy as np
import pytest
from numba.core.errors import TypingError

from lenet_gpu.backends.cpu_backend import launch, native, step4
from lenet_gpu.backends.cpu_backend.common import JIT, njit

#: the task below: out[i] = i + Σ src, and the thread's id in ids[i]
_MADE: dict = {}


def _task(TT: str):
    if TT not in _MADE:

        @njit(**{**launch.JIT_TASK, "cache": False})
        def task(p, i, tid):
            out, ids, src, scale, a_task, a_par = launch.unstash(p, TT)
            acc = np.float32(0.0)
            for e in range(src.shape[0]):
                acc += src[e]
            out[i] = (np.float32(i) + acc) * scale
            ids[i] = tid

        _MADE[TT] = task
    return _MADE[TT]


@njit(**{**JIT, "cache": False})
def _op(out, ids, src, scale, a_task, a_par):
    args = (out, ids, src, scale, a_task, a_par)
    launch.run(a_par, a_task, launch.stash(args), out.shape[0])


TWO = np.float32(2.0)


def _call(out, ids, src, scale=TWO) -> None:
    tt = launch.task_type((out, ids, src, scale, 0, 0))
    a_task = native.address(_task(tt), launch.TASK_ARGS)
    _op(out, ids, src, scale, a_task, launch.par_address())


@pytest.mark.parametrize("threads", [1, 2])
def test_par_tasks_runs_every_task_once_with_the_ops_arguments(threads: int) -> None:
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        n = 37
        out = np.full(n, np.nan, np.float32)
        ids = np.full(n, -1, np.int64)
        src = np.arange(5, dtype=np.float32)
        _call(out, ids, src)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out, (np.arange(n, dtype=np.float32) + 10) * 2)
    assert ids.min() >= 0 and ids.max() < min(threads, numba.config.NUMBA_NUM_THREADS)


def test_a_read_only_array_reaches_the_task_as_the_same_type() -> None:
    """stash casts every array to launch.canonical (writable, C): a read-only input gives the task type a writable
    one does, so one task serves both."""
    src = np.arange(3, dtype=np.float32)
    ro = src.copy()
    ro.flags.writeable = False
    out, ids = np.zeros(4, np.float32), np.zeros(4, np.int64)
    assert launch.task_type((out, ids, src, np.float32(1), 0, 0)) == launch.task_type((out, ids, ro, np.float32(1),
                                                                                          0, 0))
    _call(out, ids, ro)
    np.testing.assert_array_equal(out, (np.arange(4, dtype=np.float32) + 3) * 2)


def test_a_non_contiguous_array_is_a_typing_error() -> None:
    out, ids = np.zeros(4, np.float32), np.zeros(4, np.int64)
    src = np.arange(6, dtype=np.float32)[::2]
    with pytest.raises(TypingError, match="non-contiguous"):
        _op(out, ids, src, np.float32(1), 0, 0)


_KEY = """
import hashlib, json, sys
import numpy as np
from numba import types
from numba.core.registry import cpu_target
for i in range(int(sys.argv[1])):  # Numba types made in another order: their pickles' numbers differ
    types.Array(types.float32, 1 + i % 3, "C"), types.UniTuple(types.int64, 2 + i)
from lenet_gpu.backends.cpu_backend import launch, step4
tt = launch.task_type((np.zeros((2, 3), np.float32), np.zeros(4, np.uint8), 0, np.float32(0), False))
task = step4.make_step_fwd_task(1, 1, tt)
key = task._cache._index_key(launch.TASK_ARGS, cpu_target.target_context.codegen())
print(json.dumps(hashlib.sha256(repr(key).encode()).hexdigest()))
"""


def test_a_task_has_the_same_cache_key_in_every_process() -> None:
    """The key under which Numba caches a task does not depend on the process: it closes over the name of its
    argument tuple's type, not the type (whose pickle holds a number that depends on the order the process made its
    types in; a first version's tasks were compiled again by every process, 0.5 s each)."""
    keys = set()
    for made_before in (0, 7):
        res = subprocess.run([sys.executable, "-c", _KEY, str(made_before)], capture_output=True, text=True,
                             check=True)
        keys.add(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len(keys) == 1


def test_the_step_kernels_are_serial_and_par_tasks_is_the_only_parallel_one() -> None:
    """step_fwd_v1, step_bwd_v1 and head_train_v1 compile without Numba's parfor passes: their loops run as tasks."""
    from lenet_gpu.backends.cpu_backend import head, lenet_fwd

    kernels = [step4.make_step_fwd_v1(1, 1, "abi"), step4.make_step_bwd_v1(*step4.bwd_blocks(), "abi"),
               head.make_head_train_v1(True, "abi"), lenet_fwd.make_lenet_fwd_v1(1, 1, "abi")]
    # "parallel" is set for a parallel kernel (Numba empties its dict of passes when it compiles, so only its presence
    # says anything)
    assert all("parallel" not in k.targetoptions for k in kernels)
    assert "parallel" in launch.par_tasks.targetoptions


def test_a_plan_whose_argument_types_differ_from_the_call_is_an_error() -> None:
    """check_args, at a plan's first call: the planner's view of the arguments must make the task's tuple type."""
    out, ids, src = np.zeros(4, np.float32), np.zeros(4, np.int64), np.zeros(3, np.float32)
    planned = launch.task_type((out, ids, src, np.float32(1), 0, 0))
    launch.check_args("op", planned, (out, ids, src, np.float32(2), 5, 7))  # other values, the same types
    with pytest.raises(RuntimeError, match="op: the task was planned for"):
        launch.check_args("op", planned, (out, ids, src, 1.0, 5, 7))  # a float64 where float32 was planned
    with pytest.raises(RuntimeError, match="op: the task was planned for"):
        launch.check_args("op", planned, (out, src, ids, np.float32(1), 5, 7))  # two arrays swapped
