"""One parallel kernel for every op: an op's parallel loop as a serial kernel, a task function and ``par_tasks``.

Numba compiles each ``prange`` kernel through its parfor passes into four modules (the loop body as a gufunc, two
wrappers, the kernel), 1.4-2.4 s a kernel on this project's 2-vCPU machines even when the body only calls a chunk
function through its address (native.py); the same op as a serial kernel and a task compiles in 0.7-1.6 s. A first
run compiled three of them before its first step (step_fwd_v1, step_bwd_v1, head_train_v1). Here the parallel loop
is compiled once, for all ops, and cached:

    par_tasks(a_task, p, n):  for i in prange(n): task(p, i, get_thread_id())   # through the address a_task

An op is then a serial kernel (its prologue, say padding the weights) that ends with ``run(a_par, a_task,
stash(args), n)``: it puts its arguments, a tuple, on its own stack (``stash``), and calls ``par_tasks`` through its
address ``a_par`` with the address of that tuple; ``par_tasks`` calls the op's task function (the former loop body)
for every i, in parallel, through the address ``a_task``. The task takes its arguments back from the tuple
(``unstash``, at the tuple's type, named by a constant of the task made from the types of the op's arguments,
``task_type``), and runs as the loop body ran: the same chunk functions, the same chunks, the same thread ids
(workspaces are per thread), so the same bits on any number of threads. The stack tuple lives until ``run`` returns
(par_tasks returns when every task has finished).

A task function is compiled for exactly ``TASK_ARGS`` (native.address) and made per op by a factory that closes
over the name of the tuple's type (``task_type``): Numba's cache key hashes a closure's contents, so a task cached
for other argument types is not loaded but compiled again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from llvmlite import ir
from numba import get_thread_id, prange, typeof, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from . import native
from .common import JIT, JIT_INNER, njit

#: a task's arguments: the address of the op's stashed argument tuple, the task's index, the thread's id
TASK_ARGS = (types.int64, types.int64, types.int64)
#: par_tasks's arguments: the task's address, the address of the op's argument tuple, the number of tasks
PAR_ARGS = (types.int64, types.int64, types.int64)
#: a task function's options: called only through its address (no Python or C entry point); compiled at the parallel
#: kernels' level (common.PARALLEL_OPT_LEVEL, -O1), since it is control around calls of chunk functions compiled at -O2
JIT_TASK: dict[str, Any] = {**JIT_INNER, "loop_control": True}
#: an op kernel's options: the same level, for the same reason (a prologue, then launch.run)
JIT_OP: dict[str, Any] = {**JIT, "loop_control": True}


call_task = native.fixed_caller(TASK_ARGS)
call_par = native.fixed_caller(PAR_ARGS)


def canonical(ty: Any) -> Any:
    """The type a task reads an argument as: an array as a writable, aligned C-contiguous one (the same data in
    Numba's data model, whatever its flags; a read-only array is never written by the ops that take one), anything
    else as it is."""
    if isinstance(ty, types.Array):
        return types.Array(ty.dtype, ty.ndim, "C")
    return ty


@intrinsic
def stash(typingctx: Any, tup: Any) -> Any:
    """The address (int64) of a copy of ``tup`` on the calling kernel's stack (valid until that kernel returns), its
    members cast to their ``canonical`` types. Only C-contiguous arrays: a task indexes them as such."""
    if not isinstance(tup, types.BaseTuple):
        return None
    for i, ty in enumerate(tup):
        if isinstance(ty, types.Array) and ty.layout != "C":
            raise TypingError(f"launch.stash: argument {i} is a non-contiguous array ({ty}); the ops take C-contiguous "
                              "arrays only")
    canon = types.Tuple(tuple(canonical(ty) for ty in tup))

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        vals = cgutils.unpack_tuple(builder, args[0], len(canon))
        vals = [context.cast(builder, v, a, b) for v, a, b in zip(vals, tup, canon)]
        ptr = cgutils.alloca_once(builder, context.get_value_type(canon))
        builder.store(context.make_tuple(builder, canon, vals), ptr)
        return builder.ptrtoint(ptr, ir.IntType(64))

    return types.int64(tup), codegen


#: the tuple types of task_type's names, in this process (a task that compiles looks its type up here by name)
_TYPES: dict[str, types.Tuple] = {}


@intrinsic(prefer_literal=True)
def unstash(typingctx: Any, p: Any, name: Any) -> Any:
    """The tuple stored at the address ``p`` by ``stash``, of the type ``task_type`` named ``name`` (a constant
    string). Its arrays are the caller's: each is counted once more here, since Numba releases what an intrinsic
    returns when the task ends."""
    if not isinstance(p, types.Integer) or not isinstance(name, types.StringLiteral):
        return None
    ty = _TYPES.get(name.literal_value)
    if ty is None:
        raise TypingError(f"launch.unstash: no tuple type named {name.literal_value!r} (launch.task_type makes them)")

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], context.get_value_type(ty).as_pointer())
        val = builder.load(ptr)
        context.nrt.incref(builder, ty, val)
        return val

    return ty(p, name), codegen


@njit(parallel=True, **JIT)
def par_tasks(a_task, p, n):  # pragma: no cover (compiled)
    """task(p, i, thread id) for every i < n, in parallel (the only prange of the ops that use it)."""
    for i in prange(n):
        call_task(a_task, (p, np.int64(i), np.int64(get_thread_id())))


def par_address() -> int:
    """The address of par_tasks's compiled code (compiled now, or loaded from Numba's cache)."""
    return native.address(par_tasks, PAR_ARGS)


@njit(**JIT_INNER)
def run(a_par, a_task, p, n):  # pragma: no cover (compiled)
    """par_tasks(a_task, p, n) through its address a_par."""
    call_par(a_par, (a_task, p, np.int64(n)))


def args_type(args: Sequence[Any]) -> types.Tuple:
    """The type of the tuple that ``stash`` makes of an op kernel's arguments, from the Python values it is called
    with: what Numba's dispatcher types them as (Python ints as int64, np.float32 as float32, arrays by dtype and
    dimensions), ``canonical``."""
    return types.Tuple(tuple(canonical(typeof(a)) for a in args))


def task_type(args: Sequence[Any]) -> str:
    """The constant a task factory closes over: the name of args_type(args), whose type ``unstash`` then reads. A
    name, not the type: Numba's cache key hashes the pickled closure, and a Numba type's pickle holds a number that
    depends on the order the process made its types in (a task would never be found in the cache)."""
    ty = args_type(args)
    name = str(ty)
    _TYPES[name] = ty
    return name


def check_args(op: str, name: str, args: Sequence[Any]) -> None:
    """At a plan's first call: the tuple type the op's task was compiled for (``name``, from the planner's view of the
    arguments) is the one the call's ``args`` make. A task that read its tuple at another type would read garbage;
    this makes a planner that lists the arguments otherwise than the call an error instead."""
    got = task_type(args)
    if got != name:
        raise RuntimeError(f"{op}: the task was planned for arguments {name}, the kernel is called with {got}")
