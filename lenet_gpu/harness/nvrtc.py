"""Compile CUDA C with NVRTC (no GPU or driver needed) and read the ptxas resource report.

NVRTC is the compiler CuPy's ``RawModule`` uses; ``cuda.bindings.nvrtc`` (from the ``cuda12``
extra, via ``numba-cuda[cu12]``) runs it on a machine with no GPU. ``--ptxas-options=-v`` puts
registers, spills, stack and shared memory per kernel in the log, which :func:`parse_ptxas_log`
turns into :class:`KernelResources`; :func:`theoretical_occupancy` follows the CUDA occupancy
calculator (``cuda_occupancy.h``).

Command line::

    python -m lenet_gpu.harness.nvrtc kernels/conv2d.cu --arch sm_80 sm_90 -DTILE=16
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CompileResult",
    "KernelResources",
    "NvrtcError",
    "compile_cuda",
    "max_active_blocks",
    "nvrtc_available",
    "nvrtc_version",
    "parse_ptxas_log",
    "theoretical_occupancy",
]

BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-lineinfo")


class NvrtcError(RuntimeError):
    """NVRTC is missing, rejected an option, or the source did not compile (the log is the message)."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


@dataclass
class KernelResources:
    """What ptxas reported for one kernel (entry function) on one architecture."""

    kernel: str  # the extern "C" name, or the demangled C++ name without parameters
    arch: str
    registers: int
    shared_bytes: int  # static shared memory
    stack_bytes: int  # stack frame
    spill_stores: int
    spill_loads: int
    barriers: int | None = None
    cmem_bytes: int | None = None  # constant banks on the "Used" line (kernel parameters: cmem[0])
    mangled: str = ""

    def occupancy(self, block_threads: int, dynamic_shared: int = 0) -> float:
        """Theoretical occupancy of this kernel at ``block_threads`` threads per block."""
        return theoretical_occupancy(self.registers, self.shared_bytes + dynamic_shared, block_threads, self.arch)


@dataclass
class CompileResult:
    ptx: str
    cubin: bytes | None  # None for a virtual architecture (compute_XX)
    log: str
    kernels: list[KernelResources]
    arch: str = ""
    lowered_names: dict[str, str] = field(default_factory=dict)  # name expression -> mangled name


# --------------------------------------------------------------------------------------------- NVRTC


def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise NvrtcError("cuda.bindings.nvrtc is not installed (pip install 'lenet_gpu[cuda12]' brings it)") from e
    return nvrtc


def _check(result: tuple[Any, ...], what: str) -> Any:
    nvrtc = _nvrtc()
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


@functools.lru_cache(maxsize=1)
def nvrtc_available() -> bool:
    """Whether NVRTC can be loaded (no GPU or driver is needed for compiling)."""
    try:
        nvrtc_version()
    except Exception:  # any failure to load means "not available"
        return False
    return True


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library."""
    major, minor = _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[str]:
    """Real architectures this NVRTC can compile for, e.g. ``["sm_50", ..., "sm_90", ...]``."""
    return [f"sm_{a}" for a in _check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def _get_bytes(prog: Any, size_fn: Any, get_fn: Any, what: str) -> bytes:
    size = _check(size_fn(prog), what)
    # a mutable buffer: NVRTC writes into it. (Writing into ``b" " * size`` corrupted Python: for an empty
    # log, size 1, that is the interned single-space bytes object shared by the whole process.)
    buf = bytearray(size)
    _check(get_fn(prog, buf), what)
    return bytes(buf)


def _clean_log(raw: bytes) -> str:
    return raw.decode(errors="replace").rstrip("\x00").rstrip()


_WARNING_LINE = re.compile(r"^(?!Remark).*\bwarning\b", re.IGNORECASE | re.MULTILINE)


#: successful compiles of this process, by (source digest, name, options, name expressions): the test suite
#: and the reports compile the same module with the same options several times (NVRTC takes up to ~15 s for
#: lenet_fwd.cu); a result is the same bytes every time, and a failure is never kept
_COMPILED: dict[tuple, tuple[str, bytes | None, str, dict[str, str]]] = {}
_COMPILED_MAX = 128


def _compile_program(src: str, prog_name: str, opts: list[str], name_expressions: Sequence[str],
                     arch: str) -> tuple[str, bytes | None, str, dict[str, str]]:
    """One NVRTC compile: (PTX, CUBIN or None, the cleaned log, lowered names). Raises NvrtcError."""
    nvrtc = _nvrtc()
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), prog_name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr!r})")
        encoded = [o.encode() for o in opts]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        log = _clean_log(_get_bytes(prog, nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, "log"))
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC failed to compile {prog_name} for {arch} ({err.name}):\n{log}", log)
        ptx = _get_bytes(prog, nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, "PTX").rstrip(b"\x00").decode()
        cubin = None
        if arch.startswith("sm_"):
            cubin = _get_bytes(prog, nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, "CUBIN")
        lowered = {
            expr: _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), "nvrtcGetLoweredName").decode()
            for expr in name_expressions
        }
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx, cubin, log, lowered


def compile_cuda(
    src: str | None = None,
    *,
    path: str | Path | None = None,
    arch: str = "sm_90",
    options: Sequence[str] = (),
    include_dirs: Sequence[str | Path] = (),
    warnings_as_errors: bool = True,
    name_expressions: Sequence[str] = (),
) -> CompileResult:
    """Compiles CUDA C with NVRTC for ``arch`` and returns PTX, CUBIN, log and per-kernel resources.

    Args:
        src: the source text (or give ``path``).
        path: a ``.cu`` file; its folder is added to the include path (``#include "common.cuh"``).
        arch: ``sm_XX`` (PTX + CUBIN + ptxas report) or ``compute_XX`` (PTX only).
        options: more NVRTC options, the same tuple as for ``cupy.RawModule`` (``-DNAME=VALUE``,
            ``-Idir``, ...). ``-std=c++17``, ``--ptxas-options=-v`` and ``-lineinfo`` are always
            added (a ``-std`` given here wins).
        include_dirs: more include folders.
        warnings_as_errors: NVRTC 12 has no ``-Werror``; any ``warning`` line in the log (front
            end or ptxas) raises :class:`NvrtcError`.
        name_expressions: template instantiations to compile, e.g. ``"scale<float, 128>"``; their
            kernels are reported under these names.
    """
    if (src is None) == (path is None):
        raise ValueError("give exactly one of src or path=")
    if path is not None:
        path = Path(path)
        src = path.read_text()
        prog_name = str(path)
        dirs = [path.resolve().parent]
    else:
        prog_name = "<source>.cu"
        dirs = []
    assert src is not None
    dirs += [Path(d).resolve() for d in include_dirs]
    opts = [f"--gpu-architecture={arch}"]
    opts += [
        o for o in BASE_OPTIONS if not (o.startswith("-std") and any(u.startswith(("-std", "--std")) for u in options))
    ]
    opts += [f"-I{d}" for d in dirs]
    opts += list(options)

    key = (hashlib.sha256(src.encode()).hexdigest(), prog_name, tuple(opts), tuple(name_expressions))
    hit = _COMPILED.get(key)
    if hit is None:
        hit = _compile_program(src, prog_name, opts, name_expressions, arch)
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = hit
    ptx, cubin, log, lowered = hit
    if warnings_as_errors and _WARNING_LINE.search(log):
        raise NvrtcError(f"NVRTC warnings for {prog_name} ({arch}), treated as errors:\n{log}", log)
    kernels = parse_ptxas_log(log, arch)
    display = {mangled: expr for expr, mangled in lowered.items()}
    for k in kernels:
        if k.mangled in display:
            k.kernel = display[k.mangled]
    return CompileResult(ptx=ptx, cubin=cubin, log=log, kernels=kernels, arch=arch, lowered_names=lowered)


# --------------------------------------------------------------------------------------------- ptxas log

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[\d+\]")


@functools.lru_cache(maxsize=1)
def _cxa_demangle() -> Any:
    for name in ("libstdc++.so.6", ctypes.util.find_library("stdc++")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            fn = lib.__cxa_demangle
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        return fn
    return None


def demangle(name: str) -> str:
    """``_Z2tkIfLi128EEvPKT_PS0_i`` -> ``tk<float, 128>``; other names are returned unchanged."""
    if not name.startswith("_Z"):
        return name
    fn = _cxa_demangle()
    if fn is None:
        return name
    status = ctypes.c_int()
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not ptr:
        return name
    try:
        full = ctypes.string_at(ptr).decode()
    finally:
        ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return _strip_signature(full)


def _strip_signature(full: str) -> str:
    """``void tk<float, 128>(float const*, float*, int)`` -> ``tk<float, 128>``."""
    depth = 0
    cut = len(full)
    for i in range(len(full) - 1, -1, -1):  # the parameter list is the last top-level (...)
        c = full[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    head = full[:cut]
    depth = 0
    for i in range(len(head) - 1, -1, -1):  # drop a return type: the last top-level space
        c = head[i]
        if c == ">":
            depth += 1
        elif c == "<":
            depth -= 1
        elif c == " " and depth == 0:
            return head[i + 1 :]
    return head


def parse_ptxas_log(log: str, arch: str) -> list[KernelResources]:
    """Per-kernel resources from the ``--ptxas-options=-v`` part of an NVRTC (or nvcc) log.

    Only entry functions are reported; the properties of non-inlined device functions are skipped.
    """
    out: list[KernelResources] = []
    current: KernelResources | None = None
    props_for: str | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = KernelResources(
                kernel=demangle(m[1]),
                arch=m[2] or arch,
                registers=0,
                shared_bytes=0,
                stack_bytes=0,
                spill_stores=0,
                spill_loads=0,
                mangled=m[1],
            )
            out.append(current)
            props_for = None
        elif m := _PROPS.search(line):
            props_for = m[1]
        elif (m := _FRAME.search(line)) and current is not None and props_for == current.mangled:
            current.stack_bytes, current.spill_stores, current.spill_loads = int(m[1]), int(m[2]), int(m[3])
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m[1])
            if b := _BARRIERS.search(line):
                current.barriers = int(b[1])
            if s := _SMEM.search(line):
                current.shared_bytes = int(s[1])
            cm = _CMEM.findall(line)
            if cm:
                current.cmem_bytes = sum(int(c) for c in cm)
    return out


# --------------------------------------------------------------------------------------------- occupancy


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits used by the CUDA occupancy calculator (cuda_occupancy.h, CUDA 12.9)."""

    max_threads_per_sm: int
    max_blocks_per_sm: int
    smem_per_sm: int
    smem_per_block_optin: int
    smem_alloc_unit: int = 128
    reserved_smem_per_block: int = 1024
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256
    max_regs_per_thread: int = 255
    sub_partitions: int = 4


KiB = 1024
ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_70": ArchLimits(2048, 32, 96 * KiB, 96 * KiB, 256, 0),
    "sm_75": ArchLimits(1024, 16, 64 * KiB, 64 * KiB, 256, 0),
    "sm_80": ArchLimits(2048, 32, 164 * KiB, 163 * KiB),
    "sm_86": ArchLimits(1536, 16, 100 * KiB, 99 * KiB),
    "sm_89": ArchLimits(1536, 24, 100 * KiB, 99 * KiB),
    "sm_90": ArchLimits(2048, 32, 228 * KiB, 227 * KiB),
}


def _limits(arch: str) -> ArchLimits:
    key = re.sub(r"^(?:sm|compute)_(\d+)[a-z]?$", r"sm_\1", arch)
    if key not in ARCH_LIMITS:
        raise ValueError(f"no occupancy limits for {arch!r}; known: {sorted(ARCH_LIMITS)}")
    return ARCH_LIMITS[key]


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def max_active_blocks(registers: int, shared_bytes: int, block_threads: int, arch: str = "sm_90") -> tuple[int, str]:
    """Resident blocks per SM and the binding limit (``"warps"``, ``"registers"``,
    ``"shared memory"`` or ``"blocks"``), as ``cudaOccupancyMaxActiveBlocksPerMultiprocessor``
    computes it with the default carveout. ``shared_bytes`` is static + dynamic shared memory
    per block (more than 48 KiB assumes the opt-in attribute is set)."""
    if not 1 <= block_threads <= 1024:
        raise ValueError(f"block_threads must be in [1, 1024], got {block_threads}")
    if registers < 0 or shared_bytes < 0:
        raise ValueError("registers and shared_bytes must be non-negative")
    lim = _limits(arch)
    warps_per_block = -(-block_threads // 32)
    limits: dict[str, int] = {
        "blocks": lim.max_blocks_per_sm,
        "warps": (lim.max_threads_per_sm // 32) // warps_per_block,
    }
    # registers: allocated per warp, per sub-partition (cudaOccMaxBlocksPerSMRegsLimit)
    regs_per_warp = _round_up(registers * 32, lim.reg_alloc_unit)
    if registers > lim.max_regs_per_thread or regs_per_warp * _round_up(warps_per_block, lim.sub_partitions) > (
        lim.regs_per_block
    ):
        limits["registers"] = 0
    elif regs_per_warp:
        warps_per_sub = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        limits["registers"] = (warps_per_sub * lim.sub_partitions) // warps_per_block
    # shared memory (cudaOccMaxBlocksPerSMSmemLimit)
    smem_per_block = _round_up(shared_bytes + lim.reserved_smem_per_block, lim.smem_alloc_unit)
    if smem_per_block > lim.smem_per_block_optin + lim.reserved_smem_per_block:
        limits["shared memory"] = 0
    elif smem_per_block:
        limits["shared memory"] = lim.smem_per_sm // smem_per_block
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


def theoretical_occupancy(registers: int, shared_bytes: int, block_threads: int, arch: str = "sm_90") -> float:
    """Fraction (0..1) of the SM's warp slots that resident blocks fill (the CUDA occupancy
    calculator's figure): ``blocks * ceil(block_threads / 32) / (max threads per SM / 32)``.
    0.0 when the block cannot launch (too many registers or too much shared memory)."""
    blocks, _ = max_active_blocks(registers, shared_bytes, block_threads, arch)
    lim = _limits(arch)
    return blocks * -(-block_threads // 32) / (lim.max_threads_per_sm // 32)


# --------------------------------------------------------------------------------------------- CLI


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lenet_gpu.harness.nvrtc",
        description="Compile CUDA C files with NVRTC (no GPU needed) and print each kernel's registers, "
        "shared memory, stack, spills and theoretical occupancy.",
    )
    parser.add_argument("files", nargs="+", type=Path, help=".cu files")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="architectures (default: sm_80 sm_90)")
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]", help="macro")
    parser.add_argument("-I", dest="includes", action="append", default=[], metavar="DIR", help="include folder")
    parser.add_argument(
        "--name-expression", action="append", default=[], metavar="EXPR", help="template kernel to instantiate"
    )
    parser.add_argument("--block", type=int, default=256, help="threads per block for the occupancy column")
    parser.add_argument("--allow-warnings", action="store_true", help="do not fail on compiler warnings")
    parser.add_argument("--fail-on-spills", action="store_true", help="exit 1 if any kernel spills registers")
    args = parser.parse_args(argv)
    if not nvrtc_available():
        print("NVRTC is not available (install the cuda12 extra)", file=sys.stderr)
        return 2
    options = [f"-D{d}" for d in args.defines]
    rows = [["kernel", "arch", "regs", "smem B", "stack B", "spill st/ld", "barriers", f"occ@{args.block}"]]
    status = 0
    for f in args.files:
        for arch in args.arch:
            try:
                res = compile_cuda(
                    path=f,
                    arch=arch,
                    options=options,
                    include_dirs=args.includes,
                    warnings_as_errors=not args.allow_warnings,
                    name_expressions=args.name_expression,
                )
            except NvrtcError as e:
                print(e, file=sys.stderr)
                status = 1
                continue
            for k in res.kernels:
                try:
                    occ = f"{k.occupancy(args.block):.0%}"
                except ValueError:
                    occ = "-"
                rows.append(
                    [
                        f"{f.name}:{k.kernel}",
                        k.arch,
                        str(k.registers),
                        str(k.shared_bytes),
                        str(k.stack_bytes),
                        f"{k.spill_stores}/{k.spill_loads}",
                        "-" if k.barriers is None else str(k.barriers),
                        occ,
                    ]
                )
                if args.fail_on_spills and (k.spill_stores or k.spill_loads):
                    status = 1
    if len(rows) > 1:
        print(_table(rows))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
