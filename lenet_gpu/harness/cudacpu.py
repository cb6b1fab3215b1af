"""Run unchanged CUDA C kernels on the CPU: g++ (C++20) + ``cudacpu.h``, loaded with ctypes.

The API mirrors ``cupy.RawModule`` / ``cupy.RawKernel`` so that the same backend code drives a GPU
or this harness::

    mod = CpuModule(path="kernels/conv2d.cu", options=("-DTILE=16",))
    k = mod.get_function("conv2d_fwd_v1")
    k((grid_x, grid_y), (16, 16), (x, w, b, y, np.int32(n)), shared_mem=1024)

Pointer parameters take C-contiguous NumPy arrays whose dtype is the pointee type; scalar
parameters take NumPy scalars of exactly the parameter's type (``np.int32`` for ``int``,
``np.float32`` for ``float``), because CuPy passes a Python ``int``/``float`` as a 64-bit value and
such a mismatch corrupts a real GPU launch. Launch configurations are checked as a GPU would.

Environment:
    CUDACPU_CACHE     build cache folder (default: a per-user folder in the temp dir)
    CUDACPU_SANITIZE  default sanitizer: ``address``, ``thread`` or ``undefined``
    CUDACPU_STRICT    ``0`` turns off divergent-barrier / exited-lane checks (default on)
    CUDACPU_THREADS   ``os`` runs a block's threads as OS threads from a pool; the default on x86-64 runs them
                      as fibers on one runner thread (user-space switches at barriers, in an order that
                      changes from sweep to sweep). ASan and TSan builds always use OS threads.
    CUDACPU_TIMEOUT   per-block watchdog in seconds (default 10) that turns a hang (a spin loop, or with OS
                      threads a deadlock) into an error; fibers report a deadlock as soon as no thread can go on
    CXX               the C++ compiler (default ``g++``; needs g++ >= 12: C++20, libstdc++ >= 12);
                      without one, :class:`CompilerUnavailable` (a ``BackendUnavailable``) in one line

Limits: Linux only; blocks run one at a time; warp intrinsics need full-warp participation;
no half precision, cooperative groups, inline PTX, textures or ``__CUDA_ARCH__`` paths; x86
ordering hides missing fences (ThreadSanitizer finds missing barriers). A wild pointer kills the
process (after printing the thread and block), so run such tests in a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import getpass
import hashlib
import os
import re
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable

__all__ = [
    "CompilerUnavailable",
    "CpuKernel",
    "CpuModule",
    "CudaCpuError",
    "CudaCpuWarning",
    "cache_dir",
    "check_compiler",
    "sanitizer_env",
    "sanitizer_runtime_loaded",
]

HEADER = Path(__file__).with_name("cudacpu.h")
RUNTIME_HEADER = Path(__file__).with_name("cudacpu_runtime.h")
SANITIZERS = ("address", "thread", "undefined")

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIMS = (1024, 1024, 64)
MAX_GRID_DIMS = (2**31 - 1, 65535, 65535)
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024  # without cudaFuncAttributeMaxDynamicSharedMemorySize
OPTIN_MAX_DYNAMIC_SHARED = 227 * 1024  # sm_90 opt-in maximum per block
DEFAULT_TIMEOUT_S = 10.0

_BASE_FLAGS = (
    "-std=c++20",
    "-O2",
    "-g",
    "-fPIC",
    "-pthread",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",  # CUDA code type-puns (float4 loads from float arrays)
    "-ffp-contract=off",
    "-Wall",
    # ISO C++ only, as NVRTC accepts: GNU extensions (a zero-length array, a variable-length array, ...)
    # compile on g++ but not for the GPU, so they are errors here too
    "-pedantic-errors",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-Wno-sign-compare",  # threadIdx.x < n
    "-Wno-unused-function",
)
_SANITIZER_RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}

_SCALAR_DTYPES: dict[str, np.dtype] = {
    "b1": np.dtype(np.bool_),
    "i1": np.dtype(np.int8),
    "u1": np.dtype(np.uint8),
    "i2": np.dtype(np.int16),
    "u2": np.dtype(np.uint16),
    "i4": np.dtype(np.int32),
    "u4": np.dtype(np.uint32),
    "i8": np.dtype(np.int64),
    "u8": np.dtype(np.uint64),
    "f4": np.dtype(np.float32),
    "f8": np.dtype(np.float64),
}
_C_NAMES = {
    "b1": "bool",
    "i1": "char",
    "u1": "unsigned char",
    "i2": "short",
    "u2": "unsigned short",
    "i4": "int",
    "u4": "unsigned int",
    "i8": "long long",
    "u8": "unsigned long long",
    "f4": "float",
    "f8": "double",
}

# `extern __shared__ T name[];` -> a pointer to the launch's dynamic shared memory.
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[]*?)\b(\w+)\s*\[\s*\]\s*;")
# A device-side assert comes from cudacpu.h; the system header would abort the process instead.
_ASSERT_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<(?:cassert|assert\.h)>.*$", re.MULTILINE)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)
_COMMENT_OR_STRING = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.DOTALL)
_GLOBAL_KW = re.compile(r"\b__global__\b")
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\([^()]*\)")
_VARIABLE = re.compile(
    r"(?:^|[;}])\s*(?:static\s+)?(?:__device__\s+)?__(?:constant|device)__\s+(?:__device__\s+)?"
    r"[^;(){}=]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*(?:=[^;]*)?;",
    re.MULTILINE,
)

# NVRTC-only options that mean nothing to g++: accepted and ignored, so that one option tuple
# serves RawModule (NVRTC) and this harness.
_IGNORED_OPTIONS = re.compile(
    r"^(?:--?std=.*|--?gpu-architecture(?:=.*)?|-arch(?:=.*)?|--?use_fast_math|-lineinfo|"
    r"--generate-line-info|-G|--device-debug|--?fmad=.*|--?ftz=.*|--?prec-div=.*|--?prec-sqrt=.*|"
    r"--?restrict|--extra-device-vectorization|--?dopt=.*|--?maxrregcount=.*|--ptxas-options=.*|"
    r"--?relocatable-device-code=.*|-rdc=.*|-default-device|--device-as-default-execution-space|"
    r"--?diag-suppress=.*|--?diag-error=.*|--?diag-warn=.*|--brief-diagnostics(?:=.*)?|"
    r"--?display-error-number|--?no-display-error-number|-err-no|--?Wno-deprecated-declarations|"
    r"--?Wreorder|--?Wext-lambda-captures-this|-ewp|--?extensible-whole-program|--?dlink-time-opt|"
    r"-dlto|--?fdevice-syntax-only|--?minimal)$"
)
_ARCH_WITH_VALUE = {"-arch", "--gpu-architecture"}


class CudaCpuError(RuntimeError):
    """A build, argument, launch-configuration or device-side error of the CPU harness."""


class CompilerUnavailable(CudaCpuError, BackendUnavailable):
    """No usable C++ compiler: the harness (backend ``cupy-host``) cannot run here. One line of message,
    and a BackendUnavailable, so the programs report it as they report a missing GPU."""


class CudaCpuWarning(UserWarning):
    """The C++ compiler warned about a kernel module."""


# --------------------------------------------------------------------------------------------- setup


def cache_dir() -> Path:
    """Folder of built modules: ``$CUDACPU_CACHE`` or a per-user folder in the temp dir."""
    env = os.environ.get("CUDACPU_CACHE")
    if env:
        path = Path(env)
    else:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        path = Path(tempfile.gettempdir()) / f"cudacpu-cache-{user}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=8)
def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        where = "$CXX" if os.environ.get("CXX") else "the default"
        why = (f"exits with status {e.returncode} on --version" if isinstance(e, subprocess.CalledProcessError)
               else "is not found" if isinstance(e, FileNotFoundError) else f"cannot run ({e.strerror or e})")
        raise CompilerUnavailable(
            f"backend 'cupy-host' compiles the CUDA C kernels with g++ >= 12 (C++20), but {cxx!r} ({where}) "
            f"{why}; install g++ (Debian/Ubuntu: apt install g++) or set CXX, or use --backend numpy"
        ) from None
    return out.splitlines()[0] if out else cxx


def check_compiler() -> str:
    """The first line of ``$CXX --version`` (default g++); raises :class:`CompilerUnavailable` (one line)
    when there is no such compiler. Cheap after the first call: a runtime can call it when it starts,
    so a missing compiler is reported before any work."""
    return _compiler_id(_cxx())


@functools.lru_cache(maxsize=8)
def _sanitizer_library(kind: str, cxx: str) -> str:
    name = _SANITIZER_RUNTIMES[kind]
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not out or not Path(out).is_absolute() or not Path(out).exists():
        raise CudaCpuError(f"{cxx} has no {name}: install the sanitizer runtime (e.g. the gcc package)")
    return str(Path(out).resolve())


def sanitizer_runtime_loaded(kind: str) -> bool:
    """Whether the runtime of sanitizer ``kind`` is already mapped into this process.

    AddressSanitizer and ThreadSanitizer must come first in the library list: a module built with
    them can only be loaded by a Python started under ``LD_PRELOAD`` (see :func:`sanitizer_env`).
    UndefinedBehaviorSanitizer needs nothing.
    """
    if kind == "undefined":
        return True
    lib = _SANITIZER_RUNTIMES.get(kind)
    if lib is None:
        raise ValueError(f"unknown sanitizer {kind!r}; expected one of {SANITIZERS}")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return lib.removesuffix(".so") in maps


def sanitizer_env(
    kind: str, env: Mapping[str, str] | None = None, report_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Environment for a subprocess that runs kernels under sanitizer ``kind``.

    Sets ``CUDACPU_SANITIZE``, preloads the ASan/TSan runtime (``g++ -print-file-name``), and
    chooses options: no leak checking (Python itself leaks by design), a longer watchdog, symbolized
    reports; for TSan, single-threaded BLAS/OpenMP (their pools give false reports). ``env``
    defaults to ``os.environ``; existing options are kept (they come later, so they win). Applying
    it twice changes nothing.

    ``report_dir``: write the reports to ``<report_dir>/<kind>.<pid>`` files instead of stderr
    (the runtimes' ``log_path``). Use it under pytest, which captures stderr per test and drops it
    for tests that pass (and loses it when ASan aborts the process).
    """
    if kind not in SANITIZERS:
        raise ValueError(f"unknown sanitizer {kind!r}; expected one of {SANITIZERS}")
    out = dict(os.environ if env is None else env)
    out["CUDACPU_SANITIZE"] = kind
    out.setdefault("CUDACPU_TIMEOUT", "120")
    if kind in _SANITIZER_RUNTIMES:
        lib = _sanitizer_library(kind, _cxx())
        preload = out.get("LD_PRELOAD", "").split()
        if lib not in preload:
            out["LD_PRELOAD"] = " ".join([lib, *preload])
    defaults = {
        "address": ("ASAN_OPTIONS", ["detect_leaks=0", "abort_on_error=0", "print_summary=1"]),
        "thread": ("TSAN_OPTIONS", ["second_deadlock_stack=1", "report_signal_unsafe=0"]),
        "undefined": ("UBSAN_OPTIONS", ["print_stacktrace=1"]),
    }
    if kind == "thread":
        # BLAS thread pools (NumPy's reference matmuls) synchronise in ways TSan cannot see: their
        # reports would be false positives, not kernel races
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            out.setdefault(name, "1")
    var, options = defaults[kind]
    current = [o for o in out.get(var, "").split(":") if o]
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        current = [o for o in current if not o.startswith("log_path=")]
        current.append(f"log_path={Path(report_dir).resolve() / kind}")
    out[var] = ":".join([o for o in options if o not in current] + current)
    return out


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError as e:
        raise CudaCpuError(f"{name}={value!r} is not a number") from e


# --------------------------------------------------------------------------------------------- source


def _strip_comments(src: str) -> str:
    """Blanks out comments and string literals (keeping newlines) so scans see only code."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m[0])

    return _COMMENT_OR_STRING.sub(blank, src)


def _find_kernels(src: str) -> tuple[list[str], list[str]]:
    """Names of the ``__global__`` functions in ``src``: (plain kernels, templated kernels)."""
    code = _strip_comments(src)
    plain: dict[str, None] = {}
    templated: dict[str, None] = {}
    for m in _GLOBAL_KW.finditer(code):
        line_start = code.rfind("\n", 0, m.start()) + 1
        if code[line_start : m.start()].lstrip().startswith("#"):
            continue  # inside a macro definition: the expansion site is not visible here
        # the declaration runs from the previous ';', '{', '}' or line start to its '(' (before any '{' / ';')
        head_start = max(code.rfind(c, 0, m.start()) for c in ";{}")
        end = min((i for i in (code.find("{", m.end()), code.find(";", m.end())) if i >= 0), default=len(code))
        tail = _LAUNCH_BOUNDS.sub(" ", code[m.end() : end])
        name_match = re.search(r"\bvoid\b\s*(?:__\w+__\s*)*(\w+)\s*\(", tail)
        if not name_match:
            continue
        head = code[head_start + 1 : m.start()]
        (templated if re.search(r"\btemplate\b", head) else plain)[name_match[1]] = None
    return list(plain), list(templated)


def _find_globals(src: str) -> list[str]:
    """Names of file-scope ``__constant__`` / ``__device__`` variables (for ``get_global``)."""
    return list(dict.fromkeys(m[1] for m in _VARIABLE.finditer(_strip_comments(src))))


def _translate(src: str) -> str:
    """The only source rewrites; both keep line numbers."""
    src = _ASSERT_INCLUDE.sub("/* <assert.h>: cudacpu.h provides a device assert */", src)
    return _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* const {m[2]} = static_cast<decltype({m[2]})>(::cudacpu::dynamic_smem());", src
    )


def _local_includes(src: str, base_dir: Path | None, include_dirs: Sequence[Path]) -> list[Path]:
    """Files reached through ``#include "..."`` (recursively), for the cache key."""
    found: dict[Path, None] = {}
    todo = [(src, base_dir)]
    while todo:
        text, here = todo.pop()
        for name in _LOCAL_INCLUDE.findall(_strip_comments_keep_includes(text)):
            for d in ([here] if here else []) + list(include_dirs):
                candidate = (d / name).resolve()
                if candidate.is_file():
                    if candidate not in found:
                        found[candidate] = None
                        todo.append((candidate.read_text(errors="replace"), candidate.parent))
                    break
    return list(found)


def _strip_comments_keep_includes(src: str) -> str:
    # include lines hold a string literal, so only comments are removed here
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]), src, flags=re.DOTALL)


def _translate_options(options: Sequence[str]) -> tuple[list[str], list[Path]]:
    """RawModule/NVRTC-style options -> (g++ flags, include dirs). Unknown options are an error."""
    flags: list[str] = []
    include_dirs: list[Path] = []
    it = iter(options)
    for opt in it:
        if not isinstance(opt, str):
            raise CudaCpuError(f"options must be strings, got {opt!r}")
        if opt in ("-D", "-U", "-I", "-include") or opt in _ARCH_WITH_VALUE:
            value = next(it, None)
            if value is None:
                raise CudaCpuError(f"option {opt} needs a value")
            if opt in _ARCH_WITH_VALUE:
                continue
            opt = opt + value if opt != "-include" else f"--pre-include={value}"
        if opt.startswith("--define-macro="):
            flags.append("-D" + opt.split("=", 1)[1])
        elif opt.startswith("--undefine-macro="):
            flags.append("-U" + opt.split("=", 1)[1])
        elif opt.startswith("--include-path="):
            include_dirs.append(Path(opt.split("=", 1)[1]))
        elif opt.startswith("--pre-include="):
            flags += ["-include", opt.split("=", 1)[1]]
        elif opt.startswith(("-D", "-U")):
            flags.append(opt)
        elif opt.startswith("-I"):
            include_dirs.append(Path(opt[2:]))
        elif opt in ("-w", "--disable-warnings"):
            flags.append("-w")
        elif _IGNORED_OPTIONS.match(opt):
            continue
        else:
            raise CudaCpuError(
                f"option {opt!r} is not understood by the CPU harness "
                "(supported: -D, -U, -I, -include, -w and NVRTC code-generation options, which are ignored)"
            )
    return flags, include_dirs


# --------------------------------------------------------------------------------------------- build


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build(so: Path, cpp_text: str, cmd_prefix: list[str], cmd_suffix: list[str]) -> str:
    """Builds ``so`` from ``cpp_text`` unless it exists; returns the compiler's warnings.

    Atomic and safe against concurrent builders of the same key (file lock + rename).
    """
    log_path = so.with_suffix(".log")
    if so.exists():
        return log_path.read_text() if log_path.exists() else ""
    with _file_lock(so.with_suffix(".lock")):
        if so.exists():
            return log_path.read_text() if log_path.exists() else ""
        cpp = so.with_suffix(".cpp")
        _atomic_write(cpp, cpp_text)
        tmp = so.with_name(f"{so.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        cmd = [*cmd_prefix, str(cpp), "-o", str(tmp), *cmd_suffix]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tmp.unlink(missing_ok=True)
            raise CudaCpuError(f"{cmd[0]} failed ({' '.join(cmd)}):\n{r.stderr}")
        _atomic_write(log_path, r.stderr)
        os.replace(tmp, so)
        return r.stderr


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it (``kernels/conv2d.cu`` from the
    repository's root), else as given: what compiler messages and device asserts name."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _runtime_library(sanitize_flags: list[str]) -> Path:
    """The shared runtime (thread pool, barriers) for these sanitizer flags, built once per key."""
    cxx = _cxx()
    flags = [*_BASE_FLAGS, *sanitize_flags]
    key = _digest(HEADER.read_bytes(), RUNTIME_HEADER.read_bytes(), " ".join(flags), _compiler_id(cxx), "runtime")
    name = f"cudacpu_rt_{key}.so"
    so = cache_dir() / name
    text = f'#include "{RUNTIME_HEADER}"\n'
    _build(so, text, [cxx, *flags, "-shared", f"-Wl,-soname,{name}"], [])
    return so


# --------------------------------------------------------------------------------------------- module

_LOADED: dict[Path, ctypes.CDLL] = {}
_LOAD_LOCK = threading.Lock()


def _load(so: Path) -> ctypes.CDLL:
    with _LOAD_LOCK:
        lib = _LOADED.get(so)
        if lib is None:
            lib = ctypes.CDLL(str(so))
            _LOADED[so] = lib
        return lib


class CpuModule:
    """A CUDA C source compiled for the CPU; mirrors ``cupy.RawModule``.

    Args:
        path: the ``.cu`` file (its folder is searched for ``#include "..."`` headers).
        code: the source text instead of ``path``.
        options: RawModule/NVRTC-style options: ``-DNAME=VALUE``, ``-UNAME``, ``-Idir``,
            ``-include file``; NVRTC code-generation options (``-arch``, ``--use_fast_math``,
            ``-std=...``, ...) are accepted and ignored.
        name_expressions: instantiations of templated kernels, e.g. ``"scale<float, 128>"``;
            ``get_function`` takes the same strings.
        sanitize: ``"address"``, ``"thread"``, ``"undefined"`` or ``""``; default
            ``$CUDACPU_SANITIZE``. ASan and TSan need a process started with
            :func:`sanitizer_env`.
        include_dirs: more folders for ``#include "..."``.
        strict: report divergent ``__syncthreads`` and warp operations naming exited lanes
            (default ``$CUDACPU_STRICT``, on).
        timeout: per-block watchdog in seconds (default ``$CUDACPU_TIMEOUT`` or 10).
        extra_cxx_flags: more g++ flags (e.g. ``-O0``), after the harness's own.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        code: str | None = None,
        options: Sequence[str] = (),
        name_expressions: Sequence[str] = (),
        sanitize: str | None = None,
        include_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        strict: bool | None = None,
        timeout: float | None = None,
        extra_cxx_flags: Sequence[str] = (),
    ) -> None:
        if (path is None) == (code is None):
            raise CudaCpuError("give exactly one of path= or code=")
        if path is not None:
            self.path: Path | None = Path(path).resolve()
            try:
                code = self.path.read_text()
            except OSError as e:
                raise CudaCpuError(f"cannot read {path}: {e}") from e
        else:
            self.path = None
        assert code is not None
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions)
        self.strict = _env_flag("CUDACPU_STRICT", True) if strict is None else bool(strict)
        self.timeout = _env_float("CUDACPU_TIMEOUT", DEFAULT_TIMEOUT_S) if timeout is None else float(timeout)
        if self.timeout <= 0:
            raise CudaCpuError(f"timeout must be positive, got {self.timeout}")
        sanitize = os.environ.get("CUDACPU_SANITIZE", "") if sanitize is None else sanitize
        if sanitize and sanitize not in SANITIZERS:
            raise CudaCpuError(f"unknown sanitizer {sanitize!r}; expected one of {SANITIZERS}")
        if sanitize and not sanitizer_runtime_loaded(sanitize):
            raise CudaCpuError(
                f"sanitize={sanitize!r} needs its runtime loaded first: start Python with "
                f"LD_PRELOAD={_sanitizer_library(sanitize, _cxx())} (lenet_gpu.harness.cudacpu.sanitizer_env() "
                "builds such an environment; scripts/sanitize_kernels.py runs tests that way)"
            )
        self.sanitize = sanitize

        cxx_defs, opt_includes = _translate_options(self.options)
        inc_dirs = [Path(d).resolve() for d in include_dirs] + [d.resolve() for d in opt_includes]
        if self.path is not None:
            inc_dirs.insert(0, self.path.parent)
        deps = self._scan_unit(inc_dirs)
        san_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
        flags = [*_BASE_FLAGS, *san_flags, *extra_cxx_flags, *cxx_defs, *(f"-I{d}" for d in inc_dirs)]
        self._build(flags, san_flags, deps)
        self._lib = _load(self.so_path)
        self._lib.cudacpu_last_error.restype = ctypes.c_char_p
        self._kernels: dict[str, CpuKernel] = {}

    def _scan_unit(self, inc_dirs: list[Path]) -> dict[Path, str]:
        """Finds the kernels and device variables of the source and its local headers; returns the
        headers' texts (part of the cache key)."""
        base = self.path.parent if self.path else None
        deps = {d: d.read_text(errors="replace") for d in _local_includes(self.code, base, inc_dirs)}
        for d, t in deps.items():
            if _EXTERN_SHARED.search(_strip_comments(t)):
                raise CudaCpuError(
                    f"{d}: `extern __shared__` in an included header is not supported by the CPU harness; "
                    "declare it in the .cu file"
                )
        unit = "\n".join([self.code, *deps.values()])
        plain, templated = _find_kernels(unit)
        template_names = {e.split("<", 1)[0].strip() for e in self.name_expressions}
        missing = template_names - set(templated) - set(plain)
        if missing:
            raise CudaCpuError(f"name_expressions refer to unknown kernels: {sorted(missing)}")
        self._entries = plain + [e for e in self.name_expressions if e not in plain]
        self._globals = _find_globals(unit)
        return deps

    def _generated_source(self) -> str:
        """The translation unit g++ compiles: header, rewritten source, exported wrappers."""
        source_name = _shown_path(self.path) if self.path is not None else "<cudacpu-code>"
        gen = [
            f'#include "{HEADER}"',
            f'#line 1 "{source_name}"',
            _translate(self.code),
            '#line 1 "<cudacpu-generated>"',
            'extern "C" CUDACPU_API const char* cudacpu_last_error() { return cudacpu::last_error(); }',
        ]
        for i, expr in enumerate(self._entries):
            gen.append(
                f'extern "C" CUDACPU_API int cudacpu_launch_{i}(const unsigned* g, const unsigned* b, '
                f"size_t smem, void** args, int strict, double timeout) {{ return cudacpu::launch(&{expr}, "
                f"{_c_string(expr)}, g, b, smem, args, strict, timeout); }}"
            )
            gen.append(
                f'extern "C" CUDACPU_API const char* cudacpu_signature_{i}() {{ return cudacpu::signature(&{expr}); }}'
            )
        for i, var in enumerate(self._globals):
            gen.append(
                f'extern "C" CUDACPU_API void* cudacpu_global_{i}(size_t* size) '
                f"{{ *size = sizeof({var}); return (void*)&{var}; }}"
            )
        return "\n".join(gen) + "\n"

    def _build(self, flags: list[str], san_flags: list[str], deps: dict[Path, str]) -> None:
        """Builds (or finds in the cache) the module's shared library; sets so_path and build_log."""
        text = self._generated_source()
        cxx = _cxx()
        runtime = _runtime_library(san_flags)
        # the key names files as the build shows them (relative to the working directory where they lie under it),
        # so that another checkout of the same sources run from its root finds the same builds
        key = _digest(
            text.replace(str(HEADER), HEADER.name),
            HEADER.read_bytes(),
            RUNTIME_HEADER.read_bytes(),
            " ".join(f"-I{_shown_path(Path(f[2:]))}" if f.startswith("-I") else f for f in flags),
            _compiler_id(cxx),
            runtime.name,
            *(f"{_shown_path(d)}\n{t}" for d, t in deps.items()),
        )
        self.so_path = cache_dir() / f"k_{key}.so"
        self.build_log = _build(self.so_path, text, [cxx, *flags, "-shared"], [str(runtime), "-Wl,-rpath,$ORIGIN"])
        if self.build_log.strip():
            source_name = str(self.path) if self.path is not None else "<code>"
            warnings.warn(f"{cxx} warnings for {source_name}:\n{self.build_log}", CudaCpuWarning, stacklevel=3)

    @property
    def kernel_names(self) -> list[str]:
        """Kernels that ``get_function`` accepts (plain kernels, then name expressions)."""
        return list(self._entries)

    @property
    def launches(self) -> int:
        """Number of launches made through this module's kernels."""
        return sum(k.launches for k in self._kernels.values())

    def get_function(self, name: str) -> CpuKernel:
        """The kernel ``name`` (an ``extern "C"``/C++ kernel name or one of the name expressions)."""
        kernel = self._kernels.get(name)
        if kernel is None:
            if name not in self._entries:
                hint = " (templated kernels need name_expressions)" if "<" not in name else ""
                raise CudaCpuError(f"kernel {name!r} not found in {self}; it has {self._entries}{hint}")
            kernel = CpuKernel(self, name, self._entries.index(name))
            self._kernels[name] = kernel
        return kernel

    def get_global(self, name: str, dtype: Any = np.uint8) -> np.ndarray:
        """A writable view of the ``__constant__``/``__device__`` variable ``name`` (like
        ``RawModule.get_global``, which returns its device memory)."""
        if name not in self._globals:
            raise CudaCpuError(f"no __constant__/__device__ variable {name!r} in {self}")
        fn = getattr(self._lib, f"cudacpu_global_{self._globals.index(name)}")
        fn.restype = ctypes.c_void_p
        size = ctypes.c_size_t()
        addr = fn(ctypes.byref(size))
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * size.value).from_address(addr))
        return raw.view(dtype)

    @property
    def block_threads(self) -> str:
        """How the runtime runs a block's threads: ``"fibers"`` (one runner thread, user-space switches at
        barriers) or ``"os"`` (a pool of OS threads: ``CUDACPU_THREADS=os``, and every ASan/TSan build)."""
        fn = self._lib.cudacpu_block_threads  # the runtime library's, found through the module's dependencies
        fn.restype = ctypes.c_char_p
        return fn().decode()

    def last_error(self) -> str:
        return (self._lib.cudacpu_last_error() or b"").decode(errors="replace")

    def __repr__(self) -> str:
        src = self.path.name if self.path else "<code>"
        return f"CpuModule({src}, options={self.options!r}, sanitize={self.sanitize!r})"


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(value: Any, what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise CudaCpuError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CudaCpuError(f"{what} dimensions must be ints, got {value!r}")
        out.append(int(v))
    out += [1] * (3 - len(out))
    return out[0], out[1], out[2]


class CpuKernel:
    """One kernel of a :class:`CpuModule`; mirrors ``cupy.RawKernel``.

    Attributes:
        name: the kernel name or name expression.
        signature: parameter type codes from the compiled function type, e.g.
            ``["const f4*", "f4*", "i4"]`` (``s<size>a<align>`` for a struct by value).
        launches: number of successful launches.
        max_dynamic_shared_size_bytes: like ``RawKernel.max_dynamic_shared_size_bytes`` /
            ``cudaFuncAttributeMaxDynamicSharedMemorySize``: launches asking for more dynamic shared
            memory fail. Default 48 KiB; settable up to 227 KiB (the sm_90 opt-in maximum).
    """

    def __init__(self, module: CpuModule, name: str, index: int) -> None:
        self.module = module
        self.name = name
        self.launches = 0
        self._max_dynamic_shared = DEFAULT_MAX_DYNAMIC_SHARED
        lib = module._lib
        self._fn = getattr(lib, f"cudacpu_launch_{index}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_double,
        ]
        sig = getattr(lib, f"cudacpu_signature_{index}")
        sig.restype = ctypes.c_char_p
        self.signature: list[str] = [c for c in (sig() or b"").decode().split(",") if c]

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CudaCpuError(f"max_dynamic_shared_size_bytes must be an int, got {value!r}")
        if not 0 <= int(value) <= OPTIN_MAX_DYNAMIC_SHARED:
            raise CudaCpuError(
                f"max_dynamic_shared_size_bytes={value} is outside [0, {OPTIN_MAX_DYNAMIC_SHARED}] "
                "(cudaFuncSetAttribute would fail with cudaErrorInvalidValue)"
            )
        self._max_dynamic_shared = int(value)

    def __repr__(self) -> str:
        return f"CpuKernel({self.name!r}, signature={self.signature})"

    # ----------------------------------------------------------------------------------- launch
    def _check_config(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int) -> None:
        if min(grid) < 1 or min(block) < 1:
            raise CudaCpuError(
                f"{self.name}: grid {grid} / block {block} has a zero or negative dimension "
                "(cudaErrorInvalidConfiguration)"
            )
        nthreads = block[0] * block[1] * block[2]
        if nthreads > MAX_THREADS_PER_BLOCK or any(b > m for b, m in zip(block, MAX_BLOCK_DIMS)):
            raise CudaCpuError(
                f"{self.name}: block {block} has {nthreads} threads; the limits are "
                f"{MAX_THREADS_PER_BLOCK} threads and {MAX_BLOCK_DIMS} per dimension "
                "(cudaErrorInvalidConfiguration)"
            )
        if any(g > m for g, m in zip(grid, MAX_GRID_DIMS)):
            raise CudaCpuError(
                f"{self.name}: grid {grid} exceeds the limits {MAX_GRID_DIMS} (cudaErrorInvalidConfiguration)"
            )
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise CudaCpuError(f"{self.name}: shared_mem must be a non-negative int, got {shared_mem!r}")
        if shared_mem > self._max_dynamic_shared:
            opt_in = (
                " (more than 48 KiB needs kernel.max_dynamic_shared_size_bytes set first, "
                "as cudaFuncAttributeMaxDynamicSharedMemorySize on the GPU)"
                if shared_mem <= OPTIN_MAX_DYNAMIC_SHARED
                else f" (the hardware maximum is {OPTIN_MAX_DYNAMIC_SHARED} bytes)"
            )
            raise CudaCpuError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory exceed the kernel's limit of "
                f"{self._max_dynamic_shared} bytes{opt_in}"
            )

    def _arg_error(self, i: int, code: str, message: str) -> CudaCpuError:
        return CudaCpuError(f"{self.name}: argument #{i} ({_describe(code)}): {message}")

    def _pointer_arg(self, i: int, code: str, a: Any) -> int:
        pointee = code[:-1]
        is_const = pointee.startswith("const ")
        pointee = pointee.removeprefix("const ")
        if isinstance(a, (np.uint64, np.int64, np.uintp)) and not isinstance(a, np.ndarray):
            return int(a)  # a raw address (0 = null), which CuPy passes the same way
        if not isinstance(a, np.ndarray):
            raise self._arg_error(i, code, f"expected a NumPy array for a pointer parameter, got {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise self._arg_error(i, code, "array is not C-contiguous (use np.ascontiguousarray)")
        if not is_const and not a.flags.writeable:
            raise self._arg_error(i, code, "read-only array passed for a non-const pointer")
        want = _SCALAR_DTYPES.get(pointee)
        if want is not None and a.dtype != want:
            raise self._arg_error(
                i,
                code,
                f"array dtype {a.dtype} does not match the pointee type {want} (the kernel "
                "would reinterpret its bytes)",
            )
        m = re.fullmatch(r"s(\d+)a(\d+)", pointee)
        if m and a.ctypes.data % int(m[2]):
            raise self._arg_error(i, code, f"array address is not {m[2]}-byte aligned (misaligned address)")
        return int(a.ctypes.data)

    def __call__(self, grid: Any, block: Any, args: Sequence[Any], shared_mem: int = 0) -> None:
        """Launches the kernel on ``grid`` x ``block`` threads and waits for it.

        Raises :class:`CudaCpuError` for a bad configuration or argument, and for device-side
        errors (``__trap``, failed ``assert``, divergent barriers in strict mode, deadlocks).
        """
        grid3 = _dims(grid, "grid")
        block3 = _dims(block, "block")
        self._check_config(grid3, block3, shared_mem)
        if not isinstance(args, (tuple, list)):
            raise CudaCpuError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.signature):
            raise CudaCpuError(
                f"{self.name}: expected {len(self.signature)} arguments ({', '.join(map(_describe, self.signature))}), "
                f"got {len(args)}"
            )
        keep: list[Any] = []
        addresses: list[int] = []
        for i, (a, code) in enumerate(zip(args, self.signature)):
            if code.endswith("*"):
                holder = ctypes.c_void_p(self._pointer_arg(i, code, a))
                keep.append(holder)
                addresses.append(ctypes.addressof(holder))
                continue
            want = _SCALAR_DTYPES.get(code)
            if want is None:
                if isinstance(a, np.void) and a.dtype.itemsize == int(code[1:].split("a")[0]):
                    buf = np.array(a)
                else:
                    raise self._arg_error(i, code, "pass a struct by value as a np.void of the same size")
            elif not isinstance(a, np.generic) or a.dtype != want:
                got = f"np.{a.dtype.name}" if isinstance(a, np.generic) else f"Python {type(a).__name__}"
                raise self._arg_error(
                    i,
                    code,
                    f"expected np.{want.name}, got {got}. CuPy passes Python ints/floats as 64-bit values, so "
                    "a type mismatch would corrupt a real GPU launch: pass an explicit NumPy scalar",
                )
            else:
                buf = np.array(a, dtype=want)
            keep.append(buf)
            addresses.append(int(buf.ctypes.data))
        argv = (ctypes.c_void_p * max(1, len(addresses)))(*addresses)
        g = (ctypes.c_uint * 3)(*grid3)
        b = (ctypes.c_uint * 3)(*block3)
        rc = self._fn(g, b, int(shared_mem), argv, int(self.module.strict), self.module.timeout)
        del keep
        if rc:
            raise CudaCpuError(f"{self.name}: {self.module.last_error()}")
        self.launches += 1


def _describe(code: str) -> str:
    if code.endswith("*"):
        pointee = code[:-1]
        const = "const " if pointee.startswith("const ") else ""
        pointee = pointee.removeprefix("const ")
        return f"{const}{_C_NAMES.get(pointee, pointee)}*"
    return _C_NAMES.get(code, f"struct of {code}")
