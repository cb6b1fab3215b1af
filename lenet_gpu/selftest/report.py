"""results.json and report.md of the self-test: PASS or FAIL per phase, the first lines of every failure,
and each phase's figures as tables. Both are rewritten (atomically) after every phase."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import FAIL, PASS, PHASES, SKIP, TITLES, atomic_write, first_lines, to_jsonable

FORMAT = "lenet_gpu-selftest"
VERSION = 1


def phase_status(res: dict[str, Any] | None) -> str:
    """PASS (something passed and nothing failed), FAIL (a case failed, or the phase crashed, was killed or
    left no results), SKIP (nothing ran: all skipped), NOT RUN."""
    if not res:
        return "NOT RUN"
    if res.get("crash") or res.get("killed") or res.get("missing") or res.get("interrupted"):
        return "FAIL"
    counts = res.get("counts", {})
    if counts.get(FAIL, 0):
        return "FAIL"
    if counts.get(PASS, 0):
        return "PASS"
    return "SKIP"


def failures(results: dict[str, Any]) -> list[dict[str, str]]:
    """Every failure: (phase, what, first lines)."""
    out = []
    for name in PHASES:
        res = results["phases"].get(name)
        if not res:
            continue
        for key, what in (("crash", "the phase crashed"), ("killed", "the phase was killed"),
                          ("missing", "the phase left no results"), ("interrupted", "interrupted")):
            if res.get(key):
                text = res[key] if isinstance(res[key], str) else res.get("log_tail", "")
                out.append({"phase": name, "what": what, "lines": first_lines(text, 12)})
        for c in res.get("cases", []):
            if c.get("status") == FAIL:
                out.append({"phase": name, "what": c["name"], "lines": first_lines(c.get("error", ""), 12)})
    return out


def waived_gates(results: dict[str, Any]) -> list[dict[str, str]]:
    """Every gate a phase said it did not apply (its data's ``waived_gates``): (phase, what)."""
    return [{"phase": name, "what": w} for name in PHASES
            for w in ((results["phases"].get(name) or {}).get("data") or {}).get("waived_gates") or []]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The summary phase: overall status, counts over all phases, every failure."""
    statuses = {name: phase_status(results["phases"].get(name)) for name in PHASES if name != "summary"}
    counts = {s: 0 for s in (PASS, FAIL, SKIP)}
    for name in statuses:
        for s, n in (results["phases"].get(name) or {}).get("counts", {}).items():
            counts[s] = counts.get(s, 0) + n
    ran = [s for s in statuses.values() if s != "NOT RUN"]
    overall = "FAIL" if "FAIL" in ran else ("PASS" if "PASS" in ran else "SKIP")
    return {"status": overall, "phase_statuses": statuses, "counts": counts, "failures": failures(results),
            "waived_gates": waived_gates(results)}


def write(out: Path, results: dict[str, Any]) -> None:
    """results.json and report.md, each atomically."""
    for name, res in results["phases"].items():
        if name != "summary" and res is not None:
            res["status"] = phase_status(res)
    atomic_write(out / "results.json", json.dumps(to_jsonable(results), indent=1) + "\n")
    atomic_write(out / "report.md", render(results))


# ------------------------------------------------------------------------------------ markdown
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return lines + [""]


def _cases(res: dict | None) -> list[dict]:
    return (res or {}).get("cases", [])


def _env_section(res: dict) -> list[str]:
    d = res.get("data", {})
    gpu = d.get("gpu") or {}
    rows = []
    if gpu:
        rows += [["GPU", f"{gpu.get('name')} (compute capability {gpu.get('compute_capability')}, "
                         f"{gpu.get('sm_count')} SMs, {gpu.get('memory_gib', '?')} GiB)"],
                 ["CUDA driver / runtime / NVRTC",
                  f"{gpu.get('driver')} / {gpu.get('runtime')} / {gpu.get('nvrtc', '–')}"]]
    else:
        rows.append(["GPU", "none (emulated run)" if "gpu" in d else "–"])
    rows += [["Python", d.get("python")], ["platform", d.get("platform")], ["CPUs", d.get("cpu_count")]]
    lg = d.get("lenet_gpu") or {}
    rows.append(["lenet_gpu", f"{lg.get('version')} at {lg.get('path')}" + (f" (commit {lg['commit']})"
                                                                           if lg.get("commit") else "")])
    for k, v in (d.get("packages") or {}).items():
        rows.append([k, v])
    tc = d.get("numba_toolchain") or {}
    for k, v in tc.items():
        rows.append([f"numba {k}", v])
    lines = _table(["", ""], rows)
    be_rows = [[c.get("backend"), c["status"].upper(), c.get("backend_class"), c.get("is_gpu"),
                ", ".join(f"{op} {'/'.join(v)}" for op, v in (c.get("variants") or {}).items()) or c.get("error", "")]
               for c in _cases(res) if c.get("backend")]
    return lines + _table(["backend", "status", "class", "GPU", "ops and variants"], be_rows)


def _spills(c: dict) -> Any:
    if "spill_stores" not in c:
        return None
    return f"{c['spill_stores']} / {c['spill_loads']}"


def _compile_section(res: dict) -> list[str]:
    cases = _cases(res)
    kernels = [c for c in cases if c.get("check") not in ("defaults", "nvrtc")]
    rows = [[c.get("backend"), c.get("module", ""), c.get("defines", ""), c.get("kernel", c["name"]),
             c["status"].upper(), c.get("registers"), c.get("static_shared_bytes"), c.get("local_bytes"), _spills(c),
             c.get("f64_instructions"), c.get("seconds")] for c in kernels]
    arch = (res.get("data") or {}).get("arch") or {}
    head = [f"Architectures: {', '.join(f'{k} {v}' for k, v in arch.items())}. The cupy modules are built with "
            "the define sets the launch planner gives LeNet-5's launches at the self-test's batch sizes (2 to 4096); "
            "registers, static shared memory, local memory (CuPy's attributes on a GPU; else ptxas's stack frame) "
            "and spills (ptxas, stores / loads) per kernel × define set; emulated, the figures are sm_90's and "
            "results.json has sm_80's too.", ""] if arch else []
    lines = head + _table(["backend", "module", "defines", "kernel", "status", "registers", "static smem (B)",
                           "local (B)", "spills (B)", "f64 lines", "s"], rows)
    defaults = [c for c in cases if c.get("check") == "defaults"]
    if defaults:
        lines += ["Each module compiled with MODULE_DEFINES as written (0 = chosen per launch): it must compile, or "
                  "stop at an #error that names the define to set.", ""]
        lines += _table(["backend", "module", "defines", "status", "outcome"],
                        [[c.get("backend"), c.get("module"), c.get("defines", ""), c["status"].upper(),
                          c.get("outcome") or c.get("error") or c.get("reason", "")] for c in defaults])
    nvrtc = [c for c in cases if c.get("check") == "nvrtc"]
    if nvrtc:
        lines += ["NVRTC (no GPU needed) of each define set, per architecture:", ""]
        lines += _table(["backend", "module", "defines", "arch", "status", "kernels", "max registers", "spills (B)",
                         "s"], [[c.get("backend"), c.get("module"), c.get("defines", ""), c.get("arch"),
                                 c["status"].upper(), c.get("kernels"), c.get("max_registers"), c.get("spills"),
                                 c.get("seconds")] for c in nvrtc])
    return lines


def _parity_section(res: dict) -> list[str]:
    groups: dict[tuple, dict[str, Any]] = {}
    for c in _cases(res):
        if not c.get("op"):
            continue
        g = groups.setdefault((c["op"], c.get("variant") or "", c.get("backend")),
                              {PASS: 0, FAIL: 0, SKIP: 0, "ratio": 0.0, "abs": 0.0})
        g[c["status"]] += int(c.get("count", 1))
        if c["status"] == PASS:
            g["ratio"] = max(g["ratio"], float(c.get("worst_ratio") or 0.0))
            g["abs"] = max(g["abs"], float(c.get("max_abs") or 0.0))
    rows = [[op, v, be, g[PASS], g[FAIL], g[SKIP], g["ratio"], g["abs"]] for (op, v, be), g in groups.items()]
    note = ["Worst error per op × variant × backend over its passing cases: |out − ref| / (atol + rtol·|ref|) "
            "(≤ 1 passes; results.json has every case) and the largest |out − ref|.", ""]
    return note + _table(["op", "variant", "backend", "pass", "fail", "skip", "worst err / bound", "max |err|"], rows)


def _whole_step_section(res: dict) -> list[str]:
    rows = []
    for c in _cases(res):
        fig = ""
        if c.get("per_step"):
            ps = c["per_step"]
            fig = (f"{ps.get('launches', 0):.1f} launches/step, allocs {ps.get('allocs', 0):g}, "
                   f"h2d {ps.get('h2d', 0):g}, d2h {ps.get('d2h', 0):g}, syncs {ps.get('syncs', 0):g}; "
                   f"{c['step_seconds'] * 1e3:.3g} ms/step "
                   f"({_fmt(c.get('images_per_s'))} img/s)")
        elif "worst_ratio" in c:
            fig = f"worst err/bound {_fmt(c['worst_ratio'])}"
        elif c.get("message") or c.get("note"):
            fig = c.get("message") or c.get("note")
        rows.append([c["name"], c["status"].upper(), fig or c.get("reason", ""), c.get("seconds")])
    return _table(["check", "status", "figures", "s"], rows)


def _times_to(c: dict) -> str:
    tt = c.get("time_to_acc") or {}
    return "; ".join(f"{float(t):.0%}: {_fmt(v)}" for t, v in tt.items()) if tt else ""


def _acc_at(c: dict) -> Any:
    return next(iter((c.get("acc_at_epoch") or {}).values()), None)


def _gate(c: dict) -> str:
    if c.get("waived"):
        return "waived (see below)"
    return f"≥ {c['gate']:.0%}" if c.get("gate") else "none"


def _training_section(res: dict) -> list[str]:
    runs = [c for c in _cases(res) if c.get("kind") not in ("first_step", "peer")]
    rows = [[c.get("backend"), c.get("dataset"), c["status"].upper(), _gate(c), c.get("epochs"),
             c.get("final_test_acc"), _acc_at(c), _times_to(c), c.get("images_per_s"), c.get("first_epoch_s"),
             c.get("train_seconds"), c.get("wall_s")] for c in runs]
    rows += [["torch (peer)", c.get("dataset"), c["status"].upper(), "none", c.get("epochs"), c.get("final_test_acc"),
              _acc_at(c), _times_to(c), None, None, c.get("train_seconds"), None]
             for c in _cases(res) if c.get("kind") == "peer"]
    note = ["Time to accuracy: training seconds (the metrics' per-epoch seconds, summed) until the end of the first "
            "epoch whose test accuracy reaches it (mnist-sample 97 % and 98 %, MNIST 98 % and 99 %, Fashion-MNIST "
            "88 %, 90 % and 91 %; – = not reached); the first epoch includes compiling the kernels (Numba's JIT). "
            "Each run's checkpoint, metrics and log are under train/.", ""]
    lines = note + _table(["backend", "dataset", "status", "gate", "epochs", "final test acc", "acc @ 10 epochs",
                           "s to accuracy", "img/s (median epoch)", "1st epoch s", "train s", "wall s"], rows)
    first = [c for c in _cases(res) if c.get("kind") == "first_step"]
    if first:
        lines += ["The first training step in a new process (batch 64), with the backend's compile cache empty and "
                  "then warm: start = imports, backend and data; first step = model set-up, begin_run/begin_epoch "
                  "and one step (what compiles on first use); next step = the second step.", ""]
        lines += _table(["backend", "cache", "status", "start s", "first step s", "next step s", "process s"],
                        [[c.get("backend"), c.get("cache"), c["status"].upper(), c.get("start_s"),
                          c.get("first_step_s") if "first_step_s" in c else c.get("reason") or c.get("error", ""),
                          c.get("next_step_s"), c.get("process_s")] for c in first])
    waived = (res.get("data") or {}).get("waived_gates") or []
    if waived:
        lines += ["Waived gates:", "", *(f"- {w}" for w in waived), ""]
    return lines


#: a ratio of two throughputs is unreliable when either side's rounds spread (p80 − p20)/median more than this
#: (lenet_gpu.perf.timing.RATIO_MAX_SPREAD)
RATIO_MAX_SPREAD = 0.25
#: the throughput figures of a model or peer case: (field prefix, title)
THROUGHPUTS = (("train_", "training step"), ("infer_kernel_", "inference, kernel only (device-resident)"),
               ("infer_host_api_", "inference through the API from host arrays (copies included)"))


def _ips(c: dict, prefix: str) -> str:
    v = c.get(f"{prefix}images_per_s")
    if v is None:
        return "–"
    sp = c.get(f"{prefix}spread")
    return _fmt(v) + (f" ±{sp / 2:.0%}" if isinstance(sp, (int, float)) else "")


def _ratio_cell(ours: dict, peer: dict, prefix: str) -> str:
    a, b = ours.get(f"{prefix}images_per_s"), peer.get(f"{prefix}images_per_s")
    if not a or not b:
        return "–"
    r = f"{a / b:.2f}"
    sa, sb = ours.get(f"{prefix}spread"), peer.get(f"{prefix}spread")
    if sa is None or sb is None or sa > RATIO_MAX_SPREAD or sb > RATIO_MAX_SPREAD:
        return f"unreliable: {r} (rounds spread {_fmt(sa)} / {_fmt(sb)})"
    return f"**{r}**"


def _headline(model: list[dict], peers: list[dict]) -> list[str]:
    """Each of our backends against the FASTEST PyTorch mode at each batch size, for each way of timing."""
    lines: list[str] = []
    for prefix, title in THROUGHPUTS:
        rows = []
        for c in model:
            if c["status"] != PASS:
                continue
            cands = [p for p in peers if p["status"] == PASS and p.get("batch") == c.get("batch")
                     and p.get(f"{prefix}images_per_s")]
            if not cands:
                continue
            best = max(cands, key=lambda p: p[f"{prefix}images_per_s"])
            rows.append([c.get("batch"), c.get("backend"), _ips(c, prefix), f"torch {best.get('mode')}",
                         _ips(best, prefix), _ratio_cell(c, best, prefix)])
        if rows:
            lines += [f"**{title}**: ours against the fastest PyTorch mode at each batch size (images/s; ±x % is half "
                      "the p20–p80 spread of the timed rounds; a ratio is marked unreliable when either side "
                      f"spreads more than {RATIO_MAX_SPREAD:.0%}).", ""]
            lines += _table(["batch", "ours", "ours img/s", "fastest PyTorch", "its img/s", "ours / it"], rows)
    return lines


def _profile_lines(cases: list[dict]) -> list[str]:
    """Device µs per kernel inside a step (CUPTI via torch.profiler; without PyTorch, each recorded kernel launch
    replayed between CUDA events): the sum against the wall time, the top 10."""
    lines: list[str] = []
    for c in cases:
        if c["status"] != PASS:
            lines += [f"- {c['name']}: {c['status'].upper()} ({c.get('reason') or first_lines(c.get('error', ''), 2)})"]
            continue
        lines += ["", f"**{c['name']}** ({c.get('source')}): kernels {_fmt(c.get('device_us_sum'))} µs of device time "
                  f"per {'step' if c.get('what') == 'train' else 'pass'} against {_fmt(c.get('wall_us'))} µs of wall "
                  f"time ({_fmt(c.get('device_fraction'))} of it).", ""]
        lines += _table(["kernel", "calls", "device µs"],
                        [[k["kernel"], k["calls"], k["device_us"]] for k in (c.get("kernels") or [])[:10]])
    return lines + ([""] if lines else [])


def _bench_section(res: dict) -> list[str]:
    d = res.get("data") or {}
    model = [c for c in _cases(res) if c.get("kind") == "model"]
    peers = [c for c in _cases(res) if c.get("kind") == "peer"]
    lines: list[str] = []
    head = _headline(model, peers)
    if head:
        lines += ["### Headline", ""] + head
    ops = [c for c in _cases(res) if c.get("kind") == "op"]
    rows = [[c.get("op"), c.get("layer"), c.get("variant"), c.get("backend"), c["status"].upper(),
             f"{_fmt(c.get('median_us'))} ({_fmt(c.get('p20_us'))}–{_fmt(c.get('p80_us'))})" if "median_us" in c
             else c.get("reason", c.get("error", "")), c.get("hot_median_us")] for c in ops]
    lines += [f"Per-op times at batch {d.get('op_batch')} (timers: "
              f"{', '.join(f'{k} {v}' for k, v in (d.get('timers') or {}).items())}): median (p20–p80) µs per launch. "
              "cuda-events: cold = one launch after an L2 flush (the device's time, unless the host takes longer to "
              "issue the launch than the flush takes to run); hot = back-to-back launches (for small kernels, the "
              "host's launch rate); perf_counter: host wall clock around calls and a synchronize.", ""]
    lines += _table(["op", "layer", "variant", "backend", "status", "µs cold", "µs hot"], rows)
    mrows = [[c.get("batch"), c.get("backend") or (f"torch {c['mode']} ({c.get('device', '')})" if c.get("mode")
                                                    else "torch"), c["status"].upper(),
              *(_ips(c, p) for p, _ in THROUGHPUTS),
              _ips(c, "infer_device_api_") if c.get("infer_device_api_images_per_s")
              else c.get("infer_device_api") or c.get("reason") or c.get("error", ""),
              c.get("train_first_call_s")] for c in model + peers]
    lines += _profile_lines([c for c in _cases(res) if c.get("kind") == "profile"])
    torch = d.get("torch")
    lines += ["End to end, images/s (median of the timed rounds, ±half their p20–p80 spread). Training: steps over a "
              "resident dataset (ours: graphs of K steps where the backend has them; torch graph: the whole step — "
              "gather, forward, loss, backward, Adam — as one CUDA graph). Inference, kernel only: resident uint8 "
              "images in, logits left on the device, one sync per timed block. Inference through the API from device "
              "arrays: model.logits on a device uint8 array, logits returned as an array of the same kind. "
              "Inference through the API from host "
              "arrays: host uint8 images in, host logits out, copies included. No figure includes a loss computed "
              "on the host. The first call (compilation, graph capture) is in 'first call s'.", ""]
    if torch:
        lines += [f"PyTorch {torch.get('version')} on {torch.get('device')}"
                  + (f", cuDNN {torch['cudnn']}" if torch.get("cudnn") else "")
                  + (f"; modes {', '.join(torch['modes'])}" if torch.get("modes") else "") + ".", ""]
    return lines + _table(["batch", "who", "status", "training", "inference: kernel only",
                           "inference: API, host arrays", "inference: API, device arrays", "first call s"], mrows)


SECTIONS = {"environment": _env_section, "compile": _compile_section, "op_parity": _parity_section,
            "whole_step": _whole_step_section, "training": _training_section, "benchmark": _bench_section}


def render(results: dict[str, Any]) -> str:
    summ = summarize(results)
    env = (results["phases"].get("environment") or {}).get("data") or {}
    gpu = env.get("gpu")
    where = (f"{gpu.get('name')} (sm {gpu.get('compute_capability')}, {gpu.get('sm_count')} SMs, driver "
             f"{gpu.get('driver')}, runtime {gpu.get('runtime')})" if gpu else
             (f"no GPU: emulated ({', '.join(results.get('backends', []))})" if results.get("mode") == "emulate"
              else "–"))
    lines = [
        "# lenet_gpu self-test", "",
        f"**{summ['status']}** — {results.get('started', '')}; {where}; "
        f"backends {', '.join(results.get('backends', []))}; "
        f"budget {results.get('budget_s')} s, {_fmt(results.get('elapsed_s'))} s so far"
        + (" (finished)" if results.get("finished") else " (running)") + ".", "",
        f"Command: `{results.get('command', '')}`", "",
    ]
    rows = []
    for i, name in enumerate(PHASES, 1):
        res = results["phases"].get(name)
        if name == "summary":
            rows.append([f"{i}. {TITLES[name]}", summ["status"] if results.get("finished") else "NOT RUN", "", "", "",
                         "", "", ""])
            continue
        c = (res or {}).get("counts", {})
        note = "; ".join((res or {}).get("notes", [])[:1]) if res else ""
        rows.append([f"{i}. {TITLES[name]}", phase_status(res), (res or {}).get("seconds"), (res or {}).get("budget_s"),
                     c.get(PASS), c.get(FAIL), c.get(SKIP), note])
    lines += _table(["phase", "status", "s", "budget s", "pass", "fail", "skip", "note"], rows)
    if summ["failures"]:
        lines += ["## Failures", ""]
        for f in summ["failures"]:
            lines += [f"- **{f['phase']}**: {f['what']}", "", "  ```", *("  " + ln for ln in f["lines"].splitlines()),
                      "  ```", ""]
    waived = waived_gates(results)
    if waived:
        lines += ["## Waived gates", "", "Gates that this run does not test (it passes without them):", "",
                  *(f"- **{w['phase']}**: {w['what']}" for w in waived), ""]
    for i, name in enumerate(PHASES, 1):
        res = results["phases"].get(name)
        if name == "summary" or not res:
            continue
        lines += [f"## {i}. {TITLES[name]} — {phase_status(res)}", ""]
        for n in res.get("notes", []):
            lines += [f"_{n}_", ""]
        try:
            lines += SECTIONS[name](res)
        except Exception as e:  # noqa: BLE001 - a report must render whatever a phase left
            lines += [f"(could not render this section: {type(e).__name__}: {e})", ""]
    return "\n".join(lines).rstrip() + "\n"
