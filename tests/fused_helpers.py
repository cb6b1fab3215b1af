"""Parity checks of the fused ops (head_train, lenet_fwd) against the float64 reference, for any backend.

Each check takes the op as a function ``fn(be, ...)`` with the protocol's signature (the backend-free wrappers of
cupy_backend/fused.py and numba_backend/head.py, lenet_fwd.py, or a bound backend method wrapped in a lambda),
builds seeded inputs, poisons every output with NaN (0xFF for uint8), launches once on device copies and compares
with lenet_gpu.reference (head_train, lenet_fwd) using tests/parity.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from lenet_gpu import reference as ref
from lenet_gpu.stepstate import STATE_WORDS, STEP, STEP_IN_EPOCH
from tests.cupy_helpers import Dev
from tests.parity import assert_close, assert_equal, nan_like, rand

F64 = np.float64

#: Tolerances (atol, rtol) of the fused ops, float32 kernels against the float64 reference. Every output of the
#: head is a chain of at most three dense products (sums of ≤ 400 O(1) terms, ~1e-7 relative rounding per term,
#: weights scaled 1/sqrt(fan-in) so each layer's values stay O(1)): the dense tolerance (1e-5, 1e-5). The gradients
#: are smaller: dz carries the 1/B of the mean loss, so dw/db (O(0.1)) and dz_conv (O(0.01)) get a smaller atol.
#: Measured on the harness (B = 7, LeNet sizes): h ≤ 2e-6, dw/db ≤ 1.4e-7, dz_conv ≤ 5e-9. The loss sum adds B
#: row losses of O(1).
TOL_HEAD = {
    "h1": (1e-5, 1e-5), "h2": (1e-5, 1e-5), "logits": (1e-5, 1e-5),
    "dw": (2e-6, 1e-5), "db": (2e-6, 1e-5), "dz_conv": (1e-6, 1e-5), "loss_sum": (1e-5, 1e-5),
}
#: lenet_fwd: the whole forward pass, five stages of sums of 25 to 400 O(1) terms: TOL["conv2d_fwd"] /
#: TOL["dense_fwd"] (1e-5, 1e-5) hold for the logits too (measured on the harness: errors ≤ 1e-6 at O(1) logits).
TOL_LENET_FWD = (1e-5, 1e-5)


def _d64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=F64)


class RuntimeShim:
    """What the fused cupy wrappers use of a backend, over a bare Runtime (HostRuntime or CupyRuntime): so these
    tests do not depend on the rest of CupyBackend."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.counters = runtime.counters
        self._scratch: dict = {}
        self.default_variants: dict[str, str] = {}

    def to_device(self, a: np.ndarray) -> Any:
        return self.runtime.to_device(a)

    def to_host(self, a: Any) -> np.ndarray:
        return self.runtime.to_host(a)


class NumbaShim:
    """What the fused Numba wrappers use of a backend (numba.cuda memory, counters, a grid cap for the simulator),
    so these tests do not depend on the rest of NumbaBackend."""

    def __init__(self, max_blocks: int | None = None) -> None:
        from lenet_gpu.backends.base import Counters

        self.counters = Counters()
        self.max_blocks = max_blocks
        self.debug = False
        self.launch_log: list | None = None
        self.default_variants: dict[str, str] = {}

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        from numba import cuda

        self.counters.allocs += 1
        return cuda.device_array(shape, dtype=dtype)

    def to_device(self, a: np.ndarray) -> Any:
        from numba import cuda

        self.counters.allocs += 1
        self.counters.h2d += 1
        return cuda.to_device(np.ascontiguousarray(a))

    def to_host(self, a: Any) -> np.ndarray:
        self.counters.d2h += 1
        return a.copy_to_host()


def head_inputs(b: int, c: int, h: int, w: int, h1: int, h2: int, nc: int, act: str, mode: str, seed: int = 0):
    """Seeded inputs of head_train: yconv = act(normal), x its 2×2 pooling (and argmax), labels, weights scaled
    1/sqrt(fan-in) like the network's init. Returns a dict of float32 / int arrays."""
    rng = np.random.default_rng(seed)
    yconv = ref.activate(rand((b, c, h, w), seed), act).astype(np.float32)
    if act == "relu":
        yconv[:, :, ::3, ::2] = 0.0  # zeros: ties inside windows (the first maximum wins) and act' = 0
    x, am = ref.pool2x2_fwd(yconv, mode)
    i = c * (h // 2) * (w // 2)
    return {
        "x": np.ascontiguousarray(x, dtype=np.float32), "argmax": am, "yconv": yconv,
        "labels": rng.integers(0, nc, size=b).astype(np.int32),
        "w1": rand((h1, i), seed + 1, 1 / np.sqrt(i)), "b1": rand((h1,), seed + 2, 0.1),
        "w2": rand((h2, h1), seed + 3, 1 / np.sqrt(h1)), "b2": rand((h2,), seed + 4, 0.1),
        "w3": rand((nc, h2), seed + 5, 1 / np.sqrt(h2)), "b3": rand((nc,), seed + 6, 0.1),
    }


def check_head_train(
    be: Any, fn: Callable[..., None], variant: str | None, b: int, c: int, h: int, w: int, h1: int, h2: int,
    nc: int, act: str, mode: str, stats_rows: int = 3, step_in_epoch: int = 4, seed: int = 0,
    used: dict | None = None,
) -> dict[str, np.ndarray]:
    """One head_train call against reference.head_train; returns the outputs (host copies) for repeat checks.
    ``used``, when given, receives what the call alone did (``be.counters.since``: launches, allocations, ...)."""
    d = Dev(be)
    inp = head_inputs(b, c, h, w, h1, h2, nc, act, mode, seed)
    want = ref.head_train(_d64(inp["x"]), inp["labels"], *(_d64(inp[k]) for k in ("w1", "b1", "w2", "b2", "w3", "b3")),
                          inp["argmax"], _d64(inp["yconv"]), act, mode)
    out = {
        "h1": d.put(nan_like((b, h1))), "h2": d.put(nan_like((b, h2))), "logits": d.put(nan_like((b, nc))),
        "dz_conv": d.put(nan_like((b, c, h, w))),
        "dw1": d.put(nan_like(inp["w1"].shape)), "db1": d.put(nan_like((h1,))),
        "dw2": d.put(nan_like(inp["w2"].shape)), "db2": d.put(nan_like((h2,))),
        "dw3": d.put(nan_like(inp["w3"].shape)), "db3": d.put(nan_like((nc,))),
    }
    stats0 = np.full((stats_rows, 2), -7.0, np.float32)  # other rows must stay untouched
    stats = d.put(stats0)
    state_h = np.zeros(STATE_WORDS, np.int32)
    state_h[STEP], state_h[STEP_IN_EPOCH] = 11, step_in_epoch
    state = d.put(state_h)
    dev = {k: d.put(inp[k]) for k in ("x", "labels", "w1", "b1", "w2", "b2", "w3", "b3", "yconv")}
    am = d.put(inp["argmax"]) if mode == "max" else None
    before = be.counters.snapshot()
    fn(be, dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"], dev["w3"], dev["b3"], out["h1"],
       out["h2"], out["logits"], am, dev["yconv"], out["dz_conv"], out["dw1"], out["db1"], out["dw2"], out["db2"],
       out["dw3"], out["db3"], stats, state, act, mode, variant=variant)
    if used is not None:
        used.update(be.counters.since(before))
    what = f"head_train_{variant} {act} {mode} B={b} x({c},{h // 2},{w // 2}) {h1}->{h2}->{nc}"
    got = {k: d.get(v) for k, v in out.items()}
    for k in ("h1", "h2", "logits"):
        assert_close(got[k], want[k], *TOL_HEAD[k], what=f"{what} {k}")
    for k in ("dw1", "dw2", "dw3"):
        assert_close(got[k], want[k], *TOL_HEAD["dw"], what=f"{what} {k}")
    for k in ("db1", "db2", "db3"):
        assert_close(got[k], want[k], *TOL_HEAD["db"], what=f"{what} {k}")
    assert_close(got["dz_conv"], want["dz_conv"], *TOL_HEAD["dz_conv"], what=f"{what} dz_conv")
    st = d.get(stats)
    row = step_in_epoch % stats_rows
    assert_close(st[row, 0], want["loss_sum"], *TOL_HEAD["loss_sum"], what=f"{what} loss sum")
    assert st[row, 1] == want["correct"], f"{what}: correct {st[row, 1]} != {want['correct']}"
    others = np.delete(st, row, axis=0)
    assert_equal(others, np.delete(stats0, row, axis=0), f"{what}: other stats rows")
    assert_equal(d.get(state), state_h, f"{what}: the state is read only")
    got["stats"] = st
    return got


def step_bwd_inputs(b: int, act: str, seed: int) -> dict[str, np.ndarray]:
    """step_bwd's inputs at batch ``b`` (both backends' tests): x, p1 (an activated S2 map), gz3 (a routed gradient:
    times act' of an activated S4 map), random routes m3 / m1, w3."""
    rng = np.random.default_rng(seed)
    p1 = ref.activate(rand((b, 6, 14, 14), seed), act).astype(np.float32)
    if act == "relu":
        p1[:, :, ::3, ::2] = 0.0  # act' = 0 there
    p3 = ref.activate(rand((b, 16, 5, 5), seed + 1).astype(np.float64), act)
    return {
        "x": rand((b, 1, 32, 32), seed + 2),
        "p1": p1,
        "gz3": (rand((b, 16, 5, 5), seed + 3) * ref.activation_grad(p3, act)).astype(np.float32),
        "m3": rng.integers(0, 4, (b, 16, 5, 5)).astype(np.uint8),
        "m1": rng.integers(0, 4, (b, 6, 14, 14)).astype(np.uint8),
        "w3": rand((16, 6, 5, 5), seed + 4, float(1 / np.sqrt(150))),
    }


def step_update_inputs(n: int, nc: int, groups: int, seed: int, wrap: bool = True) -> tuple[np.ndarray, ...]:
    """step_adam / step_sgd's inputs (both backends' tests): p, g (its conv prefix NaN: the update writes it), gpart
    (groups, nc) with signed zeros, Adam's m and v, the schedule row of step 12 and the state; ``wrap``: the last step
    of an epoch, so the advance starts the next (STEP_IN_EPOCH, OFFSET back to 0, EPOCH + 1)."""
    from lenet_gpu.stepstate import HostState

    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32) * 0.1
    g[:nc] = np.nan  # the conv prefix is the update's to write
    gpart = (rng.standard_normal((groups, nc)) * 0.05).astype(np.float32)
    gpart[:, 1::7] = -0.0  # signed zeros: the sum starts from +0.0 as step_reduce's does
    m = rng.standard_normal(n).astype(np.float32) * 0.01
    v = np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-4
    t = 12
    srow = np.array([1e-3, 1 - 0.9**t, 1 - 0.999**t, 0.0], np.float32)
    state = HostState(step=t - 1, sched_base=0, step_in_epoch=4, offset=40, epoch=2, steps_per_epoch=5 if wrap else 9,
                      seed=3, shift=1).to_array()
    return p, g, gpart, m, v, srow, state


def harness_backend(cache: dict) -> Any:
    """A RuntimeShim over the CUDA C harness (HostRuntime), made once per ``cache`` (a test module's), with its
    ``sm_count`` reset to None (the plan's default) for each test; a skip, with the reason, where the harness is
    unavailable (no g++ >= 12: a named missing capability, not any error)."""
    import pytest

    from lenet_gpu.errors import BackendUnavailable

    if "be" not in cache:
        from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

        try:
            cache["be"] = RuntimeShim(HostRuntime())
        except BackendUnavailable as e:
            pytest.skip(f"CPU harness unavailable: {e}")
    be = cache["be"]
    be.sm_count = None
    return be


def check_head_repeats(variant: str, b: int, routed_b: int) -> None:
    """head_train ``variant`` on a CUDA C harness runtime of its own (so the counts do not depend on other tests): two
    launches a call, the scratch allocated at the first call at a shape only, no copy, and the same bits every call
    (fixed-order sums, no atomics), at batch ``b`` and in the routed form at ``routed_b``."""
    from lenet_gpu.backends.cupy_backend import fused
    from lenet_gpu.backends.cupy_backend.runtime import HostRuntime

    be = RuntimeShim(HostRuntime())
    first: dict = {}
    a = check_head_train(be, fused.head_train, variant, b, 16, 10, 10, 120, 84, 10, "sigmoid", "max", seed=3,
                         used=first)
    assert first["launches"] == 2 and first["allocs"] == 4, first
    used: dict = {}
    c = check_head_train(be, fused.head_train, variant, b, 16, 10, 10, 120, 84, 10, "sigmoid", "max", seed=3,
                         used=used)
    assert used["launches"] == 2 and used["allocs"] == 0 and used["h2d"] == used["d2h"] == 0, used
    for k in a:
        assert np.array_equal(a[k], c[k]), k
    r1, r2 = check_routed(be, variant, routed_b, "relu", seed=9), check_routed(be, variant, routed_b, "relu", seed=9)
    for k in r1:
        assert np.array_equal(r1[k], r2[k]), k


def kernels_run(be: Any, fn: Callable[[], Any]) -> list[str]:
    """The kernels ``fn()`` launches on ``be``'s runtime, in order."""
    names: list[str] = []
    rt = be.runtime
    orig = rt.get_kernel

    def spy(stem, name, options=()):
        names.append(name)
        return orig(stem, name, options)

    rt.get_kernel = spy
    try:
        fn()
    finally:
        rt.get_kernel = orig
    return names


def check_routed(be: Any, variant: str, b: int, act: str, seed: int,
                 kernels: tuple[str, str] | None = None) -> dict[str, np.ndarray]:
    """head_train ``variant`` with yconv=None (the routed step): dz_conv at x's shape = dL/dx · act'(x), against the
    reference; ``kernels`` (default head_train_<variant> and head_train_wgrad_v4): the two kernels it must run."""
    from lenet_gpu.backends.cupy_backend import fused

    d = Dev(be)
    inp = head_inputs(b, 16, 10, 10, 120, 84, 10, act, "max", seed)
    want = ref.head_train(inp["x"].astype(np.float64), inp["labels"],
                          *(inp[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2", "w3", "b3")),
                          inp["argmax"], None, act, "max")
    out = {"h1": (b, 120), "h2": (b, 84), "logits": (b, 10), "dz_conv": inp["x"].shape, "dw1": (120, 400),
           "db1": (120,), "dw2": (84, 120), "db2": (84,), "dw3": (10, 84), "db3": (10,)}
    dev_out = {k: d.put(nan_like(s)) for k, s in out.items()}
    stats = d.put(np.full((3, 2), -7.0, np.float32))
    state_h = np.zeros(STATE_WORDS, np.int32)
    state_h[STEP_IN_EPOCH] = 5
    dev = {k: d.put(inp[k]) for k in ("x", "labels", "w1", "b1", "w2", "b2", "w3", "b3", "argmax")}
    o = dev_out
    ran = kernels_run(be, lambda: fused.head_train(
        be, dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"], dev["w3"], dev["b3"], o["h1"],
        o["h2"], o["logits"], dev["argmax"], None, o["dz_conv"], o["dw1"], o["db1"], o["dw2"], o["db2"], o["dw3"],
        o["db3"], stats, d.put(state_h), act, "max", variant=variant))
    assert ran == list(kernels or (f"head_train_{variant}", "head_train_wgrad_v4")), ran
    got = {k: d.get(v) for k, v in o.items()}
    what = f"head_train_{variant} routed {act} B={b}"
    for k in ("h1", "h2", "logits"):
        assert_close(got[k], want[k], *TOL_HEAD[k], what=f"{what} {k}")
    for k in ("dw1", "dw2", "dw3", "db1", "db2", "db3"):
        assert_close(got[k], want[k], *TOL_HEAD[k[:2]], what=f"{what} {k}")
    assert_close(got["dz_conv"], want["dz_conv"], *TOL_HEAD["dz_conv"], what=f"{what} dz_conv")
    st = d.get(stats)
    assert_close(st[5 % 3, 0], want["loss_sum"], *TOL_HEAD["loss_sum"], what=f"{what} loss sum")
    assert st[5 % 3, 1] == want["correct"]
    assert_equal(np.delete(st, 5 % 3, axis=0), np.full((2, 2), -7.0, np.float32), f"{what}: other stats rows")
    return got


def lenet_params(h2: int, seed: int = 0, h1: int = 120, nc: int = 10) -> dict[str, np.ndarray]:
    """Seeded float32 LeNet-5 parameters with F6 width h2: uniform ±sqrt(3/fan_in) (unit variance per input, so
    activations and logits stay O(1) through the five stages; PyTorch's ±1/sqrt(fan_in) gives logits ~0.1)."""
    rng = np.random.default_rng(seed)
    shapes = {"c1.w": (6, 1, 5, 5), "c1.b": (6,), "c3.w": (16, 6, 5, 5), "c3.b": (16,), "c5.w": (h1, 400),
              "c5.b": (h1,), "f6.w": (h2, h1), "f6.b": (h2,), "out.w": (nc, h2), "out.b": (nc,)}
    fan = {"c1": 25, "c3": 150, "c5": 400, "f6": h1, "out": h2}
    return {k: (rng.uniform(-1, 1, s) * np.sqrt(3.0 / fan[k.split(".")[0]])).astype(np.float32)
            for k, s in shapes.items()}


def check_lenet_fwd(be: Any, fn: Callable[..., None], variant: str | None, n: int, act: str, mode: str,
                    h2: int = 84, seed: int = 0, used: dict | None = None) -> np.ndarray:
    """One lenet_fwd call against reference.lenet_fwd; returns the logits (host copy). ``used`` as for
    check_head_train."""
    d = Dev(be)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, :4] = 0  # MNIST-like: a dark border (relu zeros: pooling ties)
    params = lenet_params(h2, seed + 1)
    mean, std = 0.1307, 0.3081
    want = ref.lenet_fwd(images, params, mean, std, act, mode)
    logits = d.put(nan_like((n, 10)))
    dimg, dpar = d.put(images), {k: d.put(v) for k, v in params.items()}
    before = be.counters.snapshot()
    fn(be, dimg, dpar, logits, mean, std, act, mode, variant=variant)
    if used is not None:
        used.update(be.counters.since(before))
    got = d.get(logits)
    assert_close(got, want, *TOL_LENET_FWD, what=f"lenet_fwd_{variant} {act} {mode} N={n} f6={h2}")
    return got


# ------------------------------------------------------------------------------------------- GPU timing
def _graph_time(rt: Any, op: Callable[[], None], inner: int = 20, reps: int = 15) -> dict[str, float]:
    """Seconds per call of ``op`` on the GPU: ``inner`` calls captured as one CUDA graph (no host launch cost in
    the figure), replayed ``reps`` times between CUDA events; median, p20 and p80 over the replays."""
    import cupy as cp

    def many() -> None:
        for _ in range(inner):
            op()

    graphs_before = rt.graphs
    rt.graphs = True
    try:
        g = rt.graph(many)
        g()  # warm-up (eager): compiles, first-call allocations
        g()  # capture + first replay
    finally:
        rt.graphs = graphs_before
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(rt.stream)
        g()
        end.record(rt.stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / inner)
    t = np.array(times)
    return {"median_s": float(np.median(t)), "p20_s": float(np.percentile(t, 20)), "p80_s": float(np.percentile(t, 80))}


def bench_gpu(out_path: str | None = None) -> list[dict]:
    """Time the fused CUDA C kernels on a GPU (cupy): lenet_fwd images/s at 10,000 and 60,000 images for each
    variant and tuning, head_train µs per call at batch 64 .. 4096, and PyTorch's fp32 LeNet-5 forward as the peer.
    Prints one line per figure; writes JSON when out_path is given."""
    import json
    from functools import partial

    from lenet_gpu.backends.cupy_backend import fused
    from lenet_gpu.backends.cupy_backend.runtime import CupyRuntime

    rt = CupyRuntime(graphs=False)
    be = RuntimeShim(rt)
    d = Dev(be)
    rng = np.random.default_rng(0)
    rows: list[dict] = []

    def emit(rec: dict) -> None:
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    params = lenet_params(84)
    dpar = {k: d.put(v) for k, v in params.items()}
    base_defines = dict(fused.DEFINES["lenet_fwd"])
    tunings = {"v1": [base_defines], "v2": [base_defines, {"LF_KB3": 8, "LF_F": 8, "LF_MIN_BLOCKS": 3},
                                           {"LF_KB3": 8, "LF_F": 4, "LF_MIN_BLOCKS": 3}]}
    for n in (10_000, 60_000):
        images = d.put(rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8))
        logits = be.runtime.empty((n, 10))
        for v, defs in tunings.items():
            for de in defs:
                fused.DEFINES["lenet_fwd"] = de
                try:
                    op = partial(fused.lenet_fwd, be, images, dpar, logits, 0.1307, 0.3081, "relu", "max", variant=v)
                    t = _graph_time(rt, op, inner=5, reps=10)
                finally:
                    fused.DEFINES["lenet_fwd"] = base_defines
                emit({"op": "lenet_fwd", "backend": "cupy", "variant": v, "defines": de, "n": n, **t,
                      "images_per_s": n / t["median_s"], "gflops": n * 833_000 / t["median_s"] / 1e9})
    for b in (64, 256, 1024, 4096):
        inp = head_inputs(b, 16, 10, 10, 120, 84, 10, "relu", "max")
        dev = {k: d.put(inp[k]) for k in ("x", "labels", "w1", "b1", "w2", "b2", "w3", "b3", "yconv", "argmax")}
        outs = [be.runtime.empty(s) for s in ((b, 120), (b, 84), (b, 10), (b, 16, 10, 10), (120, 400), (120,),
                                              (84, 120), (84,), (10, 84), (10,))]
        stats = d.put(np.zeros((4, 2), np.float32))
        state = d.put(np.zeros(8, np.int32))
        for v in fused.VARIANTS["head_train"]:
            op = partial(fused.head_train, be, dev["x"], dev["labels"], dev["w1"], dev["b1"], dev["w2"], dev["b2"],
                         dev["w3"], dev["b3"], outs[0], outs[1], outs[2], dev["argmax"], dev["yconv"], outs[3],
                         *outs[4:], stats, state, "relu", "max", variant=v)
            t = _graph_time(rt, op)
            emit({"op": "head_train", "backend": "cupy", "variant": v, "batch": b, **t, "us": t["median_s"] * 1e6,
                  "rows_per_s": b / t["median_s"]})
    if importlib.util.find_spec("torch") is None:  # the peer is optional: only a missing torch leaves it out
        print("torch peer skipped: torch is not installed")
    else:
        emit(_torch_peer(params))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _torch_peer(params: dict[str, np.ndarray], n: int = 60_000) -> dict:
    """PyTorch (cuDNN, fp32 without TF32) LeNet-5 forward on n normalised images: the peer figure."""
    import torch
    import torch.nn.functional as tf

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    p = {k: torch.from_numpy(v).to(dev) for k, v in params.items()}
    x = torch.rand((n, 1, 32, 32), device=dev)

    def fwd() -> torch.Tensor:
        y = tf.max_pool2d(torch.relu(tf.conv2d(x, p["c1.w"], p["c1.b"])), 2)
        y = tf.max_pool2d(torch.relu(tf.conv2d(y, p["c3.w"], p["c3.b"])), 2)
        y = torch.relu(tf.linear(y.flatten(1), p["c5.w"], p["c5.b"]))
        y = torch.relu(tf.linear(y, p["f6.w"], p["f6.b"]))
        return tf.linear(y, p["out.w"], p["out.b"])

    with torch.no_grad():
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fwd()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    med = float(np.median(times))
    return {"op": "lenet_fwd", "backend": "torch-cudnn-fp32", "n": n, "median_s": med, "images_per_s": n / med}
