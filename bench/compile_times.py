"""What a first run compiles, and what each compile costs: every Numba specialisation that the model's first
training step compiles (then, with ``--infer``, its first inference), in a fresh process with an empty cache,
serially (LENET_GPU_COMPILE_AHEAD=0), in CPU seconds of this process (the compile runs on one core; CPU
time does not grow with other processes' load the way wall-clock time does).

    python -m bench.compile_times                 # the default model: relu, max pooling, adam, routed step
    python -m bench.compile_times --infer --json out.json
    python -m bench.compile_times --option pool=avg

"excl" is a specialisation's own compile, "incl" with the kernels it calls (compiled inside it, the first
time they are called); a top-level kernel's "incl" is what it costs the first step. Numba compiles a
parallel kernel's loop body again into a gufunc and its two wrappers, each linking in (and optimising and
generating machine code again for) every function the body calls: that is most of a top-level kernel's own
("excl") time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from numba.core import event
args = json.loads(sys.argv[1])
recs, stack = [], []

class Listener(event.Listener):
    def on_start(self, ev):
        stack.append([time.process_time(), 0.0])

    def on_end(self, ev):
        t0, child = stack.pop()
        dt = time.process_time() - t0
        if stack:
            stack[-1][1] += dt
        d = ev.data["dispatcher"]
        recs.append({"kernel": d.py_func.__module__.rsplit(".", 1)[-1] + "." + d.py_func.__qualname__.replace(
            ".<locals>.", ":"), "sig": str(ev.data.get("args")), "incl": dt, "excl": dt - child,
            "depth": len(stack), "phase": phase})

event.register("numba:compile", Listener())
c0 = time.process_time()
import numpy as np
from lenet_gpu.model import LeNet5
imports = time.process_time() - c0
m = LeNet5(backend="cpu", **args["options"])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (args["batch"], 28, 28), dtype=np.uint8)
y = rng.integers(0, 10, args["batch"]).astype(np.uint8)
phase = "step"
c1 = time.process_time()
m.train_step(x, y)
step = time.process_time() - c1
infer = None
if args["infer"]:
    phase = "infer"
    c2 = time.process_time()
    m.logits(x, batch_size=args["batch"])
    infer = time.process_time() - c2
print(json.dumps({"imports_cpu_s": imports, "first_step_cpu_s": step, "first_infer_cpu_s": infer,
                  "compiles": recs}))
"""


def _value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def run(options: dict[str, Any], batch: int, infer: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp, PYTHONPATH=str(ROOT), LENET_GPU_COMPILE_AHEAD="0")
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"options": options, "batch": batch,
                                                                      "infer": infer})],
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--infer", action="store_true", help="then the first inference (lenet_fwd)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a LeNet5 option (activation=tanh, pool=avg, optimizer=sgd, ...)")
    ap.add_argument("--all", action="store_true", help="list every specialisation, not only those over 0.05 s")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    options = {k: _value(v) for k, v in (o.split("=", 1) for o in args.option)}
    out = run(options, args.batch, args.infer)
    recs = out["compiles"]
    print(f"imports {out['imports_cpu_s']:.2f} s CPU; first step {out['first_step_cpu_s']:.2f} s CPU"
          + (f"; first inference {out['first_infer_cpu_s']:.2f} s CPU" if args.infer else ""))
    print(f"{'incl':>6} {'excl':>6}  phase  kernel (signature)")
    for r in sorted(recs, key=lambda r: (r["depth"] > 0, -r["incl"] if r["depth"] == 0 else -r["excl"])):
        if args.all or r["excl"] >= 0.05 or r["depth"] == 0:
            tag = "" if r["depth"] == 0 else "  " * r["depth"]
            print(f"{r['incl']:6.2f} {r['excl']:6.2f}  {r['phase']:5s}  {tag}{r['kernel']} {r['sig'][:90]}")
    for phase in ("step", "infer"):
        top = [r for r in recs if r["phase"] == phase and r["depth"] == 0]
        if top:
            print(f"{phase}: {len([r for r in recs if r['phase'] == phase])} specialisations, {len(top)} top-level, "
                  f"{sum(r['incl'] for r in top):.2f} s CPU compiling")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
