"""Datasets: strict IDX parsing, a small registry, and download + verify + atomic cache.

Datasets (docs/DESIGN.md §7):

- ``mnist``: the four ``.gz`` files from the usual mirrors, SHA-256 checked, cached atomically under
  ``default_cache_dir() / "mnist"``.
- ``mnist-sample``: 5,000 real MNIST digits (4,000 train / 1,000 test, stratified) bundled in the
  package as four gzipped IDX files, so that everything works offline.
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` copy (``/usr/share/datasets/fashion-mnist``),
  else the cache, else a download. Checked by the SHA-256 of the *decompressed* IDX payload, so one
  check serves a download, a Debian (recompressed) copy and a raw file alike.
- ``data_dir=DIR``: any folder holding the four IDX files, raw or gzipped (parsed strictly, not
  checksummed: they are the user's files).
- ``None`` / ``"auto"``: full MNIST if cached or downloadable, else ``mnist-sample``; the fallback is
  logged and recorded in ``Dataset.source``.

Environment: ``LENET_GPU_DATA`` (cache dir), ``LENET_GPU_OFFLINE=1`` (never touch the network),
``LENET_GPU_MNIST_MIRRORS`` / ``LENET_GPU_FASHION_MIRRORS`` (comma-separated base URLs).

The checksum tables and mirror lists are module-level so tests can monkeypatch them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import queue
import socket
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "read_idx",
    "stratified_indices",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Registry and facts (docs/DESIGN.md §7)
# --------------------------------------------------------------------------------------------------

DATASETS: tuple[str, ...] = ("mnist", "mnist-sample", "fashion-mnist")

#: The four IDX files of a dataset, without the ``.gz`` suffix: (train images, train labels,
#: test images, test labels).
IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: (size in bytes, SHA-256) of each MNIST ``.gz`` file as served by the mirrors.
MNIST_GZ_SHA256: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte.gz": (
        9_912_422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    "train-labels-idx1-ubyte.gz": (
        28_881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    "t10k-images-idx3-ubyte.gz": (
        1_648_877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        4_542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
}

FASHION_MNIST_MIRRORS: tuple[str, ...] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

#: (size in bytes, SHA-256) of each *decompressed* Fashion-MNIST IDX payload.
FASHION_MNIST_IDX_SHA256: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (
        47_040_016,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte": (
        60_008,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte": (
        7_840_016,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte": (
        10_008,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}

#: Where system packages put Fashion-MNIST (Debian/Ubuntu: ``apt install dataset-fashion-mnist``).
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

#: The bundled sample, written by ``scripts/make_mnist_sample.py``.
MNIST_SAMPLE_DIR: Path = Path(__file__).resolve().parent / "datasets" / "mnist-sample"

#: (size in bytes, SHA-256) of each *decompressed* mnist-sample IDX payload.
MNIST_SAMPLE_IDX_SHA256: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (
        3_136_016,
        "07c0d9a96d5429326c783f18a79a8c188cb33f2ebb48c113fcab19c6ffde54e1",
    ),
    "train-labels-idx1-ubyte": (
        4_008,
        "b89c3c1ef8efc5a48b3ee98c2d20ebcaa457b1bf05433960022eec83454e9fe5",
    ),
    "t10k-images-idx3-ubyte": (
        784_016,
        "f6d10943538967e1af8547532ef7d8c97ed5e8cff79d40805c8455dbee14f98a",
    ),
    "t10k-labels-idx1-ubyte": (
        1_008,
        "f035da5bf3facf4c08c944277a1bcf5394661eaf23aa7fbf98ed10ea20f031a2",
    ),
}

ENV_DATA = "LENET_GPU_DATA"
ENV_OFFLINE = "LENET_GPU_OFFLINE"
ENV_MNIST_MIRRORS = "LENET_GPU_MNIST_MIRRORS"
ENV_FASHION_MIRRORS = "LENET_GPU_FASHION_MIRRORS"

#: Seconds to wait for a TCP connection to the mirrors before calling them unreachable
#: (includes the DNS lookup). ``AUTO_CONNECT_TIMEOUT`` applies to ``load_dataset(None)``.
CONNECT_TIMEOUT: float = 10.0
AUTO_CONNECT_TIMEOUT: float = 5.0
#: Socket timeout for the HTTP request itself: a stall longer than this abandons the mirror.
READ_TIMEOUT: float = 30.0
#: No dataset file is this large; a server sending more is cut off.
MAX_DOWNLOAD_BYTES: int = 256 * 1024 * 1024
USER_AGENT = "lenet_gpu/0.1 (+https://github.com/; python-urllib)"

_IDX_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16
_STALE_TEMP_SECONDS = 24 * 3600


# --------------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------------


class DataError(Exception):
    """Any problem with a dataset: a missing, malformed, corrupt or undownloadable file.

    The message names the file (or folder, or dataset) concerned.
    """


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split of 28x28 uint8 images with uint8 labels 0..9."""

    name: str  # "mnist", "mnist-sample", "fashion-mnist", or "dir:<path>"
    train_images: np.ndarray  # (N, 28, 28) uint8, C-contiguous
    train_labels: np.ndarray  # (N,) uint8, values 0..9
    test_images: np.ndarray  # (M, 28, 28) uint8, C-contiguous
    test_labels: np.ndarray  # (M,) uint8
    source: str  # where it came from, human readable (path or URL)
    classes: tuple[str, ...]  # class names, index = label

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _decompress(raw: bytes, path: Path) -> bytes:
    """The IDX payload of a file's bytes: gunzipped for ``*.gz``, as is otherwise."""
    if not raw:
        raise DataError(f"{path}: empty file (0 bytes)")
    if path.name.endswith(".gz"):
        if raw[:2] != _GZIP_MAGIC:
            raise DataError(
                f"{path}: not a gzip file (the name ends in .gz but the data starts with "
                f"{raw[:4].hex()}, not the gzip magic 1f8b)"
            )
        try:
            payload = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data: {e}") from None
        if not payload:
            raise DataError(f"{path}: empty file (the gzip stream decompresses to 0 bytes)")
        return payload
    if raw[:2] == _GZIP_MAGIC:
        raise DataError(f"{path}: the data is gzip-compressed but the name does not end in .gz")
    return raw


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes; the magic number alone is 4)")
    z0, z1, code, ndim = data[:4]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic number 0x{data[:4].hex()}; expected 0x0000 followed by "
            "a dtype code and the number of dimensions, e.g. 0x00000803)"
        )
    if code != 0x08:
        raise DataError(
            f"{path}: IDX dtype code 0x{code:02x} ({_IDX_DTYPES[code]}) is not supported; "
            "lenet_gpu reads only 0x08 (uint8)"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need a {header}-byte header, "
            f"the file has {len(data)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = 1
    for d in dims:
        expected *= d
    got = len(data) - header
    shape = "x".join(map(str, dims))
    if got < expected:
        raise DataError(
            f"{path}: truncated: shape {shape} needs {expected} bytes of data, the file has {got}"
        )
    if got > expected:
        raise DataError(
            f"{path}: {got - expected} trailing bytes after the {expected} bytes of data "
            f"that shape {shape} declares"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (raw, or gzipped if its name ends in ``.gz``) strictly.

    Checks the magic number, that the dtype code is 0x08 (uint8), the dimensions, and that the data
    is exactly as long as the dimensions say. Returns a writable, C-contiguous uint8 array of the
    declared shape. Raises :class:`DataError` naming the file on any problem.
    """
    p = Path(path)
    return _parse_idx(_decompress(_read_bytes(p), p), p)


def _validate_split(
    images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images must be N x 28 x 28, this file holds shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(
            f"{lbl_path}: labels must be one-dimensional (IDX1), this file holds shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{img_path}: holds no images")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{lbl_path}: label {int(labels[i])} at index {i} is outside 0..9 ({bad.size} such labels)"
        )
    return np.ascontiguousarray(images), np.ascontiguousarray(labels)


_Verify = Callable[[str, bytes, bytes], "str | None"]


def _load_files(
    name: str,
    source: str,
    classes: tuple[str, ...],
    files: Mapping[str, Path],
    verify: _Verify | None = None,
) -> Dataset:
    """Build a Dataset from ``{idx base name: path}``; ``verify(base, raw, payload)`` -> error or None."""
    arrays = {}
    for base in IDX_FILES:
        p = files[base]
        raw = _read_bytes(p)
        payload = _decompress(raw, p)
        if verify is not None:
            err = verify(base, raw, payload)
            if err is not None:
                raise DataError(f"{p}: {err}")
        arrays[base] = _parse_idx(payload, p)
    tr_i, tr_l, te_i, te_l = IDX_FILES
    train = _validate_split(arrays[tr_i], arrays[tr_l], files[tr_i], files[tr_l])
    test = _validate_split(arrays[te_i], arrays[te_l], files[te_i], files[te_l])
    return Dataset(name, train[0], train[1], test[0], test[1], source, classes)


def _find_idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in ``folder`` (raw preferred over ``.gz``); DataError naming what is missing."""
    if not folder.is_dir():
        raise DataError(
            f"data dir {folder}: not a directory" if folder.exists() else f"data dir {folder}: does not exist"
        )
    found: dict[str, Path] = {}
    missing = []
    for base in IDX_FILES:
        alt = base.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte, as some archives unpack
        for cand in (base, base + ".gz", alt, alt + ".gz"):
            if (folder / cand).is_file():
                found[base] = folder / cand
                break
        else:
            missing.append(base)
    if missing:
        raise DataError(
            f"data dir {folder}: missing {', '.join(f'{m} (or {m}.gz)' for m in missing)}; "
            f"a data dir must hold all four of {', '.join(IDX_FILES)}"
        )
    return found


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def _check_bytes(data: bytes, expected: tuple[int, str]) -> str | None:
    size, sha = expected
    got = hashlib.sha256(data).hexdigest()
    if len(data) == size and got == sha:
        return None
    return f"checksum mismatch: SHA-256 {got} ({len(data)} bytes), expected {sha} ({size} bytes)"


def _payload_verifier(table: Mapping[str, tuple[int, str]]) -> _Verify:
    def verify(base: str, raw: bytes, payload: bytes) -> str | None:
        return _check_bytes(payload, table[base])

    return verify


def _digest_recorder(out: dict[str, tuple[str, str]]) -> _Verify:
    """A verifier that accepts everything and records (SHA-256 of the file, of its IDX payload) per base name."""

    def record(base: str, raw: bytes, payload: bytes) -> None:
        raw_sha = hashlib.sha256(raw).hexdigest()
        out[base] = (raw_sha, raw_sha if payload is raw or payload == raw else hashlib.sha256(payload).hexdigest())
        return None

    return record


def recognize(digests: Mapping[str, tuple[str, str]]) -> str | None:
    """"fashion-mnist" when the four IDX payloads are Fashion-MNIST's (by SHA-256), "mnist" when the four files
    are MNIST's ``.gz`` files as the mirrors serve them, else None. ``digests``: base name → (SHA-256 of the
    file, SHA-256 of its decompressed payload)."""
    if set(digests) != set(IDX_FILES):
        return None
    if all(digests[b][1] == FASHION_MNIST_IDX_SHA256[b][1] for b in IDX_FILES):
        return "fashion-mnist"
    if all(digests[b][0] == MNIST_GZ_SHA256[b + ".gz"][1] for b in IDX_FILES):
        return "mnist"
    return None


def _check_cached(
    path: Path, expected: tuple[int, str], payload: bool, name: Path | None = None
) -> str | None:
    """None if ``path`` matches ``expected`` (of the file, or of its decompressed payload), else why not.

    ``name``: the path whose suffix decides whether to gunzip (a download's temp file has its own).
    """
    name = name or path
    try:
        raw = _read_bytes(path)
        data = _decompress(raw, name) if payload else raw
    except DataError as e:
        return str(e).removeprefix(f"{path}: ").removeprefix(f"{name}: ")
    return _check_bytes(data, expected)


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


class _MirrorError(Exception):
    """One mirror failed for one file. ``dead``: the mirror itself is unreachable; skip it from now on."""

    def __init__(self, msg: str, *, dead: bool = False) -> None:
        super().__init__(msg)
        self.dead = dead


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _mirror_list(mirrors: Sequence[str] | None, env: str, default: Sequence[str]) -> list[str]:
    if mirrors is None:
        from_env = os.environ.get(env, "").strip()
        mirrors = [m for m in (s.strip() for s in from_env.split(",")) if m] if from_env else list(default)
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    out = [m if m.endswith("/") else m + "/" for m in mirrors]
    if not out:
        raise DataError("no download mirrors given")
    return out


def _tcp_connect(host: str, port: int, timeout: float) -> None:
    """Open and close one TCP connection (DNS lookup included). Tests may replace this."""
    socket.create_connection((host, port), timeout=timeout).close()


def _connect_target(url: str) -> tuple[str, int] | None:
    """The (host, port) that fetching ``url`` connects to first (the proxy, if one applies)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(u.hostname):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return u.hostname, u.port or (443 if u.scheme == "https" else 80)


def _probe(mirrors: Sequence[str], timeout: float) -> dict[str, str]:
    """Try a TCP connection to every mirror at once; return ``{mirror: why}`` for the unreachable ones.

    Stops waiting as soon as the first mirror in order that answers is known (later ones are tried
    normally if needed) and never waits longer than ``timeout`` in all, however slow DNS is, so a
    machine with no network falls back within ``timeout`` seconds.
    """
    results: dict[str, str | None] = {}
    q: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def worker(mirror: str, host: str, port: int) -> None:
        try:
            _tcp_connect(host, port, timeout)
            q.put((mirror, None))
        except OSError as e:
            q.put((mirror, f"cannot connect to {host}:{port}: {e.strerror or e}"))

    for m in mirrors:
        target = _connect_target(m)
        if target is None:
            results[m] = None  # file:// and the like: nothing to probe
        else:
            threading.Thread(target=worker, args=(m, *target), daemon=True, name="lenet-probe").start()
    deadline = time.monotonic() + timeout
    while True:
        for m in mirrors:
            if m not in results:
                break  # must hear from this one first
            if results[m] is None:
                return {k: v for k, v in results.items() if v is not None}
        else:
            return {k: v for k, v in results.items() if v is not None}  # all answered, all failed
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for m in mirrors:
                results.setdefault(m, f"no connection within {timeout:g} s")
            return {k: v for k, v in results.items() if v is not None}
        with contextlib.suppress(queue.Empty):
            m, why = q.get(timeout=remaining)
            results[m] = why


def _remove_stale_temps(folder: Path) -> None:
    """Remove temp files left by a download that was killed outright (older than a day)."""
    now = time.time()
    for p in folder.glob(".*.part"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TEMP_SECONDS:
                p.unlink()


def _download(url: str, dest: Path, check: Callable[[Path], str | None], *, progress: bool) -> None:
    """Fetch ``url`` into ``dest`` atomically: temp file in the same folder, verify, ``os.replace``.

    Raises _MirrorError for anything the mirror did wrong (nothing is left behind), DataError for a
    local problem (cannot write the cache).
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to the cache dir {dest.parent}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                resp = urllib.request.urlopen(req, timeout=READ_TIMEOUT)
            except urllib.error.HTTPError as e:
                e.close()
                raise _MirrorError(f"HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                reason = e.reason
                text = "timed out" if isinstance(reason, TimeoutError) else getattr(reason, "strerror", None)
                raise _MirrorError(f"cannot connect: {text or reason}", dead=True) from None
            except TimeoutError:
                raise _MirrorError(f"timed out after {READ_TIMEOUT:g} s", dead=True) from None
            except (OSError, http.client.HTTPException) as e:
                raise _MirrorError(f"connection failed: {e!r}", dead=True) from None
            with resp:
                length_hdr = resp.headers.get("Content-Length")
                length = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
                if length is not None and length > MAX_DOWNLOAD_BYTES:
                    raise _MirrorError(f"server announces {length} bytes, more than any dataset file")
                n = 0
                with tqdm(
                    total=length,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=True,
                ) as bar:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except TimeoutError:
                            raise _MirrorError(
                                f"stalled for {READ_TIMEOUT:g} s after {n} bytes", dead=True
                            ) from None
                        except (OSError, http.client.HTTPException) as e:
                            raise _MirrorError(f"connection lost after {n} bytes: {e!r}") from None
                        if not chunk:
                            break
                        n += len(chunk)
                        if n > MAX_DOWNLOAD_BYTES:
                            raise _MirrorError(f"more than {MAX_DOWNLOAD_BYTES} bytes; giving up")
                        try:
                            out.write(chunk)
                        except OSError as e:
                            raise DataError(f"{tmp}: cannot write: {e.strerror or e}") from None
                        bar.update(len(chunk))
                if length is not None and n != length:
                    raise _MirrorError(f"incomplete download: connection closed after {n} of {length} bytes")
        err = check(tmp)
        if err is not None:
            raise _MirrorError(err)
        os.replace(tmp, dest)
        done = True
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _fetch_all(
    dataset: str,
    folder: Path,
    needed: Sequence[tuple[str, Callable[[Path], str | None]]],
    mirrors: Sequence[str],
    *,
    progress: bool,
    connect_timeout: float,
) -> None:
    """Download each ``(file name, check)`` into ``folder``, trying mirrors in turn."""
    dead = _probe(mirrors, connect_timeout)
    if len(dead) == len(mirrors):
        lines = "\n".join(f"  - {m}: {dead[m]}" for m in mirrors)
        raise DataError(f"cannot download {dataset}: no mirror is reachable:\n{lines}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache dir {folder}: {e.strerror or e} (set ${ENV_DATA} or pass cache_dir)"
        ) from None
    _remove_stale_temps(folder)
    for fname, check in needed:
        failures = []
        for m in mirrors:
            url = urllib.parse.urljoin(m, fname)
            if m in dead:
                failures.append(f"{url}: {dead[m]}")
                continue
            log.info("downloading %s", url)
            try:
                _download(url, folder / fname, check, progress=progress)
            except _MirrorError as e:
                log.warning("%s: %s", url, e)
                failures.append(f"{url}: {e}")
                if e.dead:
                    dead[m] = str(e)
                continue
            log.info("saved %s", folder / fname)
            break
        else:
            lines = "\n".join(f"  - {f}" for f in failures)
            raise DataError(
                f"cannot download {fname} ({dataset}) from any of {len(mirrors)} mirrors:\n{lines}"
            )


def _load_cached(
    dataset: str,
    classes: tuple[str, ...],
    folder: Path,
    expected: Mapping[str, tuple[int, str]],
    *,
    payload: bool,
    mirrors: Sequence[str],
    download: bool,
    no_download_why: str,
    progress: bool,
    connect_timeout: float,
) -> Dataset:
    """Load ``dataset`` from ``folder`` (the cache), downloading what is missing or corrupt.

    ``expected`` is keyed by the IDX base name; it holds the checksum of the decompressed payload
    if ``payload`` else of the ``.gz`` file.
    """
    needed = []
    for base in IDX_FILES:
        fname = base + ".gz"
        exp = expected[base]
        path = folder / fname

        def check(p: Path, exp: tuple[int, str] = exp, dest: Path = path) -> str | None:
            return _check_cached(p, exp, payload, name=dest)

        if path.is_file():
            err = check(path)
            if err is None:
                continue
            if not download:
                raise DataError(f"{path}: cached file fails verification ({err}); {no_download_why}")
            log.warning("%s: cached file fails verification (%s); downloading it again", path, err)
        needed.append((fname, check))
    if needed:
        names = ", ".join(f for f, _ in needed)
        if not download:
            raise DataError(f"{dataset} is not in the cache {folder} (missing {names}); {no_download_why}")
        _fetch_all(dataset, folder, needed, mirrors, progress=progress, connect_timeout=connect_timeout)
    files = {base: folder / (base + ".gz") for base in IDX_FILES}
    return _load_files(dataset, str(folder), classes, files)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LENET_GPU_DATA`` if set, else ``~/.cache/lenet_gpu``."""
    env = os.environ.get(ENV_DATA, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lenet_gpu"


def _download_policy(download: bool) -> tuple[bool, str]:
    if _env_flag(ENV_OFFLINE):
        return False, f"downloading is disabled (${ENV_OFFLINE}=1)"
    if not download:
        return False, "downloading is disabled (download=False)"
    return True, ""


def _load_mnist(
    cache_root: Path,
    *,
    download: bool,
    progress: bool,
    mirrors: Sequence[str] | None,
    connect_timeout: float,
) -> Dataset:
    allowed, why = _download_policy(download)
    expected = {base: MNIST_GZ_SHA256[base + ".gz"] for base in IDX_FILES}
    return _load_cached(
        "mnist",
        MNIST_CLASSES,
        cache_root / "mnist",
        expected,
        payload=False,
        mirrors=_mirror_list(mirrors, ENV_MNIST_MIRRORS, MNIST_MIRRORS),
        download=allowed,
        no_download_why=why,
        progress=progress,
        connect_timeout=connect_timeout,
    )


def _load_fashion(
    cache_root: Path, *, download: bool, progress: bool, mirrors: Sequence[str] | None
) -> Dataset:
    verify = _payload_verifier(FASHION_MNIST_IDX_SHA256)
    for sysdir in FASHION_MNIST_SYSTEM_DIRS:
        if not sysdir.is_dir():
            continue
        try:
            ds = _load_files(
                "fashion-mnist", str(sysdir), FASHION_MNIST_CLASSES, _find_idx_files(sysdir), verify
            )
        except DataError as e:
            log.warning("not using %s: %s", sysdir, e)
            continue
        log.info("fashion-mnist: using the system copy in %s", sysdir)
        return ds
    allowed, why = _download_policy(download)
    return _load_cached(
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        cache_root / "fashion-mnist",
        FASHION_MNIST_IDX_SHA256,
        payload=True,
        mirrors=_mirror_list(mirrors, ENV_FASHION_MIRRORS, FASHION_MNIST_MIRRORS),
        download=allowed,
        no_download_why=why + "; on Debian/Ubuntu `apt install dataset-fashion-mnist` provides it",
        progress=progress,
        connect_timeout=CONNECT_TIMEOUT,
    )


def _load_sample() -> Dataset:
    d = MNIST_SAMPLE_DIR
    files = {base: d / (base + ".gz") for base in IDX_FILES}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"mnist-sample: the bundled files are missing from {d}: {', '.join(missing)} (broken install?)"
        )
    return _load_files(
        "mnist-sample", str(d), MNIST_CLASSES, files, _payload_verifier(MNIST_SAMPLE_IDX_SHA256)
    )


def _load_auto(cache_root: Path, *, download: bool, progress: bool, mirrors: Sequence[str] | None) -> Dataset:
    try:
        ds = _load_mnist(
            cache_root,
            download=download,
            progress=progress,
            mirrors=mirrors,
            connect_timeout=AUTO_CONNECT_TIMEOUT,
        )
    except DataError as e:
        reason = str(e)
    else:
        log.info("dataset: full MNIST from %s", ds.source)
        return ds
    log.warning("full MNIST is not available, using the bundled mnist-sample instead: %s", reason)
    sample = _load_sample()
    short = reason.splitlines()[0].rstrip(":")
    return replace(sample, source=f"{sample.source} (fallback: {short})")


def load_dataset(
    name: str | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Load a dataset by name (one of :data:`DATASETS`, or ``None``/``"auto"``) or from ``data_dir``.

    - ``None`` / ``"auto"``: full MNIST if it is cached or can be downloaded, else ``mnist-sample``
      (the reason is logged as a warning and appended to ``Dataset.source``). With
      ``LENET_GPU_OFFLINE=1`` the network is not touched; an unreachable network is detected within
      ``AUTO_CONNECT_TIMEOUT`` seconds.
    - ``data_dir``: the four IDX files in that folder (raw or ``.gz``); the name is ``"dir:<path>"``
      unless ``name`` is given too (``"dir:<path>"`` as a name means the same thing).
    - ``cache_dir``: where downloads are kept (default :func:`default_cache_dir`).
    - ``download``: allow downloading; ``progress``: show a progress bar while downloading.
    - ``mirrors``: base URLs to download from instead of the built-in list (or
      ``$LENET_GPU_MNIST_MIRRORS`` / ``$LENET_GPU_FASHION_MIRRORS``).

    Raises :class:`DataError` on any problem.
    """
    if name is not None and name.startswith("dir:") and data_dir is None:
        data_dir, name = name[4:], None
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        label = name if name not in (None, "auto") else f"dir:{folder}"
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
        digests: dict[str, tuple[str, str]] = {}
        ds = _load_files(label, str(folder), classes, _find_idx_files(folder), _digest_recorder(digests))
        known = recognize(digests) if name in (None, "auto") else None
        if known is not None:  # a folder holding MNIST or Fashion-MNIST gets that dataset's name (and defaults)
            ds = replace(ds, name=known, classes=FASHION_MNIST_CLASSES if known == "fashion-mnist" else MNIST_CLASSES)
        return ds

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name is None or name == "auto":
        return _load_auto(cache_root, download=download, progress=progress, mirrors=mirrors)
    if name == "mnist":
        return _load_mnist(
            cache_root, download=download, progress=progress, mirrors=mirrors, connect_timeout=CONNECT_TIMEOUT
        )
    if name == "mnist-sample":
        return _load_sample()
    if name == "fashion-mnist":
        return _load_fashion(cache_root, download=download, progress=progress, mirrors=mirrors)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, 'auto', or a data dir")


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed-seed sample of ``n`` items with the classes in the proportions of ``labels``.

    What ``--limit N`` uses, so that a small run sees every class as often as the whole set does
    (the first N images of a file need not). Each class c with ``k_c`` of the ``len(labels)`` items
    gets ``floor(n * k_c / len(labels))`` places, and the places left over go to the classes with the
    largest remainders (ties: the lower label). Within a class the items are drawn without replacement
    by ``numpy.random.default_rng(seed)``, one permutation per class in label order.

    Returns a 1-D int64 array, **sorted ascending** (the sample keeps the dataset's order; shuffling
    is the training loop's business). Deterministic for a given (labels, n, seed). ``n`` at or above
    ``len(labels)`` returns every index, ``arange(len(labels))``. Raises ValueError for ``n < 1`` or
    labels that are not a 1-D integer array.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array (got shape {labels.shape}, dtype {labels.dtype})")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer (got {n!r})")
    total = labels.shape[0]
    if n >= total:
        return np.arange(total, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts.astype(np.int64) * int(n)
    take = quota // total
    remainder = quota - take * total
    order = np.lexsort((classes, -remainder))  # largest remainder first, then the lower label
    take[order[: int(n) - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)
