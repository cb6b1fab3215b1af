"""cpu_backend/native.py: a parallel kernel calling a chunk function through the address of its compiled code (the
function compiles once, not into every module of the kernel). A call through an address gives what a direct call
gives; the overload is found by the argument types, never compiled by the kernel's typing; a call with no matching
compiled overload is a typing error, not a call to the wrong code. (That the kernels calling through addresses are
cached, and load in a later process: tests/test_cpu_warm.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

require("numba")

from numba import njit, prange, types  # noqa: E402
from numba.core.errors import TypingError  # noqa: E402

from lenet_gpu.backends.cpu_backend import native  # noqa: E402

F2, F1, I8 = types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C"), types.int64


@njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _row(a, out, i, scale, KB):
    """out[i] = scale · Σ_j a[i, j] + KB; returns (the sum, i)."""
    s = np.float32(0.0)
    for j in range(a.shape[1]):
        s += a[i, j]
    out[i] = s * scale + KB
    return s, i


_call_row = native.caller(_row)


def _kernel(kb):
    @njit(parallel=True)
    def kernel(addr, a, out, idx):
        for i in prange(a.shape[0]):
            s, k = _call_row(addr, (a, out, i, np.float32(2.0), kb))
            idx[i] = k
    return kernel


def _direct(kb):
    @njit(parallel=True)
    def kernel(a, out, idx):
        for i in prange(a.shape[0]):
            s, k = _row(a, out, i, np.float32(2.0), kb)
            idx[i] = k
    return kernel


def test_a_call_through_an_address_gives_the_direct_calls_result():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 11)).astype(np.float32)
    addr3 = native.address(_row, (F2, F1, I8, types.float32, types.literal(3)))
    addr5 = native.address(_row, (F2, F1, I8, types.float32, types.literal(5)))
    assert addr3 != addr5  # a literal block size is its own specialisation
    n_overloads = len(_row.overloads)
    got = {}
    for kb, addr in ((3, addr3), (5, addr5)):
        out, idx = np.zeros(37, np.float32), np.zeros(37, np.int64)
        _kernel(kb)(addr, a, out, idx)
        got[kb] = out, idx
    assert len(_row.overloads) == n_overloads  # the kernels' typing compiled nothing
    for kb, (out, idx) in got.items():
        want, want_idx = np.zeros(37, np.float32), np.zeros(37, np.int64)
        _direct(kb)(a, want, want_idx)
        assert out.tobytes() == want.tobytes()
        assert (idx == np.arange(37)).all() and (want_idx == idx).all()
        np.testing.assert_allclose(out, a.sum(axis=1, dtype=np.float64) * 2 + kb, rtol=1e-5, atol=1e-5)


def test_no_compiled_overload_is_a_typing_error():
    @njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
    def lonely(a, i):
        a[i] = 1.0

    call = native.caller(lonely)

    @njit
    def kernel(addr, a):
        call(addr, (a, 0))

    with pytest.raises(TypingError, match="0 compiled overloads match"):
        kernel(0, np.zeros(3, np.float32))
    assert not lonely.overloads


@pytest.mark.parametrize("given, declared, ok", [
    ((F2, I8), (F2, I8), True),
    ((F2, types.uint64), (F2, I8), True),  # a prange index
    ((F2, types.literal(3)), (F2, I8), True),
    ((F2, I8), (F2, types.literal(3)), False),  # a block size must be the same literal
    ((F2, types.literal(4)), (F2, types.literal(3)), False),
    ((types.Array(types.float32, 2, "A"), I8), (F2, I8), False),  # no strided array where C is compiled
    ((types.Array(types.float64, 2, "C"), I8), (F2, I8), False),
    ((F1, I8), (F2, I8), False),
    ((F2,), (F2, I8), False),
])
def test_matches(given, declared, ok):
    assert native.matches(given, declared) is ok



def test_the_callees_signatures_are_in_the_kernels_cache_key():
    """A kernel cached against other signatures of the functions it calls through addresses is not loaded: the
    signatures (native.Parts.abi) are in the kernel's closure, which Numba's cache key hashes."""
    from numba.core.registry import cpu_target

    from lenet_gpu.backends.cpu_backend import step4

    abi = step4.bwd_parts().abi
    assert "_bwd_weight_routed_chunk(" in abi and "-> none" in abi
    blocks = step4.bwd_blocks()
    a, b = step4.make_step_bwd_v1(*blocks, abi), step4.make_step_bwd_v1(*blocks, abi + " (edited)")
    codegen = cpu_target.target_context.codegen()
    sig = (types.int64,)
    assert a._cache._index_key(sig, codegen) != b._cache._index_key(sig, codegen)
    assert step4.make_step_bwd_v1(*blocks, abi) is a


def test_an_error_in_the_called_function_propagates():
    @njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
    def checked(a, i):
        if i >= a.shape[0]:
            raise IndexError("past the end")
        a[i] = 1.0

    call = native.caller(checked)

    @njit
    def kernel(addr, a, i):
        call(addr, (a, i))
        a[0] = 7.0

    a = np.zeros(3, np.float32)
    addr = native.address(checked, (F1, I8))
    kernel(addr, a, 2)
    assert a.tolist() == [7.0, 0.0, 1.0]
    with pytest.raises(IndexError, match="past the end"):
        kernel(addr, a, 3)


def test_parts_add_up_in_order():
    """step4's kernels call the chunk functions of several ops: Parts + Parts keeps each one's address and
    signature, in order."""
    a = native.Parts((_row, (F2, F1, I8, types.float32, types.literal(3))))
    b = native.Parts((_row, (F2, F1, I8, types.float32, types.literal(5))))
    ab = a + b
    assert ab.addresses == a.addresses + b.addresses and ab.abi == f"{a.abi}; {b.abi}"
    assert "Literal[int](3)" in ab.abi.split("; ")[0] and "Literal[int](5)" in ab.abi.split("; ")[1]
