"""Inference from any array (lenet_gpu.arrays + LeNet5.logits/predict/forward_device): which path an input takes,
the one-line errors, and the device path driven end to end on the CPU harness through a backend that plays a GPU.

No GPU here: device arrays are fake objects that offer the protocols (``__cuda_array_interface__``,
``__dlpack__``/``__dlpack_device__``) over NumPy memory, so the dispatch (host or device, device checks, dtype and
shape errors, zero copies) is what is tested; the GPU test at the end feeds real CuPy (and PyTorch) arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import arrays
from lenet_gpu.arrays import KDL_CPU, KDL_CUDA, ArrayInputError, classify
from lenet_gpu.errors import BackendUnavailable
from lenet_gpu.model import LeNet5
from tests.conftest import require

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)


class FakeCAI:
    """A device array offering only __cuda_array_interface__ (as Numba device arrays do), over host memory."""

    def __init__(self, a: np.ndarray, device: int | None = None) -> None:
        self.a = a
        if device is not None:
            self.device = type("Dev", (), {"id": device})()

    @property
    def __cuda_array_interface__(self) -> dict:
        a = self.a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}


class FakeDL:
    """A DLPack producer on a device of ``dev_type`` (CUDA by default), with torch-like .shape/.dtype."""

    def __init__(self, a: np.ndarray, dev_type: int = KDL_CUDA, dev_id: int = 0) -> None:
        self.a, self.dev = a, (dev_type, dev_id)
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack__(self, **kw):  # noqa: ANN003, ANN204
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.dev

    def is_contiguous(self) -> bool:
        return bool(self.a.flags.c_contiguous)


# ---------------------------------------------------------------------------------------------- classification
def test_host_inputs_take_the_host_path_without_a_copy():
    inc = classify(IMAGES, None)
    assert (inc.where, inc.kind, inc.dtype, inc.shape) == ("host", "numpy", "uint8", (7, 28, 28))
    assert inc.host is IMAGES and not inc.needs_copy
    # a CPU DLPack producer (NumPy >= 1.22, a torch CPU tensor): read as a NumPy view of the same memory
    inc = classify(FakeDL(IMAGES, KDL_CPU), 0)
    assert inc.where == "host" and inc.protocol == "dlpack" and np.shares_memory(inc.host, IMAGES)
    with pytest.raises(ArrayInputError, match="a list int64"):  # lists go through np.asarray: int64, refused
        classify(IMAGES.tolist(), None)


def test_device_inputs_are_recognised_with_their_device():
    inc = classify(FakeCAI(IMAGES), 0)
    assert (inc.where, inc.protocol, inc.device_id, inc.kind) == ("device", "cai", None, "other")
    assert classify(FakeCAI(IMAGES, device=0), 0).device_id == 0
    assert classify(FakeCAI(IMAGES), 3, pointer_device=lambda p: 3).device_id == 3
    inc = classify(FakeDL(IMAGES, KDL_CUDA, 0), 0)
    assert (inc.where, inc.protocol, inc.device_id, inc.dtype) == ("device", "dlpack", 0, "uint8")
    f = classify(FakeDL(IMAGES.astype(np.float32)), 0)
    assert f.dtype == "float32"
    # a strided view: recognised, and marked as needing the one documented copy
    strided = np.zeros((7, 28, 56), np.uint8)[:, :, ::2]
    assert classify(FakeCAI(strided), 0).needs_copy
    assert not classify(FakeCAI(IMAGES), 0).needs_copy


@pytest.mark.parametrize("make, match", [
    (lambda: IMAGES.astype(np.int16), "uint8 .* or float32"),
    (lambda: IMAGES[:, :27], r"\(N,28,28\)"),
    (lambda: IMAGES[:0], "at least one image"),
    (lambda: FakeCAI(IMAGES.astype(np.float64)), "float64"),
    (lambda: FakeDL(IMAGES.reshape(7, 784)), r"\(7, 784\)"),
    (lambda: FakeDL(IMAGES, 10), "ROCm device"),
    (lambda: FakeDL(IMAGES, KDL_CUDA, 1), "on CUDA device 1, but the model is on device 0"),
    (lambda: FakeCAI(IMAGES, device=2), "on CUDA device 2, but the model is on device 0"),
])
def test_bad_inputs_are_one_clear_error(make, match):
    with pytest.raises(ArrayInputError, match=match):
        classify(make(), 0)


def test_a_device_array_on_a_host_backend_is_refused():
    with pytest.raises(ArrayInputError, match="runs on the host"):
        classify(FakeDL(IMAGES), None, "numpy")
    model = LeNet5(backend="numpy")
    with pytest.raises(ValueError, match="runs on the host"):
        model.logits(FakeCAI(IMAGES))


def test_producer_kind():
    assert arrays.producer_kind(IMAGES) == "numpy"
    assert arrays.producer_kind(FakeCAI(IMAGES)) == "other"
    assert arrays.export(IMAGES, "other") is IMAGES and arrays.export(IMAGES, "numpy") is IMAGES


# ---------------------------------------------------------------------------------------------- the host path
def test_host_path_takes_dlpack_and_normalised_float32():
    model = LeNet5(backend="numpy", seed=3)
    want = model.logits(IMAGES)
    np.testing.assert_array_equal(model.logits(FakeDL(IMAGES, KDL_CPU)), want)
    np.testing.assert_array_equal(model.predict(FakeDL(IMAGES, KDL_CPU)), np.argmax(want, axis=1))
    x = ((IMAGES / 255.0 - model.mean) / model.std).astype(np.float32)
    got = model.logits(x, batch_size=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


# ---------------------------------------------------------------------------------------------- the device path
def _gpu_like_harness_backend():
    """The cupy-host backend dressed as a GPU: device arrays are FakeCAI/FakeDL objects over host memory, adopted
    as NumPy views (no copy), so the model's device path runs the real kernels through the harness."""
    from lenet_gpu.backends import get_backend

    try:
        be = get_backend("cupy-host")
    except BackendUnavailable as e:  # a named missing capability (no g++ >= 12), not any error
        pytest.skip(f"cupy-host unavailable: {e}")
    be.is_gpu = True
    be.device_id = 0

    def adopt_array(inc: arrays.Incoming) -> np.ndarray:
        a = inc.obj.a
        assert a.flags.c_contiguous  # the fakes hand over contiguous memory: a view, never a copy
        return a

    be.adopt_array = adopt_array
    return be


def test_device_path_runs_one_launch_no_copy_and_equals_the_host_path():
    be = _gpu_like_harness_backend()
    model = LeNet5(backend=be, seed=2)
    host_logits = model.logits(IMAGES)  # the host path (upload, launch, copy back)
    host_classes = model.predict(IMAGES)
    for obj in (FakeCAI(IMAGES), FakeDL(IMAGES)):
        model.forward_device(obj)  # first call at a size may compile
        before = be.counters.snapshot()
        got = model.logits(obj)
        d = be.counters.since(before)
        assert (d["h2d"], d["d2h"], d["syncs"]) == (0, 0, 0), d
        assert d["allocs"] == 1 and d["launches"] == 1, d  # the result, one lenet_fwd launch
        np.testing.assert_array_equal(np.asarray(got), host_logits)
        before = be.counters.snapshot()
        cls = model.predict(obj)
        d = be.counters.since(before)
        assert (d["h2d"], d["d2h"], d["syncs"], d["launches"]) == (0, 0, 0, 1), d
        np.testing.assert_array_equal(np.asarray(cls), host_classes)


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_gpu_cupy_and_torch_in_give_the_same_kind_out_without_host_copies():
    cp = require("cupy")
    model = LeNet5(backend="cupy", seed=1)  # on a GPU (the gpu mark) an unavailable backend is a failure
    want = model.logits(IMAGES)
    dimg = cp.asarray(IMAGES)
    before = model.backend.counters.snapshot()
    got = model.logits(dimg)
    d = model.backend.counters.since(before)
    assert isinstance(got, cp.ndarray) and (d["h2d"], d["d2h"]) == (0, 0), d
    np.testing.assert_array_equal(cp.asnumpy(got), want)
    np.testing.assert_array_equal(cp.asnumpy(model.predict(dimg)), np.argmax(want, axis=1))
    from numba import cuda

    nb = cuda.to_device(IMAGES)
    out = model.logits(nb)
    assert cuda.is_cuda_array(out) and not isinstance(out, cp.ndarray)
    np.testing.assert_array_equal(out.copy_to_host(), want)
    x32 = cp.asarray(((IMAGES / 255.0 - model.mean) / model.std).astype(np.float32))
    np.testing.assert_allclose(cp.asnumpy(model.logits(x32)), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    torch = require("torch")
    t = torch.from_dlpack(dimg)
    out = model.logits(t)
    assert isinstance(out, torch.Tensor) and out.is_cuda
    np.testing.assert_array_equal(out.cpu().numpy(), want)
    np.testing.assert_array_equal(model.predict(t).cpu().numpy(), np.argmax(want, axis=1))


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluate_sums_on_the_device_with_one_copy_back():
    from lenet_gpu.backends import get_backend

    try:
        be = get_backend("cupy-host")
    except BackendUnavailable as e:  # a named missing capability (no g++ >= 12), not any error
        pytest.skip(f"cupy-host unavailable: {e}")
    model = LeNet5(backend=be, seed=4)
    labels = RNG.integers(0, 10, size=IMAGES.shape[0]).astype(np.uint8)
    data = model.upload_dataset(IMAGES, labels)
    model.evaluate(data)  # first pass: compiles, allocates the buffers
    before = be.counters.snapshot()
    loss, correct = model.evaluate(data)
    d = be.counters.since(before)
    assert (d["launches"], d["d2h"], d["h2d"], d["allocs"]) == (2, 1, 0, 0), d
    lg = model.logits(IMAGES)
    want_loss, want_correct = __import__("lenet_gpu.model", fromlist=["x"])._loss_and_correct(lg, labels)
    assert correct == want_correct and loss == pytest.approx(want_loss, rel=1e-12, abs=1e-9)


# ---------------------------------------------------------------------------------------------- staging
def test_chunk_plan():
    from lenet_gpu.backends.cupy_backend.staging import plan_chunks

    assert plan_chunks(1, 4) == [(0, 1)]
    assert plan_chunks(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert plan_chunks(8, 4) == [(0, 4), (4, 4)]
    with pytest.raises(ValueError):
        plan_chunks(0, 4)


def test_host_batches_are_staged_in_chunks_with_one_copy_back():
    """cupy-host: the staging loop (chunks, offsets, one copy back, buffers reused) with plain arrays."""
    from lenet_gpu.backends import get_backend

    try:
        be = get_backend("cupy-host")
    except BackendUnavailable as e:  # a named missing capability (no g++ >= 12), not any error
        pytest.skip(f"cupy-host unavailable: {e}")
    model = LeNet5(backend=be, seed=6)
    want = np.concatenate([model.logits(IMAGES[i : i + 1]) for i in range(IMAGES.shape[0])])
    model.logits(IMAGES, batch_size=3)  # the first call at a size allocates
    before = be.counters.snapshot()
    got = model.logits(IMAGES, batch_size=3)
    d = be.counters.since(before)
    assert (d["h2d"], d["launches"], d["d2h"], d["allocs"]) == (3, 3, 1, 0), d  # chunks of 3, 3, 1
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(model.predict(IMAGES, batch_size=2), np.argmax(want, axis=1))


# ---------------------------------------------------------------------------------------------- predict CLI
def test_predict_cli_batches_files(tmp_path, capsys):
    """Files classified --batch-size at a time give the same lines, in order, as one batch; a bad file in the
    middle gets its line on stderr and the others still run."""
    pil = require("PIL.Image")
    from lenet_gpu.predict import main

    ck = LeNet5(backend="numpy", seed=7).save(tmp_path / "m.npz")
    files = []
    for i in range(5):
        img = np.full((40, 40), 255, np.uint8)
        img[8 + i : 30, 12 + 2 * i : 18 + 2 * i] = 0  # a dark stroke on light paper
        files.append(str(tmp_path / f"d{i}.png"))
        pil.fromarray(img).save(files[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    files.insert(2, str(bad))
    outs = []
    for bs in ("1024", "2"):
        assert main(["--backend", "numpy", "--batch-size", bs, str(ck), *files]) == 1
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "bad.png" in cap.err
    assert outs[0] == outs[1] and outs[0].count("\n") == 5
    assert main(["--batch-size", "0", str(ck), *files]) == 2


# ---------------------------------------------------------------------------------------------- score
def test_score_host_and_device_agree_and_refuse_mixed_sides():
    be = _gpu_like_harness_backend()
    model = LeNet5(backend=be, seed=8)
    labels = RNG.integers(0, 10, size=IMAGES.shape[0]).astype(np.uint8)
    want = model.score(IMAGES, labels)
    assert want[1] == int((model.predict(IMAGES) == labels).sum())
    model.score(FakeCAI(IMAGES), FakeCAI(labels))  # first call: compiles, allocates
    before = be.counters.snapshot()
    got = model.score(FakeCAI(IMAGES), FakeCAI(labels))
    d = be.counters.since(before)
    assert (d["h2d"], d["d2h"], d["launches"]) == (0, 1, 2), d  # forward, lenet_eval, one copy of two numbers
    assert got[1] == want[1] and got[0] == pytest.approx(want[0], rel=1e-12, abs=1e-9)
    with pytest.raises(ArrayInputError, match="host array but the images are on CUDA"):
        model.score(FakeCAI(IMAGES), labels)
    with pytest.raises(ArrayInputError, match="device array but the images are on the host"):
        model.score(IMAGES, FakeCAI(labels))
    with pytest.raises(ArrayInputError, match=r"shape \(7,\)"):
        model.score(IMAGES, labels[:3])
    with pytest.raises(ArrayInputError, match="0..9"):
        model.score(IMAGES, labels + 10)
