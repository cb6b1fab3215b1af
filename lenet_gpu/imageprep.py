"""Turn a picture of one hand-written digit into a 28×28 MNIST-style image.

MNIST's own recipe (LeCun et al.): the digit is made bright on a black background, its bounding box
is scaled to fit a 20×20 box with the aspect ratio kept (anti-aliased), and the result is placed in
a 28×28 image so that its centre of mass lies at the centre. :func:`prepare_digit` does exactly
that for any image, whatever its size or polarity (dark ink on light paper, or light on dark):

1. grayscale in [0, 1] (colour by luminance; transparency composited onto a contrasting colour);
2. polarity from the border: the background is the median of a frame around the picture; when it
   is light, the picture is inverted so that ink is bright;
3. the background level is subtracted and faint noise (< ``NOISE`` of the ink's peak) dropped;
4. crop to the bounding box of the ink (pixels ≥ ``INK`` of the peak); a stroke that would end up
   thinner than MNIST's thinnest (a fine pen on a big sheet) is widened first (``thicken``);
5. resample the crop so that its longer side is 20 px (area averaging when shrinking, linear
   interpolation when enlarging) and stretch the contrast so the strongest ink is 255;
6. paste into 28×28 so that the centre of mass lands on pixel (14, 14) (row, column; where MNIST's
   digits have it, within half a pixel), the whole box kept inside the image.

Everything here is NumPy; Pillow is needed only to read files (:func:`load_image`) or to accept a
``PIL.Image`` argument.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "BOX",
    "SIZE",
    "EmptyImageError",
    "ImagePrepError",
    "load_image",
    "prepare_digit",
    "resample",
    "stroke_width",
    "to_grayscale",
]

SIZE = 28  #: side of the output image
BOX = 20  #: the digit's longer side after scaling
BORDER = 0.06  #: width of the frame (fraction of each side, at least 1 px) that tells the background
NOISE = 0.10  #: ink below this fraction of the peak is background noise, set to 0
INK = 0.25  #: pixels at or above this fraction of the peak count for the bounding box
MIN_CONTRAST = 0.08  #: ink must stand this far (on [0, 1]) above the background, else "blank"
#: strokes thinner than this (px in the final image) are widened to ``STROKE`` before scaling;
#: MNIST's strokes measure 1.8 px (5th percentile), 2.7 (median), 4.3 (95th) by stroke_width
MIN_STROKE, STROKE = 1.6, 2.5
WORK = 4 * BOX  #: working resolution (longer side) for measuring and widening strokes


class ImagePrepError(ValueError):
    """An image that cannot be turned into a digit (unreadable, wrong shape, or blank)."""


class EmptyImageError(ImagePrepError):
    """The image has no ink: it is blank or uniform."""


# --------------------------------------------------------------------------------------------------
# Reading and grayscale
# --------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str]) -> Any:
    """Open an image file with Pillow (EXIF rotation applied) and load its pixels.

    Raises :class:`ImagePrepError` with a one-line reason for a missing, empty or unreadable file.
    Pillow must be installed (``pip install 'lenet_gpu[viz]'``).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImagePrepError("file not found") from None
    except OSError as e:
        raise ImagePrepError(f"cannot read: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise ImagePrepError("is a directory, not an image")
    if size == 0:
        raise ImagePrepError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return im.copy()
    except UnidentifiedImageError:
        raise ImagePrepError("not an image Pillow can read (expected PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImagePrepError(f"corrupt or truncated image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImagePrepError(f"image too large ({e})") from None


def _pil_to_array(im: Any) -> np.ndarray:
    """A PIL image as float grayscale (H,W) or (H,W,4) RGBA in [0, 1]."""
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            return a
        return a / (65535.0 if a.max(initial=0) > 255 else 255.0)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    im = im.convert("RGBA" if has_alpha else "L")
    return np.asarray(im, dtype=np.float64) / 255.0


def to_grayscale(img: Any) -> np.ndarray:
    """Grayscale float64 (H,W) in [0, 1] from a PIL image or an array (H,W), (H,W,1), (H,W,3), (H,W,4).

    Integer arrays are scaled by their type's range (uint8 by 255, uint16 by 65535); float arrays
    are taken as [0, 1] unless their maximum exceeds 1, then as [0, 255]. Colour is reduced by
    luminance (ITU-R 601). Transparent pixels are composited onto the colour that contrasts with
    the opaque ones (black ink on a transparent sheet stays black ink on white, and white ink on a
    transparent sheet white ink on black).
    """
    if not isinstance(img, np.ndarray) and hasattr(img, "mode") and hasattr(img, "convert"):
        a = _pil_to_array(img)
    else:
        a = np.asarray(img)
        if a.dtype == np.bool_:
            a = a.astype(np.float64)
        elif np.issubdtype(a.dtype, np.integer):
            a = a.astype(np.float64) / (255.0 if a.dtype.itemsize == 1 else 65535.0)
        elif np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float64)
            if not np.all(np.isfinite(a)):
                raise ImagePrepError("image contains NaN or inf")
            if a.size and a.max() > 1.0:
                a = a / 255.0
        else:
            raise ImagePrepError(f"unsupported pixel type {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] in (2, 4):  # gray+alpha or RGBA
        color, alpha = a[:, :, :-1], a[:, :, -1:]
        gray = _luminance(color) if color.shape[2] == 3 else color[:, :, 0]
        alpha = alpha[:, :, 0]
        if alpha.min(initial=1.0) < 1.0:
            opaque = alpha > 0.5
            ink_level = float(np.mean(gray[opaque])) if opaque.any() else 0.0
            back = 1.0 if ink_level < 0.5 else 0.0
            gray = gray * alpha + back * (1.0 - alpha)
        a = gray
    elif a.ndim == 3 and a.shape[2] == 3:
        a = _luminance(a)
    if a.ndim != 2:
        raise ImagePrepError(f"expected a 2-D grayscale or an RGB(A) image, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImagePrepError(f"image has no pixels (shape {a.shape})")
    return np.clip(a, 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------


def _axis_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights taking a length-n_in signal to length n_out.

    Shrinking: each output sample averages the input over its footprint (exact area overlap), the
    anti-aliasing MNIST used. Enlarging: linear interpolation between pixel centres.
    """
    m = np.zeros((n_out, n_in))
    if n_out <= n_in:
        scale = n_in / n_out
        edges = np.arange(n_out + 1) * scale
        for i in range(n_out):
            lo, hi = edges[i], edges[i + 1]
            j0, j1 = int(np.floor(lo)), min(int(np.ceil(hi)), n_in)
            for j in range(j0, j1):
                m[i, j] = min(hi, j + 1) - max(lo, j)
            m[i] /= m[i].sum()
    else:
        pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        j0 = np.floor(pos).astype(int)
        j1 = np.minimum(j0 + 1, n_in - 1)
        f = pos - j0
        m[np.arange(n_out), j0] += 1 - f
        m[np.arange(n_out), j1] += f
    return m


def resample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to ``shape``: area averaging to shrink, linear to enlarge (per axis)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"resample needs a 2-D array, got shape {a.shape}")
    h, w = shape
    if h < 1 or w < 1:
        raise ValueError(f"target shape must be positive, got {shape}")
    return _axis_matrix(a.shape[0], h) @ a @ _axis_matrix(a.shape[1], w).T


# --------------------------------------------------------------------------------------------------
# The MNIST recipe
# --------------------------------------------------------------------------------------------------


def _thicken(crop: np.ndarray) -> np.ndarray:
    """The crop, or, when its strokes would end up thinner than ``MIN_STROKE`` px in the 20-px box,
    the crop at a working resolution (longer side ≤ ``WORK`` px) with its strokes widened."""
    work = crop
    if max(crop.shape) > WORK:
        f = WORK / max(crop.shape)
        work = resample(crop, (max(1, round(crop.shape[0] * f)), max(1, round(crop.shape[1] * f))))
        work /= max(float(work.max()), 1e-12)
    px = BOX / max(work.shape)  # size of one working pixel in the final 20-px box
    width = stroke_width(work >= 0.5) * px
    if width >= MIN_STROKE:
        return crop
    return _dilate(work, (STROKE - width) / px / 2)


def _border(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    bh, bw = max(1, int(round(h * BORDER))), max(1, int(round(w * BORDER)))
    if 2 * bh >= h or 2 * bw >= w:
        return a.ravel()
    return np.concatenate([a[:bh].ravel(), a[-bh:].ravel(), a[bh:-bh, :bw].ravel(), a[bh:-bh, -bw:].ravel()])


def ink_map(img: Any) -> np.ndarray:
    """Ink intensity (H,W) in [0, 1] at the image's own size: bright ink, zero background.

    The background is the median of a frame around the picture; a light background means dark ink,
    so the picture is inverted. Raises :class:`EmptyImageError` when nothing stands out from it.
    """
    g = to_grayscale(img)
    background = float(np.median(_border(g)))
    if background > 0.5 or (background == 0.5 and float(np.median(g)) >= 0.5):
        g, background = 1.0 - g, 1.0 - background
    ink = np.clip(g - background, 0.0, None)
    peak = float(ink.max(initial=0.0))
    if peak < MIN_CONTRAST:
        raise EmptyImageError("no digit found: the image is blank (nothing stands out from the background)")
    ink /= peak
    ink[ink < NOISE] = 0.0
    return ink


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels of a boolean ink mask: 2 × area / boundary length.

    A stroke of length L and width w has area ≈ L·w and a boundary of ≈ 2L pixels. Saturates at
    2 for strokes one pixel wide (every pixel is on the boundary); 0 for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return 0.0
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return 2.0 * area / max(int((mask & ~inner).sum()), 1)


def _dilate(a: np.ndarray, radius: float) -> np.ndarray:
    """Grey dilation by a disk of ``radius`` pixels (the array grows by floor(radius) on each side)."""
    r = int(np.floor(radius))
    if r <= 0:
        return a
    h, w = a.shape
    out = np.zeros((h + 2 * r, w + 2 * r))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= radius * radius + 1e-9:
                view = out[r + dy : r + dy + h, r + dx : r + dx + w]
                np.maximum(view, a, out=view)
    return out


def prepare_digit(img: Any, *, thicken: bool = True) -> np.ndarray:
    """A 28×28 uint8 MNIST-style image (bright digit on black) from a picture of one digit.

    ``img``: a ``PIL.Image`` or an array (H,W) / (H,W,3) / (H,W,4) of any size, any polarity. See
    the module docstring for the steps. ``thicken``: strokes that would end up thinner than
    ``MIN_STROKE`` px in the 20-px box (a fine pen on a large sheet) are widened to about ``STROKE``
    px, MNIST's typical width, before scaling (few MNIST digits are that thin). Raises
    :class:`EmptyImageError` for a blank image and :class:`ImagePrepError` for one that cannot be
    used.
    """
    ink = ink_map(img)
    rows = np.flatnonzero((ink >= INK).any(axis=1))
    cols = np.flatnonzero((ink >= INK).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if thicken:
        crop = _thicken(crop)
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    small = resample(crop, (nh, nw))
    small = np.clip(small / max(float(small.max()), 1e-12), 0.0, 1.0)
    # centre of mass → the image's centre, keeping the whole box inside the 28×28 frame
    mass = small.sum()
    cy = float((small.sum(axis=1) * np.arange(nh)).sum() / mass)
    cx = float((small.sum(axis=0) * np.arange(nw)).sum() / mass)
    centre = SIZE / 2.0  # MNIST's digits have their centre of mass at pixel (14, 14), ±0.5
    top = int(np.clip(np.round(centre - cy), 0, SIZE - nh))
    left = int(np.clip(np.round(centre - cx), 0, SIZE - nw))
    out = np.zeros((SIZE, SIZE))
    out[top : top + nh, left : left + nw] = small
    return np.round(out * 255.0).astype(np.uint8)
