"""lenet_gpu.imageprep (MNIST-style preparation of any digit picture) and lenet_gpu.predict (its CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require

require("PIL")

from PIL import Image, ImageDraw, ImageOps  # noqa: E402

from lenet_gpu.imageprep import (  # noqa: E402
    BOX,
    EmptyImageError,
    ImagePrepError,
    load_image,
    prepare_digit,
    resample,
    stroke_width,
    to_grayscale,
)
from lenet_gpu.model import LeNet5  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((40, 40), (200, 120), (600, 600))


def draw_digit(kind: str, size: tuple[int, int], dark_on_light: bool, where: float = 0.4) -> Image.Image:
    """A synthetic '1', '7' or ring '0' drawn with PIL, off-centre, stroke in proportion to the canvas."""
    w, h = size
    bh = int(0.7 * min(w, h))  # glyph height
    bw = int(0.5 * bh)
    x0, y0 = int(where * w - bw / 2), int(0.55 * h - bh / 2)
    stroke = max(2, bh // 7)
    im = Image.new("L", size, 0)
    d = ImageDraw.Draw(im)
    if kind == "1":
        cx = x0 + bw // 2
        d.line([(cx, y0), (cx, y0 + bh)], fill=255, width=stroke)
        d.line([(cx - bw // 3, y0 + bh // 5), (cx, y0)], fill=255, width=stroke)
    elif kind == "7":
        d.line([(x0, y0), (x0 + bw, y0)], fill=255, width=stroke)
        d.line([(x0 + bw, y0), (x0 + bw // 3, y0 + bh)], fill=255, width=stroke)
    else:  # a ring "0"
        d.ellipse([x0, y0, x0 + bw, y0 + bh], outline=255, width=stroke)
    return ImageOps.invert(im) if dark_on_light else im


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    a = img.astype(np.float64)
    r = np.arange(a.shape[0])
    return float((a.sum(1) * r).sum() / a.sum()), float((a.sum(0) * r).sum() / a.sum())


def ink_box(img: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# --------------------------------------------------------------------------------------------------
# prepare_digit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["1", "7", "0"])
def test_prepare_digit_mnist_way(kind: str, size: tuple[int, int]) -> None:
    dark = prepare_digit(draw_digit(kind, size, dark_on_light=True))
    light = prepare_digit(draw_digit(kind, size, dark_on_light=False))
    for out in (dark, light):
        assert out.shape == (28, 28) and out.dtype == np.uint8
        assert out.max() == 255  # ink bright ...
        assert out[0].max() == out[-1].max() == out[:, 0].max() == out[:, -1].max() == 0  # ... on black
        assert (out > 0).mean() < 0.5
        h, w = ink_box(out)
        assert max(h, w) == BOX  # the longer side fills the 20-px box
        if kind in ("7", "0"):
            assert h == BOX and 0.4 * BOX <= w <= 0.75 * BOX  # aspect kept (the glyphs are taller than wide)
        cy, cx = centre_of_mass(out)
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # centred by centre of mass, as MNIST is
    assert np.abs(dark.astype(int) - light.astype(int)).max() <= 1  # polarity does not matter


def test_prepare_digit_is_scale_invariant() -> None:
    small, big = (prepare_digit(draw_digit("7", s, True)).astype(float) for s in ((60, 60), (600, 600)))
    assert np.corrcoef(small.ravel(), big.ravel())[0, 1] > 0.85


def test_prepare_digit_input_types() -> None:
    gray = draw_digit("0", (120, 90), dark_on_light=True)
    ref = prepare_digit(gray)
    arr = np.asarray(gray)
    rgb = np.repeat(arr[:, :, None], 3, axis=2)
    variants = [
        arr,  # uint8 (H,W)
        arr.astype(np.float32) / 255,  # float in [0,1]
        arr.astype(np.float64),  # float in [0,255]
        arr.astype(np.uint16) * 257,  # 16-bit
        rgb,  # (H,W,3)
        Image.fromarray(rgb),  # PIL RGB
        gray.convert("P"),  # palette
    ]
    for v in variants:
        assert np.abs(prepare_digit(v).astype(int) - ref.astype(int)).max() <= 2, type(v)
    # black ink on a transparent sheet (the RGB under it all black): composited onto white
    rgba = np.zeros((90, 120, 4), np.uint8)
    rgba[:, :, 3] = 255 - arr
    assert np.abs(prepare_digit(Image.fromarray(rgba)).astype(int) - ref.astype(int)).max() <= 2
    # and white ink on a transparent sheet: composited onto black
    rgba[:, :, :3] = 255
    assert np.abs(prepare_digit(rgba).astype(int) - ref.astype(int)).max() <= 2
    with pytest.raises(ImagePrepError):
        prepare_digit(np.zeros((4, 4, 5)))


def test_thin_strokes_are_widened() -> None:
    """A fine pen on a big sheet: strokes widened to MNIST's typical width; normal strokes untouched."""
    im = Image.new("L", (1500, 1200), 255)
    ImageDraw.Draw(im).ellipse([500, 200, 900, 1000], outline=0, width=6)  # 0.15 px once scaled
    thick, thin = prepare_digit(im), prepare_digit(im, thicken=False)
    assert (thick >= 128).sum() >= 1.8 * (thin >= 128).sum()
    up = np.asarray(Image.fromarray(thick).resize((112, 112), Image.BICUBIC)) >= 128
    assert 1.8 <= stroke_width(up) / 4 <= 3.5  # MNIST: 1.8 (5th percentile) .. 2.7 (median) .. 4.3 (95th)
    assert max(ink_box(thick)) == BOX
    normal = draw_digit("0", (600, 600), dark_on_light=True)
    assert np.array_equal(prepare_digit(normal), prepare_digit(normal, thicken=False))


def test_stroke_width() -> None:
    bar = np.zeros((40, 120), bool)
    bar[10:16, 10:110] = True
    assert abs(stroke_width(bar) - 6) < 0.5
    assert stroke_width(np.zeros((5, 5), bool)) == 0


def test_blank_images_are_rejected() -> None:
    for blank in (np.full((50, 50), 255, np.uint8), np.zeros((50, 50), np.uint8), np.full((30, 80), 0.5),
                  np.full((20, 20), 250, np.uint8) - np.eye(20, dtype=np.uint8) * 8):  # faint scratch only
        with pytest.raises(EmptyImageError, match="blank"):
            prepare_digit(blank)


def test_noisy_photo_like_image() -> None:
    """Grey paper with noise and a slight shade, dark ink: still one clean centred digit."""
    rng = np.random.default_rng(0)
    ink = np.asarray(draw_digit("7", (300, 200), dark_on_light=False), dtype=np.float64) / 255
    paper = 0.8 + 0.05 * np.linspace(-1, 1, 300)[None, :] + rng.normal(0, 0.02, (200, 300))
    photo = np.clip(paper - 0.6 * ink, 0, 1)
    out = prepare_digit(photo)
    clean = prepare_digit(draw_digit("7", (300, 200), dark_on_light=True)).astype(float)
    assert np.corrcoef(out.astype(float).ravel(), clean.ravel())[0, 1] > 0.9


def test_resample_preserves_mean_and_handles_both_directions() -> None:
    a = np.random.default_rng(0).random((37, 53))
    down = resample(a, (10, 14))
    assert down.shape == (10, 14) and abs(down.mean() - a.mean()) < 0.01
    up = resample(np.array([[0.0, 1.0]]), (1, 4))
    assert np.allclose(up, [[0, 0.25, 0.75, 1]])
    assert np.allclose(resample(a, a.shape), a)


def test_to_grayscale_luminance() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    g = to_grayscale(rgb)
    assert g.shape == (2, 2) and abs(g[0, 0] - 0.299) < 1e-9 and g[1, 1] == 0


def test_load_image_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image\n")
    good = tmp_path / "ok.png"
    draw_digit("1", (40, 40), True).save(good)
    good_bytes = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    for name, words in (("empty.png", "empty file"), ("text.png", "not an image"), ("nope.png", "not found"),
                        ("cut.png", "truncated")):
        with pytest.raises(ImagePrepError, match=words):
            load_image(tmp_path / name)
    assert load_image(good).size == (40, 40)


# --------------------------------------------------------------------------------------------------
# end to end: real MNIST digits, upscaled and inverted like a scan, come back as the same digit
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from lenet_gpu.data import load_dataset

    ds = load_dataset("mnist-sample")
    model = LeNet5(backend="numpy", seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        idx = rng.choice(len(ds.train_labels), 32, replace=False)
        model.train_step(ds.train_images[idx], ds.train_labels[idx])
    path = tmp_path_factory.mktemp("ck") / "model.npz"
    model.save(path, extra={"dataset": "mnist-sample", "data_dir": None, "epoch": 1})
    return path


def test_scanned_mnist_digits_round_trip(checkpoint: Path) -> None:
    from lenet_gpu.data import load_dataset

    ds = load_dataset("mnist-sample")
    model = LeNet5.load(checkpoint, backend="numpy")
    orig = ds.test_images[:40]
    scans = []
    for k, img in enumerate(orig):
        side = (90, 160, 400)[k % 3]
        big = Image.fromarray(255 - img).resize((side, side), Image.BICUBIC)  # dark ink, scaled up
        canvas = Image.new("L", (side * 2, int(side * 1.5)), 255)
        canvas.paste(big, (side // 3, side // 4))
        scans.append(prepare_digit(canvas))
    scans = np.stack(scans)
    corr = [np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1] for a, b in zip(orig, scans)]
    assert np.mean(corr) > 0.9
    agree = (model.predict(orig) == model.predict(scans)).mean()
    assert agree >= 0.75, agree


# --------------------------------------------------------------------------------------------------
# the command line (subprocess)
# --------------------------------------------------------------------------------------------------


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "lenet_gpu.predict", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_help() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for word in ("CHECKPOINT", "IMAGE", "--top", "--json", "--backend", "--save-prepared", "dark ink"):
        assert word in r.stdout


def test_cli_good_and_bad_files(checkpoint: Path, tmp_path: Path) -> None:
    files = []
    for kind, size, dark in (("7", (200, 120), True), ("0", (600, 600), False), ("1", (40, 40), True)):
        p = tmp_path / f"d{kind}_{'dark' if dark else 'light'}.png"
        draw_digit(kind, size, dark).save(p)
        files.append(p)
    jpg = tmp_path / "seven.jpg"
    draw_digit("7", (300, 300), True).convert("RGB").save(jpg, quality=85)
    files.append(jpg)
    (tmp_path / "notes.png").write_text("not an image at all\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("L", (64, 64), 255).save(tmp_path / "white.png")
    bad = [tmp_path / "notes.png", tmp_path / "empty.jpg", tmp_path / "white.png", tmp_path / "missing.png"]
    order = [files[0], bad[0], files[1], bad[1], bad[2], files[2], bad[3], files[3]]
    r = _run(str(checkpoint), *map(str, order), "--top", "2", "--save-prepared", str(tmp_path / "seen"))
    assert r.returncode == 1
    out = r.stdout.strip().splitlines()
    err = r.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in out] == [str(f) for f in files]  # every good file, in order
    for line in out:
        assert line.count("%") == 2  # "<file>: 7  (7 81.0%, 1 9.3%)"
    assert len(err) == len(bad) and "Traceback" not in r.stderr
    for path, line, words in zip(bad, err, ("not an image", "empty file", "blank", "not found")):
        assert line.startswith(str(path)) and words in line
    seen = sorted(p.name for p in (tmp_path / "seen").iterdir())
    assert seen == sorted(f"{f.stem}.28x28.png" for f in files)


def test_cli_json_matches_model(checkpoint: Path, tmp_path: Path) -> None:
    p = tmp_path / "seven.png"
    draw_digit("7", (200, 120), True).save(p)
    r = _run(str(checkpoint), str(p), "--json", "--top", "10")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["file"] == str(p) and len(rec["top"]) == 10
    assert abs(sum(t["prob"] for t in rec["top"]) - 1) < 1e-4
    probs = [t["prob"] for t in rec["top"]]
    assert probs == sorted(probs, reverse=True) and rec["prediction"] == rec["top"][0]["class"]
    model = LeNet5.load(checkpoint, backend="numpy")
    assert rec["prediction"] == int(model.predict(prepare_digit(Image.open(p))[None])[0])


def test_cli_bad_arguments(checkpoint: Path, tmp_path: Path) -> None:
    img = tmp_path / "one.png"
    draw_digit("1", (40, 40), True).save(img)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 broken zip")
    for args, words in (([str(tmp_path / "none.npz"), str(img)], "no such checkpoint"),
                        ([str(junk), str(img)], "not a lenet_gpu checkpoint"),
                        ([str(checkpoint), str(img), "--top", "0"], "--top must be between 1 and 10")):
        r = _run(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr
    r = _run(str(checkpoint))  # a checkpoint and no image: a usage error, whether or not runs/ has a checkpoint
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no image given" in r.stderr, r.stderr


def test_cli_without_pillow(checkpoint: Path, tmp_path: Path) -> None:
    block = "import sys; sys.modules['PIL'] = None\nfrom lenet_gpu.predict import main\nsys.exit(main(sys.argv[1:]))\n"
    r = _run(str(checkpoint), str(tmp_path / "x.png"), code=block)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'lenet_gpu[viz]'" in r.stderr


def test_readme_sample_digit_is_the_real_test_digit() -> None:
    """docs/sample_digit.png (the README's predict example) is mnist-sample test image #92 (a 3), dark on
    light: prepared the MNIST way it is that digit again (and `python docs/make_sample_digit.py` rebuilds it)."""
    from lenet_gpu.data import load_dataset

    path = Path(__file__).resolve().parent.parent / "docs" / "sample_digit.png"
    ds = load_dataset("mnist-sample")
    assert ds.test_labels[92] == 3
    got = prepare_digit(load_image(path)).astype(np.float64)

    def match(i: int) -> float:  # correlation with test image i, at the best shift of up to 2 px
        want = ds.test_images[i].astype(np.float64).ravel()
        return max(np.corrcoef(np.roll(got, (dy, dx), (0, 1)).ravel(), want)[0, 1]
                   for dy in range(-2, 3) for dx in range(-2, 3))

    corr, others = match(92), max(match(i) for i in range(60))
    assert corr > 0.97 and corr - others > 0.1, (corr, others)
    with Image.open(path) as im:
        assert im.size[0] >= 200 and np.asarray(im.convert("L")).mean() > 150  # large, light paper
