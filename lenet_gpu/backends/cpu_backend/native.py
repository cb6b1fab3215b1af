"""Calling a kernel's chunk function through its address, given at run time: the function compiles once.

Numba links every function a kernel calls into the kernel's own code. A parallel kernel (``prange``) is four
modules, each linking its loop body's callees again: the loop body (Numba's gufunc), two wrappers and the kernel;
LLVM optimises each module and generates its machine code, so a chunk function of a few hundred lines is optimised
and compiled to machine code five times (its own library and four copies). On the project's 2-core machine that was
about half of a first run's compile (bench/compile_times.py: the top-level kernels' own "excl" time).

``caller(fn)`` makes an intrinsic ``call(addr, (args...))`` that calls ``fn``'s compiled code at ``addr`` with
Numba's own calling convention: the kernel's modules hold a call through a pointer, not a copy. ``address(fn,
argtypes)`` compiles ``fn`` for exactly these argument types (or loads it from Numba's disk cache) and returns the
address of its code, which the kernel takes as an int64 argument. No address is ever compiled into a kernel, so the
kernel stays cacheable: a later process passes the address of its own copy of ``fn``. ``Parts`` does both for a
kernel's functions and names their signatures for the kernel's cache key.

The types must agree: the intrinsic types a call against ``fn``'s overloads already compiled (never compiling one
itself), and takes the one overload whose argument types the call's match (the same types, an integer for an
integer, a C-contiguous array where the overload takes one: ``matches``); none, or more than one, is a typing
error. So the caller compiles ``fn`` with ``address`` first, with the types that the kernel passes. An exception
raised in ``fn`` propagates as from a direct call. The call
cannot be inlined; what it calls is a whole chunk of work (thousands of vector FMAs), so the call costs nothing
measurable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic


def matches(given: Sequence[Any], declared: Sequence[Any]) -> bool:
    """Whether a call with argument types ``given`` may call an overload compiled for ``declared``."""
    if len(given) != len(declared):
        return False
    for a, b in zip(given, declared):
        if a == b:
            continue
        if isinstance(b, types.Literal):
            return False  # a literal (a block size) selects its own specialisation
        a = types.unliteral(a)
        if a == b:
            continue
        if isinstance(a, types.Integer) and isinstance(b, types.Integer):
            continue
        if isinstance(a, types.Array) and isinstance(b, types.Array) and a.dtype == b.dtype and a.ndim == b.ndim \
                and b.layout == "C" and a.layout == "C" and a.mutable == b.mutable:
            continue
        return False
    return True


def caller(fn: Any) -> Any:
    """An intrinsic ``call(addr, args)``: ``fn(*args)`` through the address ``addr`` (int64) of its compiled code
    for the overload that ``args`` match (see the module docstring); returns what ``fn`` returns."""

    @intrinsic
    def call(typingctx: Any, addr: Any, args: Any) -> Any:
        if not isinstance(addr, types.Integer) or not isinstance(args, types.BaseTuple):
            return None
        given = tuple(args)
        found = [cres.signature for sig, cres in fn.overloads.items() if matches(given, sig)]
        if len(found) != 1:
            have = "; ".join(str(s) for s in fn.overloads) or "none"
            raise TypingError(f"native call of {fn.py_func.__name__}{given}: {len(found)} compiled overloads match "
                              f"(compiled: {have}); compile it with native.address first")
        sig = found[0]
        return sig.return_type(addr, args), _codegen(given, sig.args, sig.return_type)

    return call


def fixed_caller(argtypes: Sequence[Any]) -> Any:
    """An intrinsic ``call(addr, (a, b, ...))`` of the function at ``addr`` (int64) that takes exactly ``argtypes``
    and returns nothing: a function compiled for a signature fixed in advance (launch.py's tasks and par_tasks),
    with no overloads to look up. The call's arguments are cast to ``argtypes``."""
    argtypes = tuple(argtypes)

    @intrinsic
    def call(typingctx: Any, addr: Any, args: Any) -> Any:
        if not isinstance(addr, types.Integer) or not isinstance(args, types.BaseTuple) or len(args) != len(argtypes):
            return None
        return types.none(addr, args), _codegen(tuple(args), argtypes, types.none)

    return call


def _codegen(given: Sequence[Any], argtypes: Sequence[Any], restype: Any) -> Any:
    """The code of a call through an address (the intrinsic's first argument) of a function that takes ``argtypes``
    and returns ``restype``, with the tuple (its second argument) of ``given`` types cast to them."""

    def codegen(context: Any, builder: Any, signature: Any, llargs: Any) -> Any:
        fnty = context.call_conv.get_function_type(restype, argtypes)
        ptr = builder.inttoptr(llargs[0], fnty.as_pointer())
        vals = cgutils.unpack_tuple(builder, llargs[1], len(given))
        vals = [context.cast(builder, v, a, b) for v, a, b in zip(vals, given, argtypes)]
        status, res = context.call_conv.call_function(builder, ptr, restype, argtypes, vals)
        with cgutils.if_unlikely(builder, status.is_error):  # as Numba's own calls do (an error propagates)
            context.call_conv.return_status_propagate(builder, status)
        return res

    return codegen


class Parts:
    """A kernel's functions called through addresses: each ``(fn, argtypes)`` compiled (or loaded from the cache).
    ``addresses``: the kernel's address arguments, in order. ``abi``: the compiled signatures (argument and return
    types), a constant that the kernel's factory puts in the kernel's closure, so that Numba's cache key (which
    hashes a closure's contents) holds it: a kernel cached against other signatures of its functions (a function
    edited in another file, which Numba's cache does not see) is not loaded, but compiled again."""

    def __init__(self, *parts: tuple[Any, Sequence[Any]]) -> None:
        self.addresses = tuple(address(fn, argtypes) for fn, argtypes in parts)
        self.abi = "; ".join(f"{fn.py_func.__module__}.{fn.py_func.__qualname__}"
                             f"{fn.overloads[tuple(argtypes)].signature}" for fn, argtypes in parts)

    def __add__(self, other: Parts) -> Parts:
        """The functions of both, in order: a kernel that calls the chunk functions of several ops."""
        joined = Parts()
        joined.addresses = self.addresses + other.addresses
        joined.abi = "; ".join(a for a in (self.abi, other.abi) if a)
        return joined


def address(fn: Any, argtypes: Sequence[Any]) -> int:
    """The address of ``fn``'s compiled code for exactly ``argtypes`` (compiled now, or loaded from the cache)."""
    argtypes = tuple(argtypes)
    if argtypes not in fn.overloads:
        fn.compile(argtypes)
    cres = fn.overloads[argtypes]
    return int(cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name))
