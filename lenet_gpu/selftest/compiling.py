"""What the compile phase compiles for the cupy backend, and how it reads the result.

The cupy backend builds a kernel module with the defines its launch planner chooses per launch (K_BLOCK and
C_BLOCK of conv2d.cu, HEAD_ROWS of head.cu: ``Launch.defines``), not with ``MODULE_DEFINES`` as written (where
0 means "chosen per launch"). So the phase compiles exactly the define sets of LeNet-5's launches at the batch
sizes the self-test runs (``planned_option_sets``: the model driven over a runtime that computes nothing and
records each launch), and checks separately that each module compiled with ``MODULE_DEFINES`` as written either
compiles or stops at ``#error`` lines that name a define set to 0 (``defaults_outcome``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

#: training batch sizes the self-test runs (whole steps: 2, 33, 64, 128; training 64; benchmark 64 .. 4096)
TRAIN_BATCHES = (2, 33, 64, 128, 256, 1024, 4096)
#: inference batch sizes (evaluation: 1000, the trainer's default; logits: 1024; the benchmark's batches; 10,000:
#: the test set, where lenet_fwd's plan takes v4's 16-image blocks)
INFER_BATCHES = (2, 64, 256, 1000, 1024, 4096, 10_000)


OptionSets = dict[tuple[str, tuple[str, ...]], list[str]]


def planned_option_sets(sm_count: int, train_batches: tuple[int, ...] = TRAIN_BATCHES,
                        infer_batches: tuple[int, ...] = INFER_BATCHES,
                        defines: dict[str, dict[str, int]] | None = None) -> OptionSets:
    """(kernel file stem, compile options) → kernels launched with them, over every cupy variant (the four-kernel,
    the nine-op routed and the dense fused step, unfused, adam and sgd): one training step at each of
    ``train_batches`` and an inference pass at each of ``infer_batches``, planned for ``sm_count`` SMs. These
    are the modules a run of the self-test builds."""
    from ..backends.cupy_backend import OP_KERNELS, CupyBackend
    from ..backends.cupy_backend.compile_report import RecordingRuntime
    from ..model import LeNet5

    rt = RecordingRuntime()
    depth = max(len(vs) for _, vs in OP_KERNELS.values())
    most = max(max(train_batches), max(infer_batches))
    images = np.zeros((most, 28, 28), np.uint8)
    labels = np.zeros(most, np.uint8)
    for i in range(depth):
        chosen = {op: vs[min(i, len(vs) - 1)] for op, (_, vs) in OP_KERNELS.items()}
        # the four-kernel step (max pooling's default; adam and sgd), the nine-op routed step, the dense fused step
        # and the unfused one
        for fused, optimizer, routed, step4 in ((True, "adam", "auto", "auto"), (True, "sgd", "auto", "auto"),
                                                (True, "adam", "auto", False), (True, "adam", False, False),
                                                (False, "sgd", False, False)):
            be = CupyBackend(runtime=rt, fused=fused, variants=chosen, defines=defines, graphs=False,
                             sm_count=sm_count)
            for b in train_batches:
                model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused, routed=routed,
                               step4=step4)
                data = model.upload_dataset(images[:b], labels[:b])
                model.begin_run(data, b, shift=2)
                model.run_steps(data, 1)
            model = LeNet5(backend=be, optimizer=optimizer, use_graphs=False, fused=fused)
            for b in infer_batches:
                model.logits(images[:b], batch_size=b)
    out: OptionSets = {}
    for stem, options, name in rt.launched:
        names = out.setdefault((stem, options), [])
        if name not in names:
            names.append(name)
    return {k: sorted(v) for k, v in sorted(out.items())}


def short_defines(options: tuple[str, ...] | list[str]) -> str:
    """``("-DC_BLOCK=6", "-DJ_BLOCK=13")`` → ``"C_BLOCK=6 J_BLOCK=13"`` ("" for none)."""
    return " ".join(o[2:] for o in options if o.startswith("-D"))


_ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)
#: a compiler echoing the source line under a diagnostic (g++: "   70 | #error ...", NVRTC: "  #error ...")
_ECHO = re.compile(r"^\s*(?:\d+\s*)?\|?\s*(?:#\s*error\b|\^|\|)")
_HASH_ERROR = re.compile(r'#error(?: directive:)?\s*"?([^"\n]*)')


def defaults_outcome(error_text: str | None, defines: dict[str, int]) -> tuple[bool, str]:
    """Whether a module compiled with ``defines`` (MODULE_DEFINES as written, 0 = chosen per launch) behaved:
    (True, "compiles") when ``error_text`` is None; (True, the #error's message) when every error of the log is
    an ``#error`` that names a define given as 0; else (False, why)."""
    if error_text is None:
        return True, "compiles"
    errors = [ln for ln in error_text.splitlines()
              if _ERROR_LINE.search(ln) and not _ECHO.match(ln)
              and "error detected" not in ln and "errors detected" not in ln and "failed" not in ln.lower()]
    messages = [m[1].strip() for ln in errors if (m := _HASH_ERROR.search(ln))]
    zero = sorted(k for k, v in defines.items() if not v)
    if not errors:
        return False, "the compile failed without an error line:\n" + error_text[-800:]
    if len(messages) != len(errors):
        return False, ("errors other than an #error naming the define to set:\n"
                       + "\n".join(errors[:6]))
    unnamed = [m for m in messages if not any(re.search(rf"\b{z}\b", m) for z in zero)]
    if unnamed:
        return False, f"#error that names no define given as 0 ({', '.join(zero) or 'none'}): {unnamed[0]}"
    return True, "; ".join(f"#error: {m}" for m in messages)


def ptxas_facts(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The ptxas figures of kernel ``name`` from ``{arch: CompileResult}``: {arch: {registers, ...}}."""
    out: dict[str, Any] = {}
    for arch, res in results.items():
        k = next((k for k in res.kernels if k.kernel == name), None)
        if k is None:
            raise AssertionError(f"{name}: not in the ptxas report for {arch}")
        out[arch] = {"registers": k.registers, "static_shared_bytes": k.shared_bytes, "stack_bytes": k.stack_bytes,
                     "spill_stores": k.spill_stores, "spill_loads": k.spill_loads}
    return out
