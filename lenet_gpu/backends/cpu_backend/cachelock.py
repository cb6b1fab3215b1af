"""One writer at a time in a function's Numba cache, across processes.

Numba's disk cache keeps, per function, an index (signature → data file name) and one data file per compiled
overload. A new entry takes the first number that the index it has just read does not use
(``numba.core.caching.IndexDataCacheFile.save``): index read, index written, then data written, with no lock. Two
processes that add different overloads of one function at the same time both read the same index, take the same
number, and the index that is written last can name a data file that the other process's overload overwrote: a
later process that loads it gets another overload's machine code for this signature.

The cpu backend's first run compiles in two processes at once into one cache (warm.py), and shared functions
(``act``, the lane kernels...) are compiled by both, with different signatures: exactly that case. So every
process of the cpu backend takes an exclusive ``flock`` on ``<index>.lock`` in the cache directory around Numba's
``save`` and ``load`` of an index and its data (``install``, done when the backend is imported). Where ``fcntl`` is
missing (Windows) nothing changes. The lock files are empty and stay next to the index files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: Numba's own behaviour
    fcntl = None  # type: ignore[assignment]

_installed = False


@contextmanager
def locked(index_path: str) -> Iterator[None]:
    """An exclusive lock on ``index_path + ".lock"`` (made if missing) for the body; no lock where it cannot be
    made (no fcntl, a read-only cache directory: Numba then falls back as it would anyway)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(index_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _with_lock(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with locked(self._index_path):
            return method(self, *args, **kwargs)

    wrapper.__lenet_gpu_locked__ = True  # type: ignore[attr-defined]
    return wrapper


def install() -> bool:
    """Lock Numba's cache index/data saves and loads (once per process). Returns whether the lock is in place:
    False without fcntl, or where this Numba's cache class is not the one described above."""
    global _installed
    if _installed:
        return True
    if fcntl is None:
        return False
    try:
        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return False
    if not all(callable(getattr(IndexDataCacheFile, m, None)) for m in ("save", "load", "_load_index")):
        return False
    for name in ("save", "load"):
        method = getattr(IndexDataCacheFile, name)
        if not getattr(method, "__lenet_gpu_locked__", False):
            setattr(IndexDataCacheFile, name, _with_lock(method))
    _installed = True
    return True
