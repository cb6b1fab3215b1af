"""Tests for lenet_gpu.data: strict IDX parsing, datasets, and verified atomic downloads.

Downloads are tested against a real HTTP server on 127.0.0.1 (stdlib, in a thread, port 0) serving
small fake IDX files made here; the checksum tables are monkeypatched to match them. Nothing here
touches the network beyond loopback or the real cache (LENET_GPU_DATA points into tmp_path).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib.util
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lenet_gpu import data
from lenet_gpu.data import DataError, Dataset, load_dataset, read_idx

REPO = Path(__file__).resolve().parent.parent
BASES = data.IDX_FILES

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    arr = np.ascontiguousarray(arr)
    return struct.pack(f">4B{arr.ndim}I", 0, 0, code, arr.ndim, *arr.shape) + arr.tobytes()


def fake_payloads(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, bytes]:
    """The four IDX payloads of a tiny fake dataset."""
    rng = np.random.default_rng(seed)
    tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    return {
        BASES[0]: idx_bytes(tr),
        BASES[1]: idx_bytes((np.arange(n_train) % 10).astype(np.uint8)),
        BASES[2]: idx_bytes(te),
        BASES[3]: idx_bytes((np.arange(n_test) % 10).astype(np.uint8)),
    }


def gz(payload: bytes, filename: str = "") -> bytes:
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(filename=filename, mode="wb", fileobj=buf, mtime=0) as f:
        f.write(payload)
    return buf.getvalue()


def write_dir(folder: Path, payloads: dict[str, bytes], compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for base, p in payloads.items():
        if compress:
            (folder / (base + ".gz")).write_bytes(gz(p))
        else:
            (folder / base).write_bytes(p)
    return folder


def sha_table(files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {name: (len(b), hashlib.sha256(b).hexdigest()) for name, b in files.items()}


def all_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temp files included), relative names."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def dead_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxies, no offline flag, no mirror overrides; the default cache lives in tmp_path."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in (data.ENV_OFFLINE, data.ENV_MNIST_MIRRORS, data.ENV_FASHION_MIRRORS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "default-cache"))
    monkeypatch.setattr(data, "READ_TIMEOUT", 5.0)
    monkeypatch.setattr(data, "CONNECT_TIMEOUT", 5.0)
    monkeypatch.setattr(data, "AUTO_CONNECT_TIMEOUT", 5.0)


class FakeServer:
    """HTTP server on 127.0.0.1 serving ``routes``: path -> bytes (200) or a behaviour tuple.

    ("status", code) | ("truncate", body, n): announce len(body), send n bytes, close |
    ("nolength", body): no Content-Length, close after body | ("stall", body, n, seconds).
    """

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        self.requests: list[str] = []
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                state.requests.append(self.path)
                route = state.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                if isinstance(route, bytes):
                    route = ("truncate", route, len(route))
                kind = route[0]
                if kind == "status":
                    self.send_error(route[1])
                    return
                body = route[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if kind != "nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind in ("truncate", "stall"):
                    self.wfile.write(body[: route[2]])
                    self.wfile.flush()
                    if kind == "stall":
                        time.sleep(route[3])
                else:
                    self.wfile.write(body)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.port}/{prefix}/"

    def serve(self, prefix: str, files: dict[str, object]) -> str:
        for name, route in files.items():
            self.routes[f"/{prefix}/{name}"] = route
        return self.url(prefix)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Fake MNIST ``.gz`` files, with MNIST_GZ_SHA256 patched to their checksums."""
    files = {base + ".gz": gz(p) for base, p in fake_payloads().items()}
    monkeypatch.setattr(data, "MNIST_GZ_SHA256", sha_table(files))
    return files


# --------------------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_good(tmp_path: Path, compress: bool) -> None:
    arr = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    path = tmp_path / ("x-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(gz(idx_bytes(arr)) if compress else idx_bytes(arr))
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 28, 28)
    assert out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, arr)
    assert read_idx(str(path)).shape == (2, 28, 28)  # str paths too


GOOD = idx_bytes(np.zeros((2, 3), np.uint8))  # 4 + 8 header + 6 data bytes

MALFORMED: dict[str, tuple[str, bytes, str]] = {
    # case: (file name, content, regex the message must match)
    "wrong magic": ("a-ubyte", b"\x01\x02\x08\x02" + GOOD[4:], "bad magic"),
    "unknown dtype code": ("a-ubyte", b"\x00\x00\x07\x02" + GOOD[4:], "bad magic"),
    "dtype not uint8": ("a-ubyte", b"\x00\x00\x0d\x02" + GOOD[4:], r"dtype code 0x0d \(float32\)"),
    "zero dimensions": ("a-ubyte", b"\x00\x00\x08\x00", "0 dimensions"),
    "header shorter than magic": ("a-ubyte", b"\x00\x00", "truncated IDX header"),
    "header shorter than dims": ("a-ubyte", GOOD[:9], "truncated IDX header"),
    "truncated data": ("a-ubyte", GOOD[:-1], "truncated: shape 2x3 needs 6 bytes"),
    "trailing bytes": ("a-ubyte", GOOD + b"\x00\x00", "2 trailing bytes"),
    "empty file": ("a-ubyte", b"", "empty file"),
    "empty .gz file": ("a-ubyte.gz", b"", "empty file"),
    ".gz that is not gzip": ("a-ubyte.gz", GOOD, "not a gzip file"),
    "corrupt gzip": ("a-ubyte.gz", gz(GOOD)[:12] + b"\xff" * 8 + gz(GOOD)[20:], "corrupt gzip"),
    "truncated gzip": ("a-ubyte.gz", gz(GOOD)[:-6], "corrupt gzip"),
    "gzip of nothing": ("a-ubyte.gz", gz(b""), "empty file"),
    "gzip data under a raw name": ("a-ubyte", gz(GOOD), "gzip-compressed but the name"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_read_idx_malformed(tmp_path: Path, case: str) -> None:
    name, content, pattern = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as exc:
        read_idx(tmp_path / "nope-ubyte")
    assert "nope-ubyte" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# data_dir and dataset-level checks
# --------------------------------------------------------------------------------------------------


def test_data_dir_loads_raw_and_gz(tmp_path: Path) -> None:
    payloads = fake_payloads()
    folder = tmp_path / "d"
    write_dir(folder, {k: v for k, v in payloads.items() if "train" in k}, compress=False)
    write_dir(folder, {k: v for k, v in payloads.items() if "t10k" in k}, compress=True)
    ds = load_dataset(data_dir=folder)
    assert isinstance(ds, Dataset)
    assert ds.name == f"dir:{folder}" and ds.source == str(folder)
    assert ds.train_images.shape == (30, 28, 28) and ds.test_images.shape == (10, 28, 28)
    assert ds.train_labels.shape == (30,) and ds.test_labels.dtype == np.uint8
    for a in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        assert a.dtype == np.uint8 and a.flags.c_contiguous
    assert ds.classes == tuple("0123456789")
    assert "train=30" in repr(ds)
    # a name given too is kept; "dir:<path>" as a name means data_dir
    assert load_dataset("fashion-mnist", data_dir=folder).classes[0] == "T-shirt/top"
    assert load_dataset("fashion-mnist", data_dir=folder).name == "fashion-mnist"
    assert load_dataset(f"dir:{folder}").name == f"dir:{folder}"


def test_data_dir_missing_file(tmp_path: Path) -> None:
    payloads = fake_payloads()
    del payloads["t10k-labels-idx1-ubyte"]
    folder = write_dir(tmp_path / "d", payloads)
    with pytest.raises(DataError) as exc:
        load_dataset(data_dir=folder)
    msg = str(exc.value)
    assert str(folder) in msg and "t10k-labels-idx1-ubyte" in msg and "missing" in msg
    assert "train-images" not in msg.split("; ")[0]  # only the missing one is named as missing


def test_data_dir_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(data_dir=tmp_path / "absent")


def _bad_dir(tmp_path: Path, **replace: bytes) -> Path:
    payloads = fake_payloads()
    payloads.update({k.replace("_", "-"): v for k, v in replace.items()})
    return write_dir(tmp_path / "bad", payloads)


def test_counts_disagree(tmp_path: Path) -> None:
    folder = _bad_dir(tmp_path, **{"train_labels_idx1_ubyte": idx_bytes(np.zeros(29, np.uint8))})
    with pytest.raises(DataError, match="holds 30 images but .* holds 29 labels") as exc:
        load_dataset(data_dir=folder)
    assert "train-images-idx3-ubyte.gz" in str(exc.value) and "train-labels-idx1-ubyte.gz" in str(exc.value)


def test_label_out_of_range(tmp_path: Path) -> None:
    labels = np.zeros(10, np.uint8)
    labels[7] = 10
    folder = _bad_dir(tmp_path, **{"t10k_labels_idx1_ubyte": idx_bytes(labels)})
    with pytest.raises(DataError, match="label 10 at index 7 is outside 0..9") as exc:
        load_dataset(data_dir=folder)
    assert "t10k-labels-idx1-ubyte.gz" in str(exc.value)


def test_images_not_28x28(tmp_path: Path) -> None:
    folder = _bad_dir(tmp_path, **{"train_images_idx3_ubyte": idx_bytes(np.zeros((30, 27, 28), np.uint8))})
    with pytest.raises(DataError, match=r"N x 28 x 28.*\(30, 27, 28\)") as exc:
        load_dataset(data_dir=folder)
    assert "train-images-idx3-ubyte.gz" in str(exc.value)


def test_labels_not_1d(tmp_path: Path) -> None:
    folder = _bad_dir(tmp_path, **{"train_labels_idx1_ubyte": idx_bytes(np.zeros((30, 1), np.uint8))})
    with pytest.raises(DataError, match="one-dimensional") as exc:
        load_dataset(data_dir=folder)
    assert "train-labels-idx1-ubyte.gz" in str(exc.value)


def test_malformed_file_in_data_dir_is_named(tmp_path: Path) -> None:
    folder = _bad_dir(tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a gzip file") as exc:
        load_dataset(data_dir=folder)
    assert str(folder / "t10k-images-idx3-ubyte.gz") in str(exc.value)


def test_unknown_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*mnist-sample"):
        load_dataset("cifar")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(data.ENV_DATA)
    assert data.default_cache_dir() == Path.home() / ".cache" / "lenet_gpu"


# --------------------------------------------------------------------------------------------------
# mnist-sample
# --------------------------------------------------------------------------------------------------


def test_mnist_sample() -> None:
    ds = load_dataset("mnist-sample")
    assert ds.name == "mnist-sample"
    assert ds.train_images.shape == (4000, 28, 28) and ds.test_images.shape == (1000, 28, 28)
    assert ds.train_labels.shape == (4000,) and ds.test_labels.shape == (1000,)
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(ds.test_labels, minlength=10).tolist() == [100] * 10
    assert ds.classes == tuple(str(i) for i in range(10))
    # looks like MNIST digits: dark background, mean ~33, border mostly empty, centre inked
    imgs = np.concatenate([ds.train_images, ds.test_images]).astype(np.float64)
    assert 25 < imgs.mean() < 45
    assert 0.7 < (imgs == 0).mean() < 0.9
    assert imgs[:, :2, :].mean() < 1 and imgs[:, 10:18, 10:18].mean() > 60
    # classes interleaved, train and test disjoint
    assert len(set(ds.train_labels[:50].tolist())) == 10
    train_rows = {hashlib.sha1(im.tobytes()).digest() for im in ds.train_images}
    assert not train_rows & {hashlib.sha1(im.tobytes()).digest() for im in ds.test_images}


def test_mnist_sample_size_on_disk() -> None:
    files = list(data.MNIST_SAMPLE_DIR.glob("*.gz"))
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) <= 2 * 1024 * 1024


def test_mnist_sample_checksum_is_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    table = dict(data.MNIST_SAMPLE_IDX_SHA256)
    size, _ = table["t10k-labels-idx1-ubyte"]
    table["t10k-labels-idx1-ubyte"] = (size, "0" * 64)
    monkeypatch.setattr(data, "MNIST_SAMPLE_IDX_SHA256", table)
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        load_dataset("mnist-sample")
    assert "t10k-labels-idx1-ubyte.gz" in str(exc.value)


def _load_script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "make_mnist_sample", REPO / "scripts" / "make_mnist_sample.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_script_is_deterministic_and_stratified(tmp_path: Path) -> None:
    mod = _load_script()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 500)
    rng.shuffle(labels)
    images = np.zeros((5000, 28, 28), np.uint8)  # mostly blank, each one unique
    images[:, 0, 0], images[:, 0, 1], images[:, 14, 14] = (
        np.arange(5000) // 256,
        np.arange(5000) % 256,
        labels,
    )
    a, b = mod.build(images, labels), mod.build(images, labels)
    assert a == b  # byte-reproducible
    assert all(
        blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" for blob in a.values()
    )  # fixed header
    for name, blob in a.items():
        (tmp_path / name).write_bytes(blob)
    ds = load_dataset(data_dir=tmp_path)
    assert np.bincount(ds.train_labels).tolist() == [400] * 10
    assert np.bincount(ds.test_labels).tolist() == [100] * 10
    np.testing.assert_array_equal(ds.train_images[:, 14, 14], ds.train_labels)  # pairs kept together
    assert len(set(ds.train_labels[:50].tolist())) == 10  # classes interleaved
    # every source image is used exactly once
    got = [im.tobytes() for im in np.concatenate([ds.train_images, ds.test_images])]
    assert len(set(got)) == 5000 and set(got) == {im.tobytes() for im in images}
    assert mod.build(images, labels, seed=1) != a  # the seed matters


def test_sample_script_parses_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _load_script()
    monkeypatch.setattr(mod, "PER_CLASS", 2)
    rows = [[(r * 7 + c) % 256 for c in range(784)] + [r % 10] for r in range(20)]
    csv = "\n".join(",".join(map(str, row)) for row in rows).encode()
    images, labels = mod.parse_csv(gzip.compress(csv))
    assert (
        images.shape == (20, 28, 28)
        and images.dtype == np.uint8
        and labels.tolist() == [r % 10 for r in range(20)]
    )
    assert images[3, 0, 5] == (3 * 7 + 5) % 256
    with pytest.raises(SystemExit, match="2 digits per class"):
        mod.parse_csv(b"\n".join(csv.split(b"\n")[:-1]))
    with pytest.raises(SystemExit, match="785 columns"):
        mod.parse_csv(b"1,2,3\n")


# --------------------------------------------------------------------------------------------------
# downloads (real HTTP server on loopback)
# --------------------------------------------------------------------------------------------------


def test_download_good_is_cached(server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    url = server.serve("good", fake_mnist)
    ds = load_dataset("mnist", cache_dir=cache, mirrors=[url], progress=True)
    assert ds.name == "mnist" and ds.source == str(cache / "mnist")
    assert ds.train_images.shape == (30, 28, 28) and ds.test_labels.shape == (10,)
    assert all_files(cache) == sorted(f"mnist/{n}" for n in fake_mnist)
    for n, b in fake_mnist.items():
        assert (cache / "mnist" / n).read_bytes() == b
    # second time: straight from the cache, no request
    n_requests = len(server.requests)
    ds2 = load_dataset("mnist", cache_dir=cache, mirrors=[url], download=False)
    np.testing.assert_array_equal(ds2.train_images, ds.train_images)
    assert len(server.requests) == n_requests


def test_download_checksum_mismatch_leaves_nothing(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    bad = dict(fake_mnist)
    bad["t10k-images-idx3-ubyte.gz"] = gz(fake_payloads(seed=1)["t10k-images-idx3-ubyte"])
    url = server.serve("bad", bad)
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        load_dataset("mnist", cache_dir=cache, mirrors=[url], progress=False)
    assert url + "t10k-images-idx3-ubyte.gz" in str(exc.value)
    files = all_files(cache)
    assert "mnist/t10k-images-idx3-ubyte.gz" not in files
    assert not [f for f in files if f.endswith(".part") or "/." in f]


def test_dead_and_404_mirrors_move_on(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    refused = f"http://127.0.0.1:{dead_port()}/mnist/"
    empty = server.url("empty")  # every file 404s
    good = server.serve("good", fake_mnist)
    ds = load_dataset("mnist", cache_dir=cache, mirrors=[refused, empty, good], progress=False)
    assert ds.name == "mnist"
    assert sorted(r for r in server.requests if r.startswith("/good/")) == sorted(
        f"/good/{n}" for n in fake_mnist
    )
    assert len([r for r in server.requests if r.startswith("/empty/")]) == 4  # a 404 is per file


def test_all_mirrors_fail_lists_each(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    refused = f"http://127.0.0.1:{dead_port()}/mnist/"
    missing = server.url("empty")
    corrupt = server.serve("corrupt", {n: b"\x1f\x8b garbage" for n in fake_mnist})
    forbidden = server.serve("forbidden", {n: ("status", 403) for n in fake_mnist})
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", cache_dir=cache, mirrors=[refused, missing, corrupt, forbidden], progress=False)
    msg = str(exc.value)
    assert "from any of 4 mirrors" in msg
    assert refused in msg and "cannot connect" in msg
    assert missing in msg and "HTTP 404" in msg
    assert corrupt in msg and "checksum mismatch" in msg
    assert forbidden in msg and "HTTP 403" in msg
    assert all_files(cache) == []


def test_no_mirror_reachable(tmp_path: Path) -> None:
    mirrors = [f"http://127.0.0.1:{dead_port()}/a/", f"http://127.0.0.1:{dead_port()}/b/"]
    with pytest.raises(DataError, match="no mirror is reachable") as exc:
        load_dataset("mnist", cache_dir=tmp_path / "cache", mirrors=mirrors)
    assert mirrors[0] in str(exc.value) and mirrors[1] in str(exc.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["truncate", "nolength"])
def test_interrupted_download_leaves_nothing(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path, kind: str
) -> None:
    """The server closes the connection early (announced length not reached / no length at all)."""
    cache = tmp_path / "cache"
    name = "train-images-idx3-ubyte.gz"
    body = fake_mnist[name]
    routes: dict[str, object] = dict(fake_mnist)
    routes[name] = ("truncate", body, len(body) // 2) if kind == "truncate" else ("nolength", body[:-100])
    url = server.serve("cut", routes)
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", cache_dir=cache, mirrors=[url], progress=False)
    expected = "incomplete download" if kind == "truncate" else "checksum mismatch"
    assert expected in str(exc.value) and name in str(exc.value)
    files = all_files(cache)
    assert f"mnist/{name}" not in files and not [f for f in files if f.endswith(".part")]
    # and a good second mirror rescues it
    good = server.serve("good", fake_mnist)
    ds = load_dataset("mnist", cache_dir=cache, mirrors=[url, good], progress=False)
    assert ds.train_images.shape == (30, 28, 28)
    assert all_files(cache) == sorted(f"mnist/{n}" for n in fake_mnist)


def test_stalled_mirror_times_out_and_moves_on(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "READ_TIMEOUT", 0.3)
    cache = tmp_path / "cache"
    stall = server.serve("stall", {n: ("stall", b, 10, 1.5) for n, b in fake_mnist.items()})
    good = server.serve("good", fake_mnist)
    t0 = time.monotonic()
    ds = load_dataset("mnist", cache_dir=cache, mirrors=[stall, good], progress=False)
    assert ds.name == "mnist"
    # the stalled mirror is given up after the first file, not retried for each
    assert len([r for r in server.requests if r.startswith("/stall/")]) == 1
    assert time.monotonic() - t0 < 5
    assert all_files(cache) == sorted(f"mnist/{n}" for n in fake_mnist)


def test_corrupt_cache_entry_is_downloaded_again(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    write_dir(cache / "mnist", {})
    for n, b in fake_mnist.items():
        (cache / "mnist" / n).write_bytes(b)
    (cache / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(DataError, match="fails verification"):
        load_dataset("mnist", cache_dir=cache, download=False)
    url = server.serve("good", fake_mnist)
    load_dataset("mnist", cache_dir=cache, mirrors=[url], progress=False)
    assert server.requests == ["/good/train-labels-idx1-ubyte.gz"]
    assert (cache / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes() == fake_mnist[
        "train-labels-idx1-ubyte.gz"
    ]


def test_mirrors_from_env(
    server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = server.serve("env", fake_mnist)
    monkeypatch.setenv(data.ENV_MNIST_MIRRORS, f" http://127.0.0.1:{dead_port()}/x , {good.rstrip('/')}")
    ds = load_dataset("mnist", cache_dir=tmp_path / "cache", progress=False)
    assert ds.name == "mnist" and any(r.startswith("/env/") for r in server.requests)


def test_mnist_offline_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    with pytest.raises(DataError, match="LENET_GPU_OFFLINE=1") as exc:
        load_dataset("mnist", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "mnist") in str(exc.value)


# --------------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------------


def test_auto_offline_uses_sample(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    ds = load_dataset(None, cache_dir=tmp_path / "cache", mirrors=[server.url("x")])
    assert ds.name == "mnist-sample"
    assert "fallback" in ds.source and "LENET_GPU_OFFLINE" in ds.source
    assert server.requests == []  # the network was not touched
    assert load_dataset("auto", cache_dir=tmp_path / "cache").name == "mnist-sample"


def test_auto_uses_cached_mnist(
    fake_mnist: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    (cache / "mnist").mkdir(parents=True)
    for n, b in fake_mnist.items():
        (cache / "mnist" / n).write_bytes(b)
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    ds = load_dataset(None, cache_dir=cache)
    assert ds.name == "mnist" and ds.source == str(cache / "mnist")
    # the default cache dir comes from $LENET_GPU_DATA
    monkeypatch.setenv(data.ENV_DATA, str(cache))
    assert load_dataset(None).name == "mnist"


def test_auto_downloads_mnist(server: FakeServer, fake_mnist: dict[str, bytes], tmp_path: Path) -> None:
    url = server.serve("good", fake_mnist)
    ds = load_dataset(None, cache_dir=tmp_path / "cache", mirrors=[url], progress=False)
    assert ds.name == "mnist"


def test_auto_falls_back_fast_when_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror whose connection (or DNS lookup) hangs is abandoned after AUTO_CONNECT_TIMEOUT."""
    real_connect: Callable[[str, int, float], None] = data._tcp_connect

    def hanging_connect(host: str, port: int, timeout: float) -> None:
        if host.endswith(".invalid"):
            time.sleep(3)
            raise TimeoutError("timed out")
        real_connect(host, port, timeout)

    monkeypatch.setattr(data, "_tcp_connect", hanging_connect)
    monkeypatch.setattr(data, "AUTO_CONNECT_TIMEOUT", 0.3)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="lenet_gpu.data"):
        ds = load_dataset(None, cache_dir=tmp_path / "cache", mirrors=["http://mirror.invalid/mnist/"])
    assert time.monotonic() - t0 < 2
    assert ds.name == "mnist-sample" and "no mirror is reachable" in ds.source
    assert "using the bundled mnist-sample" in caplog.text and "mirror.invalid" in caplog.text


def test_auto_falls_back_on_failed_download(server: FakeServer, tmp_path: Path) -> None:
    url = server.url("empty")  # reachable, but 404 for everything
    ds = load_dataset(None, cache_dir=tmp_path / "cache", mirrors=[url])
    assert ds.name == "mnist-sample" and "cannot download" in ds.source
    assert data.MNIST_SAMPLE_DIR.name in ds.source


# --------------------------------------------------------------------------------------------------
# fashion-mnist
# --------------------------------------------------------------------------------------------------

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason="Debian package dataset-fashion-mnist is not installed (apt install dataset-fashion-mnist)",
)
def test_fashion_from_debian() -> None:
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.name == "fashion-mnist" and ds.source == str(DEBIAN_FASHION)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10


@pytest.fixture
def fake_fashion(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Fake Fashion-MNIST payloads, with the payload checksum table patched to match."""
    payloads = fake_payloads(seed=7)
    monkeypatch.setattr(data, "FASHION_MNIST_IDX_SHA256", sha_table(payloads))
    return payloads


def test_fashion_from_system_dir(
    fake_fashion: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sysdir = write_dir(tmp_path / "usr-share", fake_fashion)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", (tmp_path / "absent", sysdir))
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=False)
    assert ds.name == "fashion-mnist" and ds.source == str(sysdir)
    assert ds.classes == data.FASHION_MNIST_CLASSES
    # raw (uncompressed) copies carry the same payload checksum
    rawdir = write_dir(tmp_path / "raw", fake_fashion, compress=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", (rawdir,))
    assert load_dataset("fashion-mnist", download=False).source == str(rawdir)


def test_fashion_bad_system_copy_falls_through_to_download(
    server: FakeServer, fake_fashion: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = dict(fake_fashion)
    bad["train-labels-idx1-ubyte"] = idx_bytes(np.full(30, 3, np.uint8))
    sysdir = write_dir(tmp_path / "usr-share", bad)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIRS", (sysdir,))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not in the cache"):
        load_dataset("fashion-mnist", cache_dir=cache, download=False)
    # the mirror's .gz files differ from ours (file name in the gzip header): payload check still passes
    url = server.serve("fashion", {b + ".gz": gz(p, filename=b) for b, p in fake_fashion.items()})
    ds = load_dataset("fashion-mnist", cache_dir=cache, mirrors=[url], progress=False)
    assert ds.source == str(cache / "fashion-mnist")
    assert all_files(cache) == sorted(f"fashion-mnist/{b}.gz" for b in fake_fashion)
    # a corrupt download (wrong payload) is rejected and not cached
    cache2 = tmp_path / "cache2"
    url2 = server.serve("fashion-bad", {b + ".gz": gz(p) for b, p in bad.items()})
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion-mnist", cache_dir=cache2, mirrors=[url2], progress=False)
    assert "fashion-mnist/train-labels-idx1-ubyte.gz" not in all_files(cache2)
    assert not [f for f in all_files(cache2) if f.endswith(".part")]


# --------------------------------------------------------------------------------------------------
# stratified_indices (what --limit N samples)
# --------------------------------------------------------------------------------------------------


def test_stratified_indices_proportions() -> None:
    # unbalanced classes, labels sorted by class, as the first N of such a file would fail badly
    labels = np.repeat(np.arange(10, dtype=np.uint8), [50, 150, 100, 100, 100, 100, 100, 100, 100, 100])
    idx = data.stratified_indices(labels, 100, seed=0)
    assert idx.dtype == np.int64 and idx.shape == (100,)
    assert np.array_equal(idx, np.unique(idx))  # sorted ascending, no repeats
    got = np.bincount(labels[idx], minlength=10)
    assert got.tolist() == [5, 15, 10, 10, 10, 10, 10, 10, 10, 10]
    # remainders: 7 of 3 classes with counts 1/3 each -> 7/3 = 2.33 each; largest remainder, then lower label
    labels3 = np.repeat(np.array([0, 1, 2]), 10)
    assert np.bincount(labels3[data.stratified_indices(labels3, 7)]).tolist() == [3, 2, 2]
    # every class within one of its exact share, on a real dataset
    ds = load_dataset("mnist-sample")
    for n in (1, 37, 500, 3999):
        idx = data.stratified_indices(ds.train_labels, n, seed=3)
        share = n * np.bincount(ds.train_labels, minlength=10) / len(ds.train_labels)
        got = np.bincount(ds.train_labels[idx], minlength=10)
        assert got.sum() == n and np.all(np.abs(got - share) < 1), (n, got, share)


def test_stratified_indices_deterministic_and_seeded() -> None:
    labels = np.random.default_rng(5).integers(0, 10, 1000).astype(np.uint8)
    a = data.stratified_indices(labels, 123, seed=0)
    assert np.array_equal(a, data.stratified_indices(labels.copy(), 123, seed=0))
    b = data.stratified_indices(labels, 123, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(np.bincount(labels[a], minlength=10), np.bincount(labels[b], minlength=10))
    # a sample, not a prefix: it reaches across the whole set
    assert a.max() > 500


def test_stratified_indices_everything_and_errors() -> None:
    labels = np.array([3, 1, 3, 2], np.int32)
    for n in (4, 5, 10**6):
        assert np.array_equal(data.stratified_indices(labels, n), np.arange(4))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            data.stratified_indices(labels, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D integer"):
        data.stratified_indices(labels.reshape(2, 2), 1)
    with pytest.raises(ValueError, match="1-D integer"):
        data.stratified_indices(labels.astype(np.float32), 1)
