"""The vectors LLVM generates for the cpu backend: 512-bit wherever the CPU has AVX-512.

The kernels' register blocks are sized by the vector width (common.WIDE_VECTORS): with AVX-512 a lane vector of 16
floats is one of 32 zmm registers, and a lane kernel keeps 4 pixels × 6 filters of accumulators in 24 of them
(conv2d.block_size). LLVM's tuning for Intel's AVX-512 cores (skylake-avx512, cascadelake, icelake-server,
sapphirerapids and later) prefers 256-bit vectors ("prefer-256-bit"): with Numba's defaults those CPUs get ymm code,
so the same tile needs up to 48 ymm registers of the 16 there are and spills, and no zmm FMA is left (Zen 4 has no
such tuning). Seen in the machine code of conv2d_pool_fwd's chunk functions compiled for those CPU names on
2026-12-07: 0 zmm FMAs; 24 and 16 with the tuning turned off (tests/test_cpu_target.py). Not timed on such a CPU:
none was available.

Numba makes its target machine once a process, from ``numba.config.CPU_FEATURES`` (NUMBA_CPU_FEATURES) or else
the host's features, when the first @njit function of the process is made. ``prefer_wide_vectors`` runs when the
cpu backend is imported, before its first @njit function: on a CPU with AVX-512, where the user has not set
NUMBA_CPU_FEATURES, it sets the host's features plus "-prefer-256-bit". That holds for every @njit function of the
process, the user's own included (only the width LLVM prefers changes, never what the code computes). Numba's cache
keys include the features, so these builds never mix with builds made without it. Where it cannot set them (the
user's NUMBA_CPU_FEATURES, or a target machine already made by an earlier @njit function in the process),
common.wide_vectors compiles a probe and reads its machine code, so the register blocks always follow the code that
is really generated.
"""

from __future__ import annotations

from numba.core import config, registry

#: "-prefer-256-bit": an LLVM subtarget feature of the X86 target (a tuning flag; "-" turns it off)
NO_256_PREFERENCE = "-prefer-256-bit"


def target_machine_made() -> bool:
    """Whether Numba's CPU target (its context, codegen and target machine) exists already in this process."""
    return "_toplevel_target_context" in registry.cpu_target.__dict__


def prefer_wide_vectors() -> str:
    """Give Numba the host's features plus "-prefer-256-bit" where the CPU has AVX-512 (module docstring). Returns
    "set", or why nothing was set."""
    if config.CPU_FEATURES is not None:
        return "NUMBA_CPU_FEATURES is set"
    if not config.ENABLE_AVX:
        return "NUMBA_ENABLE_AVX is off"
    if target_machine_made():
        return "Numba's target machine was made before the cpu backend was imported"
    import llvmlite.binding as ll

    try:
        features = ll.get_host_cpu_features()
    except RuntimeError:
        return "the host's CPU features are unreadable"
    if not features.get("avx512f"):
        return "no AVX-512"
    config.CPU_FEATURES = f"{features.flatten()},{NO_256_PREFERENCE}"
    return "set"


#: what prefer_wide_vectors did at import: "set", or why not
WIDE_CODE = prefer_wide_vectors()
