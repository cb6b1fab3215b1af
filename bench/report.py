"""Write the benchmark results: ``results.json`` (every number), ``report.md`` and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (AttributeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_all(results: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (unless ``plots`` is False) the PNGs; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if plots:
        try:
            results["plots"] = [p.name for p in write_plots(results, out)]
        except ImportError as e:
            results["plots"] = []
            results.setdefault("errors", []).append({"section": "plots", "error": f"matplotlib missing: {e}"})
    js = out / "results.json"
    js.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    paths.append(js)
    md = out / "report.md"
    md.write_text(markdown(results))
    paths.append(md)
    paths += [out / p for p in results.get("plots", [])]
    return paths


# ---------------------------------------------------------------------------------------- formatting


def _si(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    for scale, pre in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {pre}{unit}"
    return f"{v:.3g} {unit}".strip()


def _t(s: float | None) -> str:
    """Seconds as µs / ms / s with 3 significant digits."""
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _cell(r: dict[str, Any], c: str) -> str:
    v = r.get(c)
    if v is None:
        return "—"
    if c == "occupancy" and isinstance(v, float) and v <= 1:
        return f"{v:.0%}"
    return str(v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _is_gpu(res: dict[str, Any], backend: str) -> bool:
    return bool((res.get("backends") or {}).get(backend, {}).get("is_gpu"))


def _peak_of(res: dict[str, Any], backend: str) -> tuple[float | None, str]:
    """The FP32 peak a backend's GFLOP/s are set beside: an H100's for a GPU backend, the CPU's own
    (estimated) for a CPU backend."""
    peaks = res.get("peaks") or {}
    if _is_gpu(res, backend):
        return peaks.get("h100_fp32_flops"), "H100 FP32"
    cpu = peaks.get("cpu_fp32") or {}
    return cpu.get("flops"), "CPU FP32 (est.)"


def _ratio(q: dict[str, Any]) -> str:
    """A throughput ratio with its p20–p80; marked unreliable, never bare, when either side's rounds spread more
    than 25 % (lenet_gpu.perf.timing.RATIO_MAX_SPREAD)."""
    txt = f"{q['median']:.2f} ({q['p20']:.2f}–{q['p80']:.2f})"
    if q.get("reliable", True):
        return f"**{txt}**"
    return (f"unreliable: {txt}, rounds spread {q.get('ours_spread', float('nan')):.0%} (ours) / "
            f"{q.get('theirs_spread', float('nan')):.0%} (peer)")


def _spread(v: dict[str, Any]) -> str:
    return f" ±{v['spread'] / 2:.0%}" if v.get("spread") is not None else ""


def _where(r: dict[str, Any]) -> str:
    keys = ("section", "backend", "peer", "op", "site", "variant", "batch")
    return " ".join(f"{k} {r[k]}" if k == "batch" else str(r[k]) for k in keys if r.get(k) is not None)


def _status(res: dict[str, Any]) -> str:
    """The verdict at the top: FAILED with every failure, or OK."""
    errs = res.get("errors") or []
    if errs:
        lines = [f"\n**FAILED: {len(errs)} failure{'s' if len(errs) > 1 else ''}** (a case that crashed or failed "
                 "its validation, or a section that raised; exit status 1):\n\n"]
        lines += [f"- {_where(e)}: {str(e.get('error', '')).splitlines()[0] if e.get('error') else ''}\n"
                  for e in errs]
        return "".join(lines)
    n = len(res.get("skipped") or [])
    return (f"\n**OK**: every case ran and passed its validation, or was skipped for a reason that is not an error "
            f"({n} skipped, listed below).\n")


def _headline(res: dict[str, Any]) -> str:
    """Each of our backends against the FASTEST PyTorch mode measured beside it, at each batch size."""
    out = []
    for kind, title in (("train", "training step"), ("forward", "inference (kernel only, device-resident)"),
                        ("infer-host", "inference through the API from host arrays (copies included)"),
                        ("infer-device", "inference through the API from device arrays (no host copy)")):
        rows = [r for r in res.get(kind) or [] if r.get("fastest_peer")]
        if not rows:
            continue
        lines = []
        for r in rows:
            p = r["fastest_peer"]
            v = r["peers"][p]
            lines.append([r["backend"], str(r["batch"]), f"{_rate(r['images_per_s'])}{_spread(r)}", p,
                          f"{_rate(v['images_per_s'])}{_spread(v)}", _ratio(v["ratio"])])
        out.append(f"\n### {title}: ours / fastest PyTorch mode, images/s\n\n")
        out.append(_table(["backend", "batch", "ours img/s", "fastest PyTorch", "its img/s", "ours/it (p20–p80)"],
                          lines))
    return "".join(out)


def _e2e_table(rows: list[dict[str, Any]], forward: bool, res: dict[str, Any] | None = None) -> str:
    peer_names = sorted({p for r in rows for p in r.get("peers", {})})
    head = ["backend", "batch", "ours images/s (p20–p80)"]
    for p in peer_names:
        head += [f"{p} images/s", f"ours/{p} (p20–p80)"]
    if forward:
        head += ["ours GFLOP/s", "of the peak (CPU: its own, est.; GPU: H100)"]
    out = []
    for r in rows:
        line = [r["backend"], str(r["batch"]),
                f"{_rate(r['images_per_s'])} ({_rate(r['images_per_s_p20'])}–{_rate(r['images_per_s_p80'])})"
                f"{_spread(r)}"]
        for p in peer_names:
            pv = r.get("peers", {}).get(p)
            if pv is None:
                line += ["—", "—"]
            else:
                line += [f"{_rate(pv['images_per_s'])}{_spread(pv)}", _ratio(pv["ratio"])]
        if forward:
            peak, _ = _peak_of(res or {}, r["backend"])
            line += [f"{r.get('gflops', 0):.2f}", f"{100 * r.get('gflops', 0) * 1e9 / peak:.2g}%" if peak else "—"]
        out.append(line)
    return _table(head, out)


def _summary(res: dict[str, Any]) -> str:
    """One line per training batch size and per largest forward batch: ours, the peer, the ratio."""
    lines = []
    fwd = res.get("forward") or []
    picks = [("training step", r) for r in res.get("train") or []]
    for name in dict.fromkeys(r["backend"] for r in fwd):
        rows = [r for r in fwd if r["backend"] == name]
        picks.append(("forward", max(rows, key=lambda r: r["batch"])))
    for what, r in picks:
        line = (f"- {r['backend']} {what}, batch {r['batch']}: **{_rate(r['images_per_s'])} images/s** "
                f"(p20–p80 {_rate(r['images_per_s_p20'])}–{_rate(r['images_per_s_p80'])})")
        if "images_per_s_best" in r:
            line += f", best sample {_rate(r['images_per_s_best'])}"
        for p, v in r.get("peers", {}).items():
            line += (f"; {p} {_rate(v['images_per_s'])} images/s{_spread(v)}"
                     + (f" (best {_rate(v['images_per_s_best'])})" if "images_per_s_best" in v else "")
                     + f"; ours/{p} {_ratio(v['ratio'])}")
        lines.append(line + "\n")
    ep = res.get("epoch") or {}
    for name, run in (ep.get("runs") or {}).items():
        if ep.get("target_acc") is None:
            tt = f"test accuracy {run['final_test_acc']:.4f} after {len(run['epochs'])} epoch(s)"
        elif run.get("reached_target"):
            tt = f"{_t(run['time_to_target_s'])} to {ep['target_acc']:.1%} ({run['epochs_to_target']} epochs)"
        else:
            tt = f"{ep['target_acc']:.1%} not reached in {len(run['epochs'])} epochs"
        lines.append(f"- {name} epoch ({ep['train_images']} images, batch {run['batch']}): "
                     f"{_t(run['epoch_s_median'])}; {tt}\n")
    return "".join(lines)


def markdown(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    tor = res.get("torch")
    load = res.get("load", {})
    s: list[str] = ["# lenet_gpu benchmark report\n", _status(res), "\n"]
    s.append(f"- date: {res.get('date')} (UTC), {res.get('wall_s', 0):.0f} s in all\n")
    s.append(f"- command: `{res.get('command')}`\n")
    git = m.get("git") or {}
    s.append(f"- code: commit {git.get('commit', '?')[:12]} on {git.get('branch', '?')}"
             f"{' (with uncommitted changes)' if git.get('dirty') else ''}\n")
    s.append(f"- machine: {m.get('cpu')}, {m.get('cpus_usable')} usable of {m.get('cpus')} CPUs, "
             f"{m.get('memory_gb')} GB; {m.get('platform')}; Python {m.get('python')}, NumPy {m.get('numpy')} "
             f"(BLAS {m.get('blas', {}).get('name')} {m.get('blas', {}).get('version')}, threads: "
             f"{m.get('blas', {}).get('threads')})\n")
    gpu = m.get("gpu")
    s.append(f"- GPU: {gpu['name']} (sm_{gpu['sm']}, {gpu['memory_gb']} GB)\n" if gpu else "- GPU: none\n")
    if tor:
        s.append(f"- peer: PyTorch {tor['version']}, torch.get_num_threads() = {tor['threads']} "
                 f"(interop {tor['interop_threads']}), mkldnn {tor['mkldnn']}"
                 f"{', cuDNN ' + str(tor.get('cudnn')) if tor.get('cuda') else ''}\n")
    else:
        s.append(f"- peer: {res.get('torch_note')}\n")
    note = str(load.get("note") or "")
    if load.get("busy") and note.startswith("busy"):
        note = "**busy**" + note[len("busy"):]
    lb, la = load.get("loadavg_before"), load.get("loadavg_after")
    s.append(
        f"- machine load: {note}. Calibration workload {_t(load.get('calibration_start_s'))} at start, "
        f"{_t(load.get('calibration_end_s'))} at end; 1-minute load average {f'{lb[0]:.2f}' if lb else '?'} "
        f"before, {f'{la[0]:.2f}' if la else '?'} after (this run included)\n"
    )
    st = res.get("settings", {})
    if st.get("clock") == "cpu":
        s.append("- clock: **CPU time of this process** (time.process_time) with one thread everywhere "
                 "(OPENBLAS/OMP/MKL_NUM_THREADS=1, torch.set_num_threads(1)): what the work costs on one core, "
                 "largely independent of other load on the machine; images/s are per core\n")
    else:
        s.append("- clock: wall time (time.perf_counter) on the CPU; device events per op on a GPU\n")
    peaks = res.get("peaks", {})
    measured = [b for b, i in res.get("backends", {}).items() if i.get("available")]
    cpu_peak = peaks.get("cpu_fp32")
    if any(not _is_gpu(res, b) for b in measured) or not measured:
        s.append(f"- CPU FP32 peak, an estimate from /proc/cpuinfo: {cpu_peak['formula']} (clock: "
                 f"{cpu_peak['clock_source']}); the CPU backends' GFLOP/s are set beside it\n" if cpu_peak else
                 "- CPU FP32 peak: not estimated (no /proc/cpuinfo with flags and clock)\n")
    if any(_is_gpu(res, b) for b in measured):
        s.append(f"- GPU floors: {peaks.get('note')}\n")
    ds = res.get("dataset")
    if ds:
        s.append(f"- end-to-end data: {ds['name']} training images ({ds['images_resident']} resident on the "
                 f"backend, normalised with mean {ds['mean']:.4f}, std {ds['std']:.4f})\n")
    s.append("\nRatios are throughput ours/peer (> 1: ours is faster), taken round by round from alternating "
             "rounds (ours, peer, peer, ours, …) in this one run; the median and p20–p80 of the per-round "
             "ratios are shown. ±x% after a figure is half its p20–p80 spread over the rounds; a ratio whose "
             "either side spreads more than 25% is marked unreliable.\n")
    headline = _headline(res)
    if headline:
        s.append("\n## Headline\n" + headline)

    summary = _summary(res)
    if summary:
        s.append("\n## Summary\n\n" + summary)

    for b, info in res.get("backends", {}).items():
        if not info.get("available"):
            s.append(f"\n> backend **{b}** not measured: {info.get('reason')}\n")

    if res.get("forward"):
        s.append("\n## Inference, kernel only (device-resident uint8 images in, logits left on the device, one sync "
                 "per timed block: lenet_fwd where the backend has it, else batch_prepare + the forward ops), "
                 "images/s\n\n")
        s.append(_e2e_table(res["forward"], True, res))
    if res.get("infer-host"):
        s.append("\n## Inference through the API from host arrays (host uint8 images in, host logits out, copies "
                 "included: ours `model.logits`, PyTorch `.to(device)` → network → `.cpu()`), images/s\n\n")
        s.append(_e2e_table(res["infer-host"], True, res))
    if res.get("infer-device"):
        s.append("\n## Inference through the API from device arrays (a device uint8 array in, logits of the same kind "
                 "out, no host copy: ours `model.logits` on a CuPy / Numba device array; PyTorch its network on "
                 "resident device tensors), images/s\n\n")
        s.append(_e2e_table(res["infer-device"], True, res))
    if res.get("train"):
        s.append("\n## Training step (batch_prepare, forward, backward, Adam), images/s\n\n")
        s.append(_e2e_table(res["train"], False))

    ep = res.get("epoch")
    if ep:
        r = ep["recipe"]
        target = ep.get("target_acc")
        s.append(f"\n## Epochs and time to {target:.1%} test accuracy\n\n" if target is not None else
                 "\n## Epoch time\n\n(--quick: one epoch; time to accuracy is measured by the full run)\n\n")
        s.append(f"{ep['dataset']}: {ep['train_images']} training / {ep['test_images']} test images; recipe: "
                 f"{r['optimizer']} peak lr {r['lr']:g} {r['schedule']} over {r['epochs']} epochs, batch "
                 f"{r['batch_size']}, seed {r['seed']}, last partial batch dropped; at most {ep['max_epochs']} "
                 "epochs run here; no augmentation. Times are training only (evaluation after each epoch "
                 "excluded); the PyTorch run starts from the same initial parameters and sees the same "
                 "batches.\n\n")
        rows = []
        for name, run in ep["runs"].items():
            rows.append([name, _t(run["epoch_s_median"]), _rate(run["epochs"][0]["images_per_s"]),
                         str(len(run["epochs"])), f"{run['final_test_acc']:.4f}"]
                        + ([_t(run.get("time_to_target_s")) if run["reached_target"] else "not reached",
                            str(run.get("epochs_to_target", "—"))] if target is not None else []))
        s.append(_table(["run", "epoch time (median)", "images/s (epoch 1)", "epochs run", "final test acc"]
                        + (["time to target", "epochs to target"] if target is not None else []), rows))
        for sk in ep.get("skipped", []):
            s.append(f"\n- {sk['backend']}: skipped ({sk['reason']})")
        s.append("\n")

    cnt = res.get("counters")
    if cnt and cnt.get("backends"):
        s.append(f"\n## Counters (batch {cnt['batch']}, after warm-up)\n\n")
        rows = []
        for name, d in cnt["backends"].items():
            for what, c in d.items():
                rows.append([name, what, str(c["launches"]), str(c["h2d"]), str(c["d2h"]), str(c["allocs"]),
                             str(c["syncs"])])
        s.append(_table(["backend", "what", "launches", "h2d copies", "d2h copies", "allocations", "syncs"], rows))
        s.append("\n`train_step` and `forward` are the device-resident path of the training program; the "
                 "`host_batch` rows use the host-array API (train_step(images, labels), logits(images)).\n")
        for sk in cnt.get("skipped", []):
            s.append(f"- {sk['backend']}: skipped ({sk['reason']})\n")

    if res.get("profile"):
        s.append("\n## Where a training step's time goes\n\n")
        s.append("Per backend and training batch: the kernels inside the graphed step from CUPTI (a GPU with PyTorch), "
                 "or each kernel launch of the step recorded once and replayed on its own (CUDA events on a GPU, "
                 "the CPU clock on a host backend; numpy and cpu list no launches, so their rows are op calls), "
                 "their sum against the wall time of a step. A sum above the step's time means the replayed "
                 "launches ran slower alone (cold caches, a CPU backend's threads) than inside the step.\n")
        for r in res["profile"]:
            s.append(f"\n### {r['backend']}, batch {r['batch']} ({r.get('source')})\n\n")
            s.append(f"{_t(r['device_us_sum'] * 1e-6)} in the rows against {_t(r['wall_us'] * 1e-6)} a step "
                     f"(their sum is {r['device_fraction']:.0%} of it).\n\n" if r.get("device_fraction") is not None
                     else "\n")
            total = r["device_us_sum"] or 1.0
            s.append(_table(["kernel or op", "calls", "launches", "time a step", "share"],
                            [[k["kernel"], f"{k['calls']:g}", str(k.get("launches", "—")), _t(k["device_us"] * 1e-6),
                              f"{k['device_us'] / total:.0%}"] for k in r["kernels"][:12]]))

    if res.get("ops"):
        s.append("\n## Per-op kernels\n\n")
        s.append("Each op at each LeNet call site (C1 … OUT), validated against the float64 reference before "
                 "it is timed. GFLOP/s and GB/s use the formulas in lenet_gpu/perf/ops.py (compulsory traffic). "
                 "A CPU backend's GFLOP/s are set beside this CPU's own FP32 peak (the estimate above); a GPU "
                 "backend's time beside the H100 floor of that op ('floor/time': how close it comes). "
                 "`*` marks the backend's default variant. GPU rows: one launch per sample, L2 flushed "
                 "before each; the 'hot' column is back-to-back launches.\n")
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for r in res["ops"]:
            by_backend.setdefault(r["backend"], []).append(r)
        for name, rows_ in by_backend.items():
            gpu_rows = any("hot_median_s" in r for r in rows_)
            on_gpu = _is_gpu(res, name) or gpu_rows
            head = ["op", "site", "variant", "batch", "median (p20–p80)"]
            if gpu_rows:
                head.append("hot")
            head += ["GFLOP/s", "GB/s"] + (["H100 floor", "floor/time"] if on_gpu else ["of CPU FP32 peak (est.)"])
            out = []
            for r in rows_:
                line = [r["op"], r["site"], r["variant"] + ("*" if r.get("default") else ""),
                        "—" if r["batch"] is None else str(r["batch"]),
                        f"{_t(r['median_s'])} ({_t(r['p20_s'])}–{_t(r['p80_s'])})"]
                if gpu_rows:
                    line.append(_t(r.get("hot_median_s")))
                line += [f"{r['gflops']:.3g}", f"{r['gbs']:.3g}"]
                if on_gpu:
                    line += [_t(r["floor_s"]), f"{r['floor_frac']:.2%}"]
                else:
                    line.append(f"{100 * r['cpu_peak_frac']:.2g}%" if r.get("cpu_peak_frac") is not None else "—")
                out.append(line)
            s.append(f"\n### {name} ({rows_[0]['timer']})\n\n")
            s.append(_table(head, out))

    k = res.get("kernels")
    if k is not None:
        s.append("\n## Static kernel table (sm_90)\n\n")
        if not k.get("available"):
            s.append(f"Not available: {k.get('note')}\n")
        else:
            s.append(f"From {k.get('source')}: {k.get('note')}.\n\n")
            cols = ["backend", "op", "kernel", "variant", "registers", "shared_bytes", "stack_bytes",
                    "spill_stores", "spill_loads", "block_threads", "occupancy"]
            # beside each kernel: its measured time on the GPU (largest batch, first site), when there is one
            measured: dict[tuple, dict[str, Any]] = {}
            for r in res.get("ops") or []:
                if r.get("timer") != "cuda-events":
                    continue
                key = (r["backend"], r["op"], r["variant"])
                if key not in measured or (r["batch"] or 0) > (measured[key]["batch"] or 0):
                    measured[key] = r
            rows = []
            for r in k["records"]:
                m = measured.get((r.get("backend"), r.get("op"), r.get("variant")))
                t = f"{_t(m['median_s'])} ({m['site']}, b={m['batch']})" if m else "—"
                rows.append([_cell(r, c) for c in cols] + [t])
            s.append(_table([*cols, "measured on GPU"], rows))

    if res.get("fill") is not None:
        from .launches import fill_markdown

        md = fill_markdown(res["fill"]["rows"], res["fill"].get("notes", ()))
        s.append("\n" + md.replace("# Launch fill", "## Launch fill", 1))

    if res.get("host"):
        from .host import markdown as host_markdown

        s.append(host_markdown(res["host"]))

    sk = res.get("skipped", [])
    if sk:
        s.append("\n## Skipped cases (reasons that are not errors)\n\n")
        for r in sk:
            s.append(f"- {_where(r)}: {r['reason'].splitlines()[0]}\n")
    for note in res.get("peer_notes", []):
        s.append(f"- peer: {note}\n")
    if res.get("errors"):
        s.append("\n## Failures\n\n")
        for e in res["errors"]:
            s.append(f"- {_where(e)}: {e['error']}\n")
            if e.get("traceback"):
                s.append("\n```\n" + e["traceback"].rstrip() + "\n```\n\n")

    s.append("\n## Method\n\n")
    s.append(
        "- CPU: `time.perf_counter` around N calls then `backend.synchronize()`, N chosen so a sample lasts "
        "≥ 1 ms (per op) or ≥ the end-to-end sample time; warm-up first; median with p20/p80.\n"
        "- GPU per op: device events on the backend's stream around one launch, the L2 flushed (2× its size, "
        "written several times so the device is busy while the launch is enqueued) before each; warm-up; "
        "median with p20/p80. End to end: perf_counter around N steps plus a device sync.\n"
        "- Validation: every op at every site, batch and variant is checked against lenet_gpu.reference "
        "(float64) with lenet_gpu/parity.py's tolerances, outputs NaN-poisoned first; the forward logits and one "
        "step's gradients at every end-to-end batch size are checked against a float64 composition of the "
        "reference ops, computed afresh from that backend's own parameters; the PyTorch model's logits against "
        "the same reference.\n"
        "- Cases whose estimated time exceeds the per-case budget (from the same series at a smaller batch) "
        "are skipped and listed above.\n"
    )
    return "".join(s)


# ---------------------------------------------------------------------------------------- plots


def write_plots(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    # throughput vs batch size, per backend and peer
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in ((axes[0], "forward", "forward pass"), (axes[1], "train", "training step")):
        rows = res.get(kind) or []
        series: dict[str, list[tuple[int, float, float, float]]] = {}
        for r in rows:
            series.setdefault(r["backend"], []).append(
                (r["batch"], r["images_per_s"], r["images_per_s_p20"], r["images_per_s_p80"]))
            for p, v in r.get("peers", {}).items():
                ips = v["images_per_s"]
                lo, hi = r["batch"] / v["p80_s"], r["batch"] / v["p20_s"]
                series.setdefault(p, [])
                if all(b != r["batch"] for b, *_ in series[p]):
                    series[p].append((r["batch"], ips, lo, hi))
        for name, pts in series.items():
            pts.sort()
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name,
                        linestyle="--" if name.startswith("torch") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(f"LeNet-5 {title}")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # per-kernel bars, one figure per backend, at the largest batch measured for every op of it
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in res.get("ops") or []:
        by_backend.setdefault(r["backend"], []).append(r)
    for name, rows in by_backend.items():
        batches = sorted({r["batch"] for r in rows if r["batch"] is not None})
        pick = batches[-1] if batches else None
        sel = [r for r in rows if r["batch"] in (pick, None)]
        labels = [f"{r['op']} {r['site']} {r['variant']}{'*' if r.get('default') else ''}" for r in sel]
        times = [r["median_s"] * 1e6 for r in sel]
        peak, peak_name = _peak_of(res, name)
        if _is_gpu(res, name):
            floors, floor_label = [r["floor_s"] * 1e6 for r in sel], "H100 floor"
        elif peak:
            floors, floor_label = [r["flops"] / peak * 1e6 for r in sel], "at this CPU's FP32 peak (est.)"
        else:
            floors, floor_label = [], ""
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(sel) + 1.6))
        ys = list(range(len(sel)))
        ax.barh(ys, times, color="tab:blue", label="measured (median)")
        ax.errorbar(times, ys, xerr=[[r["median_s"] * 1e6 - r["p20_s"] * 1e6 for r in sel],
                                     [r["p80_s"] * 1e6 - r["median_s"] * 1e6 for r in sel]],
                    fmt="none", ecolor="black", capsize=2)
        if floors:
            ax.scatter(floors, ys, color="tab:red", marker="|", s=200, zorder=3, label=floor_label)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("µs per call")
        ax.set_title(f"{name}: per-kernel time at batch {pick} (optimizer ops: whole parameter buffer)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        p = out / f"ops_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
