"""The activation × pool-mode × variant matrix (tests/matrix.py) on the host backends: numpy and the Numba-CPU
``cpu`` backend, in this process. The CUDA C kernels run the same matrix on the CPU harness in
tests/test_cupy_backend.py's child (``test_act_pool_matrix``), the Numba CUDA kernels in the simulator in
tests/test_numba_backend.py's child (``test_sim_act_pool_matrix``); the fused CUDA C ops head_train and lenet_fwd
in tests/test_fused.py (``test_host_head_train_acts_lenet``, ``test_host_lenet_fwd_acts``).

No case is skipped, for time or otherwise: each parametrized op runs every cell."""

from __future__ import annotations

import pytest

from lenet_gpu.backends.cpu_backend import VARIANTS as CPU_VARIANTS
from lenet_gpu.backends.numpy_backend import NumpyBackend
from tests.matrix import check_matrix, matrix_ops

_BE: dict[str, object] = {}


def _backend(name: str):
    if name not in _BE:
        from lenet_gpu.backends import get_backend

        _BE[name] = get_backend(name)
    return _BE[name]


@pytest.mark.parametrize("op", matrix_ops(dict(NumpyBackend(threads=1).variants)))
def test_numpy_act_pool_matrix(op):
    assert check_matrix(_backend("numpy"), op) > 0


@pytest.mark.parametrize("op", matrix_ops(CPU_VARIANTS))
def test_cpu_act_pool_matrix(op):
    assert check_matrix(_backend("cpu"), op) > 0


def test_matrix_ops_come_from_the_tables():
    """Every op that applies an activation or a pool is in the matrix of each backend that lists it."""
    act_pool = {"conv2d_fwd", "conv2d_pool_fwd", "pool2x2_fwd", "pool2x2_bwd", "dense_fwd", "dense_bwd",
                "conv2d_bwd_data_pool", "head_train", "lenet_fwd"}
    assert set(matrix_ops(CPU_VARIANTS)) >= act_pool
    assert set(matrix_ops({"conv2d_bwd_weight": ("v1",), "step_advance": ("v1",)})) == set()
    with pytest.raises(AssertionError, match="no parity builder"):
        check_matrix(type("B", (), {"variants": {"new_op": ("v1",)}})(), "new_op")
