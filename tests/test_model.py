"""LeNet5 on the numpy backend: a whole step against the float64 reference, counters, checkpoints."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from lenet_gpu import LeNet5, get_backend
from lenet_gpu import reference as R
from lenet_gpu.backends import BackendUnavailable
from lenet_gpu.model import CheckpointError, read_checkpoint
from lenet_gpu.spec import NetConfig, layer_table, num_parameters, param_layout, views

from .parity import assert_close

RNG = np.random.default_rng(7)


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def reference_step(model: LeNet5, p0: np.ndarray, images: np.ndarray, labels: np.ndarray):
    """One training step of LeNet-5 written with the reference ops in float64: (loss, grads)."""
    act, pool, n = model.activation, model.pool, images.shape[0]
    P = views(p0.astype(np.float64), model.cfg)
    x = np.pad(images / 255.0, ((0, 0), (2, 2), (2, 2)))[:, None]
    x = (x - model.mean) / model.std
    a1 = R.conv2d_fwd(x, P["c1.w"], P["c1.b"], act)
    p1, m1 = R.pool2x2_fwd(a1, pool)
    a3 = R.conv2d_fwd(p1, P["c3.w"], P["c3.b"], act)
    p3, m3 = R.pool2x2_fwd(a3, pool)
    a5 = R.dense_fwd(p3.reshape(n, 400), P["c5.w"], P["c5.b"], act)
    a6 = R.dense_fwd(a5, P["f6.w"], P["f6.b"], act)
    lg = R.dense_fwd(a6, P["out.w"], P["out.b"])
    loss, dl = R.softmax_xent(lg, labels)
    G = {}
    da6, G["out.w"], G["out.b"] = R.dense_bwd(a6, P["out.w"], lg, dl)
    da5, G["f6.w"], G["f6.b"] = R.dense_bwd(a5, P["f6.w"], a6, da6, act)
    dp3, G["c5.w"], G["c5.b"] = R.dense_bwd(p3.reshape(n, 400), P["c5.w"], a5, da5, act)
    da3 = R.pool2x2_bwd(dp3.reshape(p3.shape), m3, pool)
    dp1, G["c3.w"], G["c3.b"] = R.conv2d_bwd(p1, P["c3.w"], a3, da3, act)
    da1 = R.pool2x2_bwd(dp1, m1, pool)
    _, G["c1.w"], G["c1.b"] = R.conv2d_bwd(x, P["c1.w"], a1, da1, act)
    g = np.zeros(p0.shape, np.float64)
    gv = views(g, model.cfg)
    for k, v in G.items():
        gv[k][...] = v
    return loss, g


def test_network_shape_and_parameter_count():
    assert num_parameters() == 61_706
    assert sum(layer.params for layer in layer_table()) == 61_706
    assert num_parameters(NetConfig(f6=60)) == 61_706 - 24 * 121 - 24 * 10
    specs, total = param_layout()
    assert all(s.offset % 32 == 0 for s in specs) and total >= 61_706
    assert LeNet5(backend="numpy").num_parameters == 61_706


@pytest.mark.parametrize("act", ["relu", "tanh", "lecun_tanh", "sigmoid"])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_train_step_matches_reference(act, pool):
    model = LeNet5(backend="numpy", activation=act, pool=pool, seed=3)
    images, labels = batch(5, seed=1)
    p0 = model.parameters()
    loss = model.train_step(images, labels)
    rloss, rg = reference_step(model, p0, images, labels)
    assert loss == pytest.approx(rloss, rel=1e-5)
    # gradients: scale-aware tolerance (they span several orders of magnitude across layers)
    assert_close(model.backend.to_host(model.grads), rg, atol=1e-6 * np.abs(rg).max(), rtol=1e-4,
                 what=f"grads {act}/{pool}")
    rp, _, _ = R.adam_update(p0.astype(np.float64), rg, np.zeros_like(rg), np.zeros_like(rg), 1, model.lr)
    # Adam's first step is lr·sign(g): an element with g ≈ 0 may flip sign on rounding, so
    # compare where the reference gradient is clearly non-zero
    clear = np.abs(rg) > 1e-5 * np.abs(rg).max()
    assert_close(model.parameters()[clear], rp[clear], atol=1e-7, rtol=1e-6, what="params after step")


def test_sgd_step_and_weight_decay_match_reference():
    model = LeNet5(backend="numpy", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, seed=5)
    images, labels = batch(4, seed=2)
    buf = np.zeros(model.size)
    p = model.parameters().astype(np.float64)
    for step in range(3):
        _, g = reference_step(model, p.astype(np.float32), images, labels)
        p, buf = R.sgd_update(p, g, buf, 0.05, 0.9, 1e-3)
        model.train_step(images, labels)
        assert_close(model.parameters(), p, atol=2e-6, rtol=1e-4, what=f"sgd step {step}")


def test_device_step_makes_no_copy_alloc_or_sync():
    model = LeNet5(backend="numpy")
    images, labels = batch(40)
    data = model.upload_dataset(images, labels)
    model.begin_run(data, 8, shift=2)
    model.begin_epoch(data, np.arange(40))
    model.run_steps(data, 1)  # warm-up: allocates the workspace
    before = model.backend.counters.snapshot()
    model.run_steps(data, 3)
    d = model.backend.counters.since(before)
    assert d == {"launches": 3 * 4, "h2d": 0, "d2h": 0, "allocs": 0, "syncs": 0}
    assert model.step4 and model.ops_per_step() == 4 and model.step_count == 4  # the four-kernel step


def test_device_path_equals_host_path():
    """A device-resident run without augmentation takes exactly the steps train_step takes on the same
    batches: the schedule table and the state reproduce the host's per-step values."""
    images, labels = batch(12, seed=4)
    a, b = LeNet5(backend="numpy", seed=9), LeNet5(backend="numpy", seed=9)
    data = a.upload_dataset(images, labels)
    perm = np.random.default_rng(0).permutation(12)
    lrs = [1e-3, 2e-3, 5e-4]
    a.begin_run(data, 4, lrs)
    a.begin_epoch(data, perm)
    a.run_steps(data, 3)
    stats = a.step_stats(0, 3)
    for s in range(3):
        idx = perm[4 * s : 4 * s + 4]
        loss = b.train_step(images[idx], labels[idx], lr=lrs[s])
        assert stats[s, 0] / 4 == pytest.approx(loss, rel=1e-6)
    np.testing.assert_array_equal(a.parameters(), b.parameters())
    assert a.run_position.epoch == 1 and a.run_position.step_in_epoch == 0  # 3 steps of 4 = one epoch


def test_run_steps_in_chunks_equals_one_by_one_and_augmentation_is_applied():
    images, labels = batch(40, seed=6)
    runs = []
    for chunks in ([5], [1, 1, 1, 1, 1], [2, 3]):
        m = LeNet5(backend="numpy", seed=2)
        data = m.upload_dataset(images, labels)
        m.begin_run(data, 8, np.linspace(1e-3, 2e-3, 5), seed=4, shift=2)
        m.begin_epoch(data, np.random.default_rng(1).permutation(40))
        for c in chunks:
            m.run_steps(data, c)
        runs.append((m.parameters(), m.step_stats(0, 5)))
    for p, st in runs[1:]:
        np.testing.assert_array_equal(p, runs[0][0])
        np.testing.assert_array_equal(st, runs[0][1])
    m = LeNet5(backend="numpy", seed=2)  # the same run without shifts ends elsewhere
    data = m.upload_dataset(images, labels)
    m.begin_run(data, 8, np.linspace(1e-3, 2e-3, 5), seed=4, shift=0)
    m.begin_epoch(data, np.random.default_rng(1).permutation(40))
    m.run_steps(data, 5)
    assert not np.array_equal(m.parameters(), runs[0][0])


def test_predict_logits_and_evaluate_agree():
    model = LeNet5(backend="numpy", seed=1)
    images, labels = batch(23, seed=5)
    lg = model.logits(images, batch_size=10)
    assert lg.shape == (23, 10) and lg.dtype == np.float32
    np.testing.assert_array_equal(model.predict(images, batch_size=7), np.argmax(lg, axis=1))
    data = model.upload_dataset(images, labels)
    loss_sum, correct = model.evaluate(data, batch_size=10)
    assert correct == int((np.argmax(lg, axis=1) == labels).sum())
    assert loss_sum / 23 == pytest.approx(R.softmax_xent(lg.astype(np.float64), labels)[0], rel=1e-5)
    acts = model.activations(images[:2])
    assert [acts[k].shape for k in ("input", "C1", "S2", "C3", "S4", "C5", "F6", "output")] == [
        (2, 1, 32, 32), (2, 6, 28, 28), (2, 6, 14, 14), (2, 16, 10, 10), (2, 16, 5, 5), (2, 120), (2, 84), (2, 10)]
    np.testing.assert_allclose(acts["output"], lg[:2], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused():
    model = LeNet5(backend="numpy")
    with pytest.raises(ValueError, match="uint8"):
        model.train_step(np.zeros((2, 28, 28), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        model.train_step(np.zeros((2, 28, 28), np.uint8), np.array([0, 10]))
    with pytest.raises(ValueError, match="activation"):
        LeNet5(backend="numpy", activation="gelu")
    with pytest.raises(ValueError, match="optimizer"):
        LeNet5(backend="numpy", optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("opencl")


def test_gpu_backends_without_a_gpu_fail_in_one_line(monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    for name in ("cupy", "numba"):
        try:
            be = get_backend(name)
        except BackendUnavailable as e:
            msg = str(e)
            assert "\n" not in msg and "--backend numpy" in msg
        else:  # a real GPU is present
            assert be.is_gpu
    assert get_backend("auto").name in ("cpu", "numpy", "cupy", "numba")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = LeNet5(backend="numpy", activation="tanh", pool="avg", f6=60, seed=2, optimizer="sgd", lr=0.01)
    images, labels = batch(6)
    model.train_step(images, labels)
    path = model.save(tmp_path / "ck.npz", extra={"dataset": "unit", "epoch": 3})
    loaded, extra = LeNet5.load_with_extra(path, backend="numpy")
    assert extra == {"dataset": "unit", "epoch": 3}
    assert loaded.options() == model.options()
    np.testing.assert_array_equal(loaded.parameters(), model.parameters())
    assert loaded.step_count == 1
    # the next step is identical (optimizer state travelled too)
    model.train_step(images, labels)
    loaded.train_step(images, labels)
    np.testing.assert_array_equal(loaded.parameters(), model.parameters())
    assert not list(tmp_path.glob("*.tmp"))
    with zipfile.ZipFile(path) as z:  # no pickled objects inside
        assert all(n.endswith(".npy") for n in z.namelist())


def test_checkpoint_refuses_foreign_and_damaged_files(tmp_path):
    good = LeNet5(backend="numpy").save(tmp_path / "good.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    ck = dict(np.load(good))
    ck["layout"] = ck["layout"] + 1
    np.savez(tmp_path / "layout.npz", **ck)
    ck = dict(np.load(good))
    ck["params"] = ck["params"][:-5]
    np.savez(tmp_path / "short.npz", **ck)
    ck = dict(np.load(good))
    ck["params"] = np.full_like(ck["params"], np.nan)
    np.savez(tmp_path / "nan.npz", **ck)
    ck = dict(np.load(good))
    ck["options"] = np.array(json.dumps({"activation": "relu"}))
    np.savez(tmp_path / "opts.npz", **ck)
    cases = {"other": "another program", "text": "not a lenet_gpu checkpoint", "layout": "layout",
             "short": "wrong dtype or size", "nan": "NaN", "opts": "options", "missing": "no such"}
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as e:
            read_checkpoint(tmp_path / f"{name}.npz")
        assert name in str(e.value)


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    model = LeNet5(backend="numpy")
    target = tmp_path / "ck.npz"
    model.save(target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_init_schemes():
    from lenet_gpu.spec import init_params

    cfg = NetConfig()
    specs, _ = param_layout(cfg)
    torch_like = init_params(cfg, 0, "torch")
    he = init_params(cfg, 0, "he")
    for s in specs:
        t = torch_like[s.offset : s.offset + s.size]
        assert 0.9 / np.sqrt(s.fan_in) < np.abs(t).max() <= (1 + 1e-6) / np.sqrt(s.fan_in)  # float32 rounding
        h = he[s.offset : s.offset + s.size]
        if s.name.endswith(".b"):
            assert not h.any()
        elif s.name != "out.w":
            assert np.std(h) == pytest.approx(np.sqrt(2 / s.fan_in), rel=0.2)
    np.testing.assert_array_equal(init_params(cfg, 0), torch_like)  # the default, and seeded
    assert not np.array_equal(init_params(cfg, 1), torch_like)
    with pytest.raises(ValueError, match="init scheme"):
        init_params(cfg, 0, "xavier")


# ----------------------------------------------------------------------------- graphs (model logic)


class _GraphingNumpy:
    """The numpy backend with a stand-in for CUDA graphs: ``graph(fn, steps)`` returns a callable that runs
    fn ``steps`` times (``broken``: one time too few), so the model's graph logic runs on the CPU."""

    def __new__(cls, name: str, broken: bool = False):
        from lenet_gpu.backends.numpy_backend import NumpyBackend

        be = NumpyBackend(threads=1)
        be.name = name
        be.captures = []

        def graph(fn, steps=1):
            be.captures.append(steps)
            return lambda: [fn() for _ in range(steps - (1 if broken else 0))]

        be.graph = graph
        return be


@pytest.mark.parametrize("broken", [False, True])
def test_graphs_replay_chunks_and_a_bad_graph_falls_back_to_eager(broken):
    images, labels = batch(96, seed=11)
    results = []
    for graphs in (False, True):
        be = _GraphingNumpy(f"graph-test-{broken}-{graphs}", broken)
        m = LeNet5(backend=be, seed=3, use_graphs=graphs, graph_steps=4)
        data = m.upload_dataset(images, labels)
        m.begin_run(data, 8, np.linspace(1e-3, 3e-3, 30), shift=1)
        m.begin_epoch(data, np.random.default_rng(2).permutation(96))
        m.run_steps(data, 11)  # 1 recording step, 2 graphs of 4, 2 replayed steps (fewer than MIN_GRAPH_STEPS)
        m.begin_epoch(data, np.random.default_rng(3).permutation(96))
        m.run_steps(data, 12)
        results.append((m.parameters(), m.step_stats(0, 11), m.run_position))
        if graphs:
            ok, msg = m.graph_check()
            assert ok is (not broken) and ("bit for bit" in msg if ok else "differ" in msg)
            assert be.captures[0] == 4 and (m.graph_note is None) is (not broken)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2] and results[0][2].step == 23 and results[0][2].epoch == 1
