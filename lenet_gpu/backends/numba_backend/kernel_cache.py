"""An on-disk cache of the compiled Numba kernels, so a second run of ``--backend numba`` loads its kernels
instead of compiling them again (the first run on a machine compiles: ~7.5 s of JIT before the first step on
the H200).

This is numba-cuda's own kernel cache (``@cuda.jit(cache=True)``: ``CUDADispatcher.enable_caching``), whose
entries are keyed by the signature, the device's compute capability and CUDA runtime version
(``codegen.magic_tuple``), the numba-cuda version and the kernel's bytecode. What it does not key on are the
kernel's dependencies: the inline device functions and constants it takes from other modules (common.py's
activations, conv2d._last_arrival, stepstate's word indices). Its default locator stamps an entry with the
kernel's own file only, so a change to common.py would load a stale kernel. Here every kernel of this
package is cached under a directory named by a hash of all of its dependencies (every module of this
package, lenet_gpu/stepstate.py and lenet_gpu/backends/base.py, the Python and numba-cuda versions and the
compiler settings that change the code: NUMBA_OPT, fastmath/debug defaults), and that hash is the entries'
source stamp too. So: one cache per device architecture (the key), per option set and source tree (the
directory).

Where: ``$LENET_GPU_NUMBA_CACHE_DIR``, else ``$NUMBA_CACHE_DIR/lenet_gpu``, else
``$XDG_CACHE_HOME/lenet_gpu/numba`` (``~/.cache/lenet_gpu/numba``). ``LENET_GPU_NUMBA_CACHE=0`` turns it off.
NumbaBackend enables it on a GPU (never in the simulator, which compiles nothing). Old directories are not
pruned (a few MB each).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
_LENET = PACKAGE_DIR.parent.parent
#: the sources every kernel of this package may depend on, besides this package's own modules
EXTRA_DEPS = (_LENET / "stepstate.py", _LENET / "backends" / "base.py")
ENV_DIR = "LENET_GPU_NUMBA_CACHE_DIR"
ENV_SWITCH = "LENET_GPU_NUMBA_CACHE"


def dependency_files(package_dir: Path = PACKAGE_DIR, extra: Iterable[Path] = EXTRA_DEPS) -> list[Path]:
    return sorted(package_dir.glob("*.py")) + [Path(p) for p in extra]


def _settings() -> str:
    """The compiler settings that change generated code, and the versions that change the pickles."""
    try:
        from numba.cuda.core import config as cfg
    except ImportError:  # pragma: no cover - another numba-cuda layout
        import numba.core.config as cfg
    import numba_cuda

    keys = ("OPT", "CUDA_DEBUGINFO_DEFAULT", "CUDA_FASTMATH", "DEBUGINFO_DEFAULT", "CUDA_DEFAULT_PTX_CC")
    vals = [f"{k}={getattr(cfg, k, None)!r}" for k in keys]
    return ";".join([sys.version.split()[0], getattr(numba_cuda, "__version__", "?"), *vals])


def sources_hash(files: Iterable[Path] | None = None, settings: str | None = None) -> str:
    """SHA-256 (hex) of the dependency files' names and bytes and of the settings."""
    h = hashlib.sha256()
    for p in dependency_files() if files is None else files:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes() if p.exists() else b"<missing>")
        h.update(b"\0")
    h.update((_settings() if settings is None else settings).encode())
    return h.hexdigest()


def cache_root() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"]) / "lenet_gpu"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lenet_gpu" / "numba"


_HASH: str | None = None


def cache_dir() -> Path:
    """This source tree's and these settings' cache directory (the hash is computed once per process)."""
    global _HASH
    if _HASH is None:
        _HASH = sources_hash()
    return cache_root() / _HASH[:20]


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "", "false", "no")


def _locator_class() -> Any:
    from numba.cuda.core.caching import _CacheLocator

    class PackageCacheLocator(_CacheLocator):
        """Caches this package's kernels under cache_dir()/<module>, stamped with the dependency hash."""

        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._path = cache_dir() / Path(py_file).stem

        def get_cache_path(self) -> str:
            return str(self._path)

        def get_source_stamp(self) -> str:
            return cache_dir().name

        def get_disambiguator(self) -> str:
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if Path(py_file).resolve().parent != PACKAGE_DIR:
                return None  # not ours: numba-cuda's own locators
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                return None
            return self

    return PackageCacheLocator


_LOCATOR: Any = None


def install_locator() -> Any:
    """Put the package locator first in numba-cuda's CUDA cache locators (once); it answers only for the
    functions of this package. Returns the locator class."""
    global _LOCATOR
    from numba.cuda.dispatcher import CUDACacheImpl

    if _LOCATOR is None:
        _LOCATOR = _locator_class()
    if _LOCATOR not in CUDACacheImpl._locator_classes:
        CUDACacheImpl._locator_classes = [_LOCATOR, *CUDACacheImpl._locator_classes]
    return _LOCATOR


def writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def enable(dispatchers: Iterable[Any]) -> int:
    """Turn on the on-disk cache of each Numba kernel dispatcher (``cache=True``), with the package locator.
    Returns how many were enabled (0 when switched off, in the simulator, or when the cache directory is not
    writable: then nothing is cached, rather than cached without the dependency stamp)."""
    import numba

    if not enabled() or numba.config.ENABLE_CUDASIM or not writable(cache_dir()):
        return 0
    from numba.cuda.core.caching import NullCache

    install_locator()
    n = 0
    for d in dispatchers:
        if isinstance(getattr(d, "_cache", None), NullCache):
            d.enable_caching()
            n += 1
    return n


def cache_stats(dispatchers: Iterable[Any]) -> dict[str, int]:
    """Σ of the dispatchers' cache hits and misses (numba-cuda's per-signature counters)."""
    hits = misses = 0
    for d in dispatchers:
        hits += sum(getattr(d, "_cache_hits", {}).values())
        misses += sum(getattr(d, "_cache_misses", {}).values())
    return {"hits": hits, "misses": misses}
