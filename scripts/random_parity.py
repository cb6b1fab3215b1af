"""Every op × variant of a backend on random shapes, against the float64 reference: the shapes nobody chose.

    python scripts/random_parity.py --backend cupy-host --rounds 5
    NUMBA_ENABLE_CUDASIM=1 python scripts/random_parity.py --backend numba --rounds 2 --small
    python scripts/random_parity.py --backend cpu --ops conv2d_fwd,head_train --rounds 20 --seed 7

Each round draws, for every op the backend offers, one random input set through the self-test's builders
(lenet_gpu.selftest.checks): odd, non-square and one-wide maps and filters, every activation and pool mode, random
dense sizes and head geometries (LeNet-5's head at F6 = 10, 37, 84 or 128 a third of the time), step_bwd with more
groups than images. Every variant of the op runs on it through ``run_case`` (outputs poisoned with NaN, compared
with the op's tolerance, reductions launched twice and compared bit for bit). The same seed draws the same cases.

``--small`` keeps shapes tiny (the CUDA simulator runs a block's threads in Python: use it there). The exit status
is 1 when any case fails, and each failure is printed with its shapes. Run on demand; the suite runs the fixed-shape
matrix (tests/test_matrix.py), and tests/test_random_parity_script.py checks that this script still runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lenet_gpu.selftest import checks as C  # noqa: E402

ACTS = ("relu", "tanh", "lecun_tanh", "sigmoid")
MODES = ("max", "avg")


class Draw:
    """Random input sets of each op (``spec(op)``: (a builder of its Spec, a description) or None for an op with no
    random set here)."""

    def __init__(self, seed: int, small: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.small = small

    def r(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def pick(self, items: tuple | list) -> Any:
        return items[int(self.rng.integers(0, len(items)))]

    def conv(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        s = self.small
        n, c, k = self.r(1, 3), self.r(1, 4 if s else 8), self.r(1, 4 if s else 17)
        rr, ss = self.r(1, 5), self.r(1, 5)
        h, w = self.r(rr + 1, rr + (7 if s else 20)), self.r(ss + 1, ss + (7 if s else 20))
        return (n, c, h, w), (k, c, rr, ss)

    def pooled_conv(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A convolution whose output has at least one 2×2 window."""
        while True:
            xs, ws = self.conv()
            if xs[2] - ws[2] + 1 >= 2 and xs[3] - ws[3] + 1 >= 2:
                return xs, ws

    def spec(self, op: str) -> tuple[Callable[[], C.Spec], str] | None:
        s, a, m, seed = self.small, self.pick(ACTS), self.pick(MODES), self.r(0, 10**6)
        if op in ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"):
            xs, ws = self.conv()
            build = {"conv2d_fwd": lambda: C._conv2d_fwd(xs, ws, a, seed),
                     "conv2d_bwd_data": lambda: C._conv2d_bwd_data(xs, ws, seed),
                     "conv2d_bwd_weight": lambda: C._conv2d_bwd_weight(xs, ws, seed)}[op]
            return build, f"x{xs} w{ws} {a}"
        if op in ("conv2d_pool_fwd", "conv2d_bwd_weight_routed", "conv2d_bwd_data_routed"):
            xs, ws = self.pooled_conv()
            if op == "conv2d_pool_fwd":
                with_y = bool(self.r(0, 1))
                return (lambda: C._conv2d_pool_fwd(xs, ws, a, m, with_y, seed)), f"x{xs} w{ws} {a} {m} yconv={with_y}"
            if op == "conv2d_bwd_weight_routed":
                return (lambda: C._conv2d_bwd_weight_routed(xs, ws, seed)), f"x{xs} w{ws}"
            return (lambda: C._conv2d_bwd_data_routed(xs, ws, a, seed)), f"y_below{xs} w{ws} {a}"
        if op in ("pool2x2_fwd", "pool2x2_bwd"):
            xs = (self.r(1, 3), self.r(1, 6), self.r(2, 9 if s else 30), self.r(2, 9 if s else 30))
            if op == "pool2x2_fwd":
                return (lambda: C._pool2x2_fwd(xs, m, seed)), f"x{xs} {m}"
            return (lambda: C._pool2x2_bwd(xs, m, a, seed)), f"dz{xs} {m} {a}"
        if op in ("dense_fwd", "dense_bwd"):
            n, i, o = self.r(1, 5 if s else 70), self.r(1, 20 if s else 500), self.r(1, 20 if s else 130)
            aa = self.pick((*ACTS, "identity"))
            if op == "dense_fwd":
                return (lambda: C._dense_fwd(n, i, o, aa, seed)), f"({n},{i})->{o} {aa}"
            dx = bool(self.r(0, 1))
            return (lambda: C._dense_bwd(n, i, o, aa, dx, seed)), f"({n},{i})->{o} {aa} dx={dx}"
        if op == "softmax_xent":
            n, nc = self.r(1, 70), self.r(2, 12)
            return (lambda: C._softmax_xent(n, nc, seed)), f"({n},{nc})"
        if op == "conv2d_bwd_data_pool":
            n, k, c, rr, ph, pw = self.r(1, 3), self.r(1, 5), self.r(1, 4), self.r(1, 4), self.r(1, 4), self.r(1, 4)
            hh, ww = ph + rr - 1, pw + rr - 1  # the conv's input, pooled from yconv (odd sizes drop a row/column)
            ys = (n, c, 2 * hh + self.r(0, 1), 2 * ww + self.r(0, 1))
            dzs, ws = (n, k, ph, pw), (k, c, rr, rr)
            return (lambda: C._conv2d_bwd_data_pool(dzs, ws, ys, a, m, seed)), f"dz{dzs} w{ws} yconv{ys} {a} {m}"
        if op == "head_train":
            b, c, hp, wp = self.r(1, 5), self.r(1, 4), self.r(1, 4), self.r(1, 4)
            h, w = 2 * hp + self.r(0, 1), 2 * wp + self.r(0, 1)
            h1, h2 = self.r(1, 20 if s else 130), self.r(1, 20 if s else 100)
            if not s and self.r(0, 2) == 0:  # LeNet-5's head (the compiled geometries), F6 varied
                b, c, hp, wp, h, w, h1, h2 = self.r(1, 40), 16, 5, 5, 10, 10, 120, self.pick((84, 10, 37, 128))
            routed = m == "max" and bool(self.r(0, 1))
            dims = (b, c, hp, wp, h, w, h1, h2)
            return (lambda: C._head_train(*dims, a, m, seed, routed=routed)), f"{dims} {a} {m} routed={routed}"
        if op == "lenet_fwd":
            b = self.r(1, 3 if s else 40)
            return (lambda: C._lenet_fwd(b, a, m, seed)), f"batch {b} {a} {m}"
        if op == "step_fwd":
            b, off, sh = self.r(1, 3 if s else 40), self.r(0, 4), self.r(0, 3)
            return (lambda: C._step_fwd(b, off, sh, a, seed)), f"batch {b} offset {off} shift {sh} {a}"
        if op == "step_bwd":
            b = self.r(1, 3 if s else 40)
            g = self.r(1, b + 2)
            return (lambda: C._step_bwd(b, g, a, seed)), f"batch {b} groups {g} {a}"
        if op in ("step_adam", "step_sgd"):
            g, wd, b = self.r(1, 9), self.pick((0.0, 0.01)), self.r(1, 40)
            return (lambda: C._step_update(op, b, g, wd, seed)), f"{g} partial rows wd={wd}"
        if op in ("adam_step", "sgd_step"):
            size, wd, clamp = self.r(1, 5000), self.pick((0.0, 0.01)), bool(self.r(0, 1))
            make = C._adam_step if op == "adam_step" else C._sgd_step
            return (lambda: make(size, wd, clamp, seed)), f"n={size} wd={wd} clamp={clamp}"
        if op == "step_advance":
            b, wrap = self.r(1, 4096), bool(self.r(0, 1))
            return (lambda: C._step_advance(b, wrap)), f"batch {b}{' end of epoch' if wrap else ''}"
        if op == "batch_prepare":
            n = self.r(1, 120)
            b = self.r(1, n)
            off, sh, sd, ep = self.r(0, n - b), self.r(0, 3), self.r(-10**6, 10**6), self.r(0, 5)
            return (lambda: C._batch_prepare(n, b, off, sh, sd, ep, seed)), f"N={n} B={b} offset={off} shift={sh}"
        return None


def run(backend: Any, seed: int, rounds: int, ops: list[str] | None, small: bool,
        log: Callable[[str], None] = print) -> tuple[int, int]:
    """``rounds`` rounds of random input sets on ``backend``: (cases run, failures)."""
    draw = Draw(seed, small)
    names = [op for op in backend.variants if ops is None or op in ops]
    cases = failures = 0
    for rd in range(rounds):
        t0 = time.perf_counter()
        for op in names:
            got = draw.spec(op)
            if got is None:
                continue
            build, desc = got
            iset = C.InputSet(op, 0, desc, None, None, build)
            for v in backend.variants[op]:
                cases += 1
                try:
                    C.run_case(backend, op, v, iset)
                except Exception as e:  # noqa: BLE001 - every failure is reported, and the sweep goes on
                    failures += 1
                    log(f"FAIL {op}_{v} {desc}: {type(e).__name__}: {str(e)[:800]}")
            iset.release()
        log(f"round {rd + 1}/{rounds}: {len(names)} ops, {failures} failures so far ({time.perf_counter() - t0:.1f} s)")
    return cases, failures


def main(argv: list[str] | None = None) -> int:
    from lenet_gpu.backends import BackendUnavailable, get_backend

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backend", default="cupy-host", help="the backend to sweep (default cupy-host)")
    p.add_argument("--seed", type=int, default=0, help="the random seed: the same seed draws the same cases")
    p.add_argument("--rounds", type=int, default=3, help="input sets drawn per op (default 3)")
    p.add_argument("--ops", default="", help="a comma-separated list of ops (default: every op of the backend)")
    p.add_argument("--small", action="store_true", help="tiny shapes only (for the CUDA simulator)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    try:
        be = get_backend(args.backend)
    except (BackendUnavailable, ValueError) as e:
        print(f"random_parity: {e}", file=sys.stderr)
        return 2
    ops = [o for o in args.ops.split(",") if o] or None
    unknown = [o for o in ops or [] if o not in be.variants]
    if unknown:
        print(f"random_parity: {args.backend} has no op {', '.join(unknown)}", file=sys.stderr)
        return 2
    cases, failures = run(be, args.seed, args.rounds, ops, args.small)
    print(f"{cases} cases on {args.backend} (seed {args.seed}): {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
