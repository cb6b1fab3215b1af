"""End to end: forward and training-step throughput, epochs, time to accuracy, counters.

All of it uses the device-resident path of the training program: the dataset is uploaded once as
uint8, and each forward pass or step gathers its batch on the device from a permutation. A forward
pass is what the model runs for inference (``lenet_fwd``, or batch_prepare + the forward ops); a
training step is a step of a run (``LeNet5.begin_run`` once, then ``run_steps``: batch_prepare,
forward, backward, optimizer, step_advance, all reading the device step state).

Before anything is timed at a batch size, the backend's logits (forward) or gradients (training
step) at that batch are checked against a float64 composition of lenet_gpu.reference's ops, computed
afresh from that backend's own parameters at that moment (never shared between backends or batch sizes:
timing trains the parameters, so two backends at the same batch size hold different ones).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import recipe
from .. import reference as ref
from ..model import LeNet5
from ..schedule import lr_at
from ..spec import NetConfig, views
from ..stepstate import HostState, StepState
from .profile import OpCall, record_calls
from .timing import RATIO_MAX_SPREAD, now, spread

#: whole-network checks: float32 against float64 through 8 layers (relative to the largest value)
FORWARD_TOL = 1e-4
GRAD_TOL = 1e-3

def default_recipe(dataset: str | None = None) -> dict[str, Any]:
    """The training program's defaults (epochs, batch, optimizer, peak lr, schedule, seed), with the
    dataset's own (``lenet_gpu.recipe.DATASET_DEFAULTS[dataset]``)."""
    d = dict(recipe.DEFAULTS)
    d.update(recipe.DATASET_DEFAULTS.get(dataset or "", {}))
    if d.get("lr") is None:
        d["lr"] = recipe.DEFAULT_LR[d["optimizer"]]
    return {k: d[k] for k in ("epochs", "batch_size", "optimizer", "lr", "schedule", "seed")}


# ---------------------------------------------------------------------------------------- data


@dataclass
class BenchData:
    """Images to run on (tiled from a dataset's training images up to ``n``) and the stats used."""

    images: np.ndarray
    labels: np.ndarray
    mean: float
    std: float

    @classmethod
    def from_dataset(cls, train_images: np.ndarray, train_labels: np.ndarray, n: int) -> BenchData:
        reps = max(1, math.ceil(n / train_images.shape[0]))
        images = np.ascontiguousarray(np.tile(train_images, (reps, 1, 1))[: max(n, train_images.shape[0])])
        labels = np.ascontiguousarray(np.tile(train_labels, reps)[: images.shape[0]])
        pix = train_images.astype(np.float32) / 255.0
        return cls(images, labels, float(pix.mean()), float(pix.std()))

    def normalized(self, start: int, batch: int) -> np.ndarray:
        """(batch,1,32,32) float64: the reference batch_prepare of images[start:start+batch]."""
        x = np.pad(self.images[start : start + batch].astype(np.float64), ((0, 0), (2, 2), (2, 2)))
        return ((x / 255.0 - self.mean) / self.std)[:, None]


# ---------------------------------------------------------------------------------------- reference


def reference_forward(p: dict[str, np.ndarray], x: np.ndarray, cfg: NetConfig) -> dict[str, Any]:
    """Every activation of the float64 forward pass (for logits and for the backward pass)."""
    act, mode = cfg.activation, cfg.pool
    a1 = ref.conv2d_fwd(x, p["c1.w"], p["c1.b"], act)
    p1, m1 = ref.pool2x2_fwd(a1, mode)
    a3 = ref.conv2d_fwd(p1, p["c3.w"], p["c3.b"], act)
    p3, m3 = ref.pool2x2_fwd(a3, mode)
    f = p3.reshape(x.shape[0], 400)
    a5 = ref.dense_fwd(f, p["c5.w"], p["c5.b"], act)
    a6 = ref.dense_fwd(a5, p["f6.w"], p["f6.b"], act)
    logits = ref.dense_fwd(a6, p["out.w"], p["out.b"], "identity")
    return {"x": x, "a1": a1, "p1": p1, "m1": m1, "a3": a3, "p3": p3, "m3": m3, "f": f, "a5": a5, "a6": a6,
            "logits": logits}


def reference_grads(
    p: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray, cfg: NetConfig
) -> dict[str, np.ndarray]:
    """Gradients of the mean cross-entropy w.r.t. every parameter tensor, in float64."""
    act, mode = cfg.activation, cfg.pool
    s = reference_forward(p, x, cfg)
    _, dl = ref.softmax_xent(s["logits"], labels)
    g: dict[str, np.ndarray] = {}
    da6, g["out.w"], g["out.b"] = ref.dense_bwd(s["a6"], p["out.w"], s["logits"], dl, "identity")
    da5, g["f6.w"], g["f6.b"] = ref.dense_bwd(s["a5"], p["f6.w"], s["a6"], da6, act)
    df, g["c5.w"], g["c5.b"] = ref.dense_bwd(s["f"], p["c5.w"], s["a5"], da5, act)
    da3 = ref.pool2x2_bwd(df.reshape(s["p3"].shape), s["m3"], mode, s["a3"].shape[2:])
    dp1, g["c3.w"], g["c3.b"] = ref.conv2d_bwd(s["p1"], p["c3.w"], s["a3"], da3, act)
    da1 = ref.pool2x2_bwd(dp1, s["m1"], mode, s["a1"].shape[2:])
    _, g["c1.w"], g["c1.b"] = ref.conv2d_bwd(x, p["c1.w"], s["a1"], da1, act)
    return g


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(1e-30, float(np.max(np.abs(want)))))


# ---------------------------------------------------------------------------------------- our model


class OurNet:
    """LeNet5 on a backend with a resident bench dataset (in stored order: the permutation is the identity).

    A forward pass is what the model runs for inference over device data: ``lenet_fwd`` where the backend
    has it, else batch_prepare + the forward ops (+ step_advance of a state of its own, which moves the
    offset on); a training step is one step of a run (``begin_run`` once per batch size, then
    ``run_steps``), exactly as the training program issues them. On a GPU with CUDA graphs a timed call is
    ``steps_per_call`` steps (one graph of K steps), and the figures are per step."""

    def __init__(self, backend: Any, cfg: NetConfig, data: BenchData, seed: int = 0, lr: float = 1e-3) -> None:
        self.model = LeNet5(backend=backend, activation=cfg.activation, pool=cfg.pool, f6=cfg.f6, seed=seed,
                            lr=lr, mean=data.mean, std=data.std)
        self.backend = self.model.backend
        self.cfg = cfg
        self.bench = data
        self.data = self.model.upload_dataset(data.images, data.labels)
        self.steps_per_call = self.model.graph_steps if (self.backend.is_gpu and self.model.use_graphs) else 1
        self._fwd = StepState(self.backend)
        self._fwd_batch = 0
        self._next: dict[int, int] = {}
        self._run_key: tuple[int, float] | None = None

    def _offset(self, batch: int) -> int:
        k = self._next.get(batch, 0)
        nb = max(1, self.data.n // batch)
        self._next[batch] = (k + 1) % nb
        return k * batch

    def forward(self, batch: int, restart: bool = False) -> None:
        """One forward pass of ``batch`` images, the next ones in the resident data (from the first with
        ``restart``); the logits stay on the device (``model.workspace(batch).logits``)."""
        m, be = self.model, self.backend
        ws = m.workspace(batch)
        if restart:
            self._next[batch] = 0
        if m.fused["lenet_fwd"]:
            off = self._offset(batch)
            be.lenet_fwd(self.data.images[off : off + batch], m._pv, ws.logits, m.mean, m.std, self.cfg.activation,
                         self.cfg.pool)
            return
        if restart or self._fwd_batch != batch:  # one small upload, when the batch size changes
            self._fwd.set(HostState(steps_per_epoch=max(1, self.data.n // batch)))
            self._fwd_batch = batch
        be.batch_prepare(self.data.images, self.data.labels, self.data.perm, self._fwd.state, ws.x, ws.y, m.mean,
                         m.std)
        m._forward_convs(ws)
        m._forward_dense(ws)
        be.step_advance(self._fwd.state, batch)

    def _begin(self, batch: int, lr: float) -> None:
        if self._run_key != (batch, lr):  # the schedule and state uploads of a run: once per batch size
            self.model.begin_run(self.data, batch, lrs=lr)
            self._run_key = (batch, lr)

    def train_steps(self, batch: int, steps: int) -> None:
        """``steps`` training steps at ``batch`` (no copy, no sync)."""
        self._begin(batch, self.model.lr)
        self.model.run_steps(self.data, steps)

    def train_step(self, batch: int) -> None:
        """One timed call: ``steps_per_call`` steps."""
        self.train_steps(batch, self.steps_per_call)

    def record_step(self, batch: int) -> list[OpCall]:
        """The op calls of one training step at ``batch`` (issued eagerly, each op wrapped while it runs: see
        ``perf.profile.record_calls``), for replaying one at a time. The step is a real one: the run moves on."""
        m = self.model
        self._begin(batch, m.lr)
        ws = m.workspace(batch)
        return record_calls(self.backend, lambda: m._train_ops(ws, self.data, m._run))

    def record_launches(self, batch: int) -> list[tuple[str, Callable[[], None]]]:
        """The kernel launches of one training step at ``batch``, each as (kernel name, a callable that issues it
        again), on a backend that lists them (``backend.launch_list``). The step is a real one: the run moves on."""
        m = self.model
        self._begin(batch, m.lr)
        ws = m.workspace(batch)
        return self.backend.launch_list(lambda: m._train_ops(ws, self.data, m._run))

    def synchronize(self) -> None:
        self.backend.synchronize()

    def check_forward(self, batch: int) -> tuple[float, np.ndarray]:
        """Max relative error of the logits at ``batch`` (the first ``batch`` resident images) against the
        float64 reference computed from this net's parameters now (raises if off); returns it and the
        reference logits (for checking a peer that holds the same parameters)."""
        m = self.model
        self.forward(batch, restart=True)
        got = self.backend.to_host(m.workspace(batch).logits)
        p = {k: v.astype(np.float64) for k, v in m.param_dict().items()}
        want = reference_forward(p, self.bench.normalized(0, batch), self.cfg)["logits"]
        err = _rel_err(got, want)
        if not err <= FORWARD_TOL:
            raise AssertionError(f"{self.backend.name} forward at batch {batch}: logits off by {err:.2e} (relative)")
        return err, want

    def check_grads(self, batch: int) -> float:
        """Max relative error (per tensor, vs its largest entry) of one step's gradients (raises if off),
        against the float64 reference computed from this net's parameters as the step found them.

        The step is a real one of a run at learning rate 0 (the parameters stay as they are; the gradient
        buffer keeps the step's gradients): the first batch of the data, no augmentation."""
        m = self.model
        p = {k: v.astype(np.float64) for k, v in m.param_dict().items()}
        m.begin_run(self.data, batch, lrs=0.0)
        self._run_key = (batch, 0.0)
        m.run_steps(self.data, 1)
        grads = views(self.backend.to_host(m.grads), self.cfg)
        want = reference_grads(p, self.bench.normalized(0, batch), self.bench.labels[:batch], self.cfg)
        errs = {k: _rel_err(np.asarray(grads[k]), want[k]) for k in want}
        worst = max(errs, key=errs.get)
        if not errs[worst] <= GRAD_TOL:
            raise AssertionError(
                f"{self.backend.name} training step at batch {batch}: gradient {worst} off by {errs[worst]:.2e}"
            )
        return errs[worst]


# ---------------------------------------------------------------------------------------- interleaved timing


def pick_number(
    fn: Callable[[], None], sync: Callable[[], None], min_sample_s: float, warmup: int = 2
) -> tuple[int, float]:
    """Warm up and return (calls per sample so that a sample lasts ≥ min_sample_s, seconds per call)."""
    t = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        sync()
        t = time.perf_counter() - t0
    return max(1, math.ceil(min_sample_s / max(t, 1e-9))), t


def interleaved(
    contenders: dict[str, tuple[Callable[[], None], Callable[[], None]]],
    rounds: int,
    min_sample_s: float,
) -> dict[str, Any]:
    """Time contenders in alternating rounds (A B, B A, A B, ...) with the bench clock + their sync.

    Returns per contender the per-call samples, and ``numbers`` (calls per sample). Ratios between
    contenders are taken round by round, so slow drifts of the machine cancel.
    """
    numbers = {}
    for name, (fn, sync) in contenders.items():
        numbers[name] = pick_number(fn, sync, min_sample_s)[0]
    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, sync = contenders[name]
            k = numbers[name]
            t0 = now()
            for _ in range(k):
                fn()
            sync()
            samples[name].append((now() - t0) / k)
    return {"samples": samples, "numbers": numbers}


def rounds_throughput(
    fn: Callable[[], None], sync: Callable[[], None], images_per_call: int, rounds: int = 5, min_sample_s: float = 0.05,
    warmup: int = 2,
) -> dict[str, Any]:
    """Images/s of ``fn`` from ``rounds`` timed samples of N calls and one sync each (N so that a sample lasts
    ≥ ``min_sample_s``), after warm-up; the first call's time (compiles, captures) is ``first_call_s``.
    Returns images_per_s (the median sample), its p20–p80, the spread (None under 3 rounds) and the per-call
    samples."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    number, _ = pick_number(fn, sync, min_sample_s, warmup)
    samples = []
    for _ in range(max(1, rounds)):
        t0 = now()
        for _ in range(number):
            fn()
        sync()
        samples.append((now() - t0) / number)
    p20, med, p80 = np.percentile(samples, [20, 50, 80])
    return {"images_per_s": round(images_per_call / med, 1), "images_per_s_p20": round(images_per_call / p80, 1),
            "images_per_s_p80": round(images_per_call / p20, 1),
            "spread": round(spread(samples), 4) if len(samples) >= 3 else None,  # fewer rounds: no spread to tell
            "rounds": len(samples), "number": number, "first_call_s": round(first, 4), "samples_s": samples}


def ratio_stats(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """Throughput ratio ours/theirs (= their time / our time) per round: median, p20, p80; the spread of
    each side ((p80 − p20) / median of its samples) and ``reliable``: False when either side spreads more
    than RATIO_MAX_SPREAD (the report then marks the ratio unreliable instead of printing it bare)."""
    r = np.asarray(theirs) / np.asarray(ours)
    p20, med, p80 = np.percentile(r, [20, 50, 80])
    so, st = spread(ours), spread(theirs)
    return {"median": float(med), "p20": float(p20), "p80": float(p80), "ours_spread": so, "theirs_spread": st,
            "reliable": bool(so <= RATIO_MAX_SPREAD and st <= RATIO_MAX_SPREAD)}


# ---------------------------------------------------------------------------------------- counters


def count(backend: Any, fn: Callable[[], None]) -> dict[str, int]:
    """What one call of ``fn`` did on the backend (launches, h2d, d2h, allocs, syncs)."""
    before = backend.counters.snapshot()
    fn()
    return backend.counters.since(before)


def counters_for(net: OurNet, batch: int) -> dict[str, dict[str, int]]:
    """Counters of one training step and one forward pass (device-resident, after warm-up), and of the
    host-batch API (train_step on host arrays, logits)."""
    m = net.model
    imgs, labs = net.bench.images[:batch], net.bench.labels[:batch]
    net.train_steps(batch, 1)  # warm-up: workspace, compilation, recording
    net.forward(batch)
    m.train_step(imgs, labs)
    m.logits(imgs, batch_size=batch)
    net.synchronize()
    return {
        "train_step": count(net.backend, lambda: net.train_steps(batch, 1)),
        "forward": count(net.backend, lambda: net.forward(batch)),
        "train_step_host_batch": count(net.backend, lambda: m.train_step(imgs, labs)),
        "logits_host_batch": count(net.backend, lambda: m.logits(imgs, batch_size=batch)),
    }


# ---------------------------------------------------------------------------------------- epochs


def epochs_to_accuracy(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    runner: EpochRunner,
    recipe: dict[str, Any],
    max_epochs: int,
    target: float | None,
) -> dict[str, Any]:
    """Train with the recipe (its schedule spans recipe['epochs']), evaluating after every epoch, until
    the test accuracy reaches ``target`` or ``max_epochs`` have run (all of them when ``target`` is None).
    Times exclude evaluation."""
    n = train_images.shape[0]
    batch = min(int(recipe["batch_size"]), n)
    steps = n // batch
    out: dict[str, Any] = {"batch": batch, "steps_per_epoch": steps, "epochs": []}
    cum = 0.0
    for epoch in range(max_epochs):
        perm = np.random.default_rng([int(recipe["seed"]), epoch]).permutation(n).astype(np.int32)
        runner.begin_epoch(perm)
        t0 = now()
        runner.train_epoch(epoch, steps, batch)
        runner.synchronize()
        dt = now() - t0
        cum += dt
        acc = runner.accuracy(test_images, test_labels)
        out["epochs"].append({"epoch": epoch + 1, "seconds": dt, "test_acc": acc, "images_per_s": steps * batch / dt})
        if target is not None and acc >= target and "time_to_target_s" not in out:
            out["time_to_target_s"] = cum
            out["epochs_to_target"] = epoch + 1
            break
    out["epoch_s_median"] = float(np.median([e["seconds"] for e in out["epochs"]]))
    out["final_test_acc"] = out["epochs"][-1]["test_acc"]
    out["reached_target"] = "time_to_target_s" in out
    return out


def recipe_lrs(recipe: dict[str, Any], steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every step of the recipe (its schedule over recipe['epochs'] epochs)."""
    total = steps_per_epoch * int(recipe["epochs"])
    return np.array([lr_at(t, total, float(recipe["lr"]), recipe["schedule"]) for t in range(max(total, 1))])


class EpochRunner:
    """What epochs_to_accuracy drives: begin_epoch(perm), train_epoch(epoch, steps, batch), synchronize,
    accuracy. The recipe's learning rate at every step is the runner's business."""

    def begin_epoch(self, perm: np.ndarray) -> None: ...
    def train_epoch(self, epoch: int, steps: int, batch: int) -> None: ...
    def synchronize(self) -> None: ...
    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float: ...


class OurEpochRunner(EpochRunner):
    """The training program's loop: one run (schedule table uploaded once), one permutation upload per
    epoch, then the epoch's steps issued by ``run_steps`` (graphs of K steps where the backend has them).
    No augmentation, so that the PyTorch peer sees the same batches."""

    def __init__(self, backend: Any, cfg: NetConfig, train_images: np.ndarray, train_labels: np.ndarray,
                 recipe: dict[str, Any]) -> None:
        pix = train_images.astype(np.float32) / 255.0
        self.model = LeNet5(backend=backend, activation=cfg.activation, pool=cfg.pool, f6=cfg.f6,
                            seed=int(recipe["seed"]), optimizer=recipe["optimizer"], lr=float(recipe["lr"]),
                            mean=float(pix.mean()), std=float(pix.std()))
        self.data = self.model.upload_dataset(train_images, train_labels)
        batch = min(int(recipe["batch_size"]), self.data.n)
        self.model.begin_run(self.data, batch, lrs=recipe_lrs(recipe, self.data.n // batch),
                             seed=int(recipe["seed"]), shift=0)

    def begin_epoch(self, perm: np.ndarray) -> None:
        self.model.begin_epoch(self.data, perm)

    def train_epoch(self, epoch: int, steps: int, batch: int) -> None:
        self.model.run_steps(self.data, steps)

    def synchronize(self) -> None:
        self.model.backend.synchronize()

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.model.predict(images, batch_size=1000) == labels).mean())


class TorchEpochRunner(EpochRunner):
    def __init__(self, peer: Any, recipe: dict[str, Any]) -> None:
        self.peer = peer
        self.recipe = recipe
        self.lrs: np.ndarray | None = None

    def begin_epoch(self, perm: np.ndarray) -> None:
        self.peer.set_perm(perm)

    def train_epoch(self, epoch: int, steps: int, batch: int) -> None:
        if self.lrs is None:
            self.lrs = recipe_lrs(self.recipe, steps)
        last = self.lrs.shape[0] - 1
        for s in range(steps):
            self.peer.train_step(s * batch, batch, float(self.lrs[min(epoch * steps + s, last)]))

    def synchronize(self) -> None:
        self.peer.synchronize()

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return self.peer.accuracy(images, labels)


def peer_epochs(data_dir: str, epochs: int, mode: str | None = None) -> list[dict[str, Any]]:
    """The PyTorch peer trained on the dataset in ``data_dir`` with that dataset's own recipe (recognised by
    its checksums: lenet_gpu.recipe) for ``epochs`` epochs: one ``{"epoch", "seconds", "test_acc"}`` per epoch,
    seconds of training alone (evaluation excluded). Eager by default: the recipe's schedule changes the
    learning rate every step, and the whole-step graph peer captures a fixed one (peer.TorchLeNet). What the
    self-test's time-to-accuracy hook runs for the peer."""
    import torch

    from ..data import load_dataset
    from ..spec import init_params
    from .peer import TorchLeNet

    ds = load_dataset(data_dir=data_dir, download=False, progress=False)
    recipe = default_recipe(ds.name)
    recipe["epochs"] = epochs
    cfg = NetConfig()
    pix = ds.train_images.astype(np.float32) / 255.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peer = TorchLeNet(cfg, views(init_params(cfg, int(recipe["seed"])), cfg), ds.train_images, ds.train_labels,
                      float(pix.mean()), float(pix.std()), device=device, lr=float(recipe["lr"]), mode=mode or "eager")
    res = epochs_to_accuracy(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels,
                             TorchEpochRunner(peer, recipe), recipe, epochs, None)
    return [{"epoch": e["epoch"], "seconds": e["seconds"], "test_acc": e["test_acc"]} for e in res["epochs"]]
