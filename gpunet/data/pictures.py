"""Pictures for prediction: image files and arrays made into inputs shaped like MNIST's digits.

Every MNIST digit was made by one recipe (LeCun et al.): the ink's bounding box scaled to fit 20x20
keeping its aspect ratio, anti-aliased, then placed in a 28x28 field with its centre of mass at the
centre; light ink (1.0) on a dark field (0.0). :func:`mnist_style` applies that recipe to a user's
picture, after finding the paper and the ink in it: the paper is what the border shows (a smooth
fit, so a tint or uneven light is removed), the ink is what departs from it. Everything here is
float32 NumPy plus Pillow (imported lazily); problems raise :class:`gpunet.data.DataError` with one
line naming the file or argument.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from . import DataError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

WORK_SIDE = (
    256  # pictures are shrunk to this long side first: speed, and it averages JPEG noise away
)
MAX_PIXELS = (
    50_000_000  # larger pictures are refused before decoding (a decompression bomb, or a mistake)
)
MNIST_STROKE = 2.6  # median stroke width of MNIST's digits in pixels of 28x28 (measured: ink > 0.5)
THIN = 0.5  # strokes thinner than this share of MNIST_STROKE are widened to it
_BOX = 20 / 28  # the digit's box as a share of the field (20 of 28 in MNIST)


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise DataError(
            "reading pictures needs Pillow: pip install pillow (or gpunet[cli])"
        ) from exc
    return Image, ImageOps


# ------------------------------------------------------------------------------------- to an array
def _from_pil(img) -> np.ndarray:
    """A Pillow image -> float32 (H, W, 3) RGB in [0, 1], upright, transparency composited (see
    below)."""
    Image, ImageOps = _pil()
    if img.width * img.height > MAX_PIXELS:
        raise DataError(
            f"picture of {img.width}x{img.height} pixels is too large "
            f"(at most {MAX_PIXELS:,} pixels)"
        )
    img = ImageOps.exif_transpose(
        img
    )  # a phone photo's pixels lie on their side; its EXIF tag says so
    if (
        max(img.size) > 2 * WORK_SIDE
    ):  # draft() lets JPEG decode at 1/2..1/8 scale: big photos stay cheap
        img.draft("RGB", (WORK_SIDE, WORK_SIDE))
    if img.mode in (
        "I;16",
        "I;16B",
        "I;16L",
        "I",
        "F",
    ):  # 16-bit or 32-bit grey: kept as floats, all levels
        arr = np.asarray(img, dtype=np.float32)
        peak = arr.max(initial=0)
        if img.mode == "F" and peak <= 1.5:
            top = 1.0  # floats already in [0, 1]
        else:
            top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
        return _shrink(_from_array(np.clip(arr / np.float32(top), 0, 1)))
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    if max(img.size) > WORK_SIDE:
        scale = WORK_SIDE / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BOX,
        )
    arr = np.asarray(img, dtype=np.float32) / np.float32(255)
    return _composite(arr) if has_alpha else arr


def _composite(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) -> (H, W, 3): lay transparent pixels over paper that contrasts with the opaque
    ones.

    A canvas drawing is often dark (or light) strokes on fully transparent pixels whose hidden
    colour is arbitrary; laying them over white would hide white strokes, over black would hide
    black ones.
    """
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() >= 0.99:
        return np.ascontiguousarray(rgb)
    weight = float(alpha.sum())
    luma = float((rgb.mean(axis=2, keepdims=True) * alpha).sum() / weight) if weight > 0 else 0.0
    paper = np.float32(1.0 if luma < 0.5 else 0.0)
    return rgb * alpha + paper * (1 - alpha)


def to_unit_scale(values, what: str = "picture") -> np.ndarray:
    """The 0..255 guess, written once: pixel values (any shape) -> float32 in [0, 1].

    Integers are bytes, 0..255 (0..65535 when wider than a byte and some value is above 255); floats
    above 1.5 can only be on the 0..255 scale too; other floats are already on the 0..1 scale.
    Values a rounding error outside [0, 1] (1%) are clipped. Raises DataError naming `what` for a
    value that is not finite or lies further out.
    """
    arr = np.asarray(values)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{what}: values must be finite, got NaN or infinity")
    top = out.max(initial=0)
    if arr.dtype.kind in "ui":
        out /= np.float32(65535 if arr.dtype.itemsize > 1 and top > 255 else 255)
    elif top > 1.5:
        out /= np.float32(255)
    if out.min(initial=0) < -0.01 or out.max(initial=0) > 1.01:
        raise DataError(
            f"{what}: expected values in [0, 1] or 0..255, got {arr.min():g}..{arr.max():g}"
        )
    return np.clip(out, 0, 1, out=out)


def _from_array(picture: np.ndarray) -> np.ndarray:
    """A NumPy picture (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> float32 (H, W, 3) in [0, 1]."""
    arr = np.asarray(picture)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or min(arr.shape[:2]) < 1:
        raise DataError(
            f"picture: expected an array (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}"
        )
    if arr.dtype.kind not in "uifb":
        raise DataError(f"picture: expected a numeric array, got dtype {arr.dtype}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise DataError(
            f"picture of {arr.shape[1]}x{arr.shape[0]} pixels is too large (at most {MAX_PIXELS:,})"
        )
    out = to_unit_scale(arr)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return _composite(out) if out.shape[2] == 4 else out


def _shrink(rgb: np.ndarray) -> np.ndarray:
    """Shrink a big (H, W, 3) array to WORK_SIDE by block means (what Pillow's BOX filter does)."""
    k = math.ceil(max(rgb.shape[:2]) / WORK_SIDE)
    if k <= 1:
        return rgb
    h, w = (rgb.shape[0] // k) * k, (rgb.shape[1] // k) * k
    return rgb[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3), dtype=np.float32)


# --------------------------------------------------------------------------------- paper and ink
def _border_mask(shape) -> np.ndarray:
    """True on the outer ring: about 4% of each side, at least one pixel."""
    h, w = shape
    bh, bw = max(1, round(0.04 * h)), max(1, round(0.04 * w))
    mask = np.zeros(shape, bool)
    mask[:bh], mask[-bh:], mask[:, :bw], mask[:, -bw:] = True, True, True, True
    return mask


def _paper(rgb: np.ndarray) -> np.ndarray:
    """The paper's colour at every pixel, (H, W, 3) float32: a quadratic surface per channel fitted
    to the border's pixels (twice, the second time without the pixels far off the first fit, such as
    ink that touches the edge). A tint is a constant, uneven light a slope or a bowl: both are
    removed."""
    h, w = rgb.shape[:2]
    y = (np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5)[:, None]  # (H, 1)
    x = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, :]  # (1, W)
    terms = 1 if min(h, w) < 8 else 6  # a tiny picture has too few border positions for a surface
    border = _border_mask((h, w))
    yb, xb = np.broadcast_to(y, (h, w))[border], np.broadcast_to(x, (h, w))[border]
    a = np.stack([np.ones_like(xb), xb, yb, xb * yb, xb * xb, yb * yb], axis=1)[:, :terms].astype(
        np.float64
    )
    b = rgb[border].astype(np.float64)  # (B, 3)
    keep = np.ones(len(b), bool)
    for _ in range(2):
        if keep.sum() < terms * 4:  # the border is mostly ink: trust its median colour instead
            return np.broadcast_to(np.median(b, axis=0).astype(np.float32), rgb.shape)
        ak = a[keep]
        coef = np.linalg.solve(ak.T @ ak + 1e-9 * np.eye(terms), ak.T @ b[keep])  # (terms, 3)
        resid = np.abs(b - a @ coef).max(axis=1)
        keep = resid <= max(3 * 1.4826 * float(np.median(resid)), 0.02)
    c = np.vstack([coef, np.zeros((6 - terms, 3))]).astype(np.float32)
    # c0 + c1 x + c2 y + c3 xy + c4 x^2 + c5 y^2, grouped as a(y) + b(y) x + c4 x^2: two full-size
    # passes
    a_y = (c[0] + y * c[2] + y * y * c[5])[:, None, :]  # (H, 1, 3)
    b_y = (c[1] + y * c[3])[:, None, :]  # (H, 1, 3)
    xs = x[0][None, :, None]  # (1, W, 1)
    return a_y + b_y * xs + xs * xs * c[4]


def _ink(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Ink strength (H, W) float32 >= 0 and the noise level of the paper, from a (H, W, 3) picture.

    The ink is the channel that departs most from the paper (so blue ink on yellow paper counts), in
    the direction of the stronger marks: darker than the paper or lighter. The paper's brightness
    alone would misjudge a dim photo of white paper (grey paper, darker ink) and light paper under a
    dark lamp.
    """
    diff = rgb - _paper(rgb)
    darker, lighter = np.maximum(-diff.min(axis=2), 0), np.maximum(diff.max(axis=2), 0)
    # the strongest 3x3 mean of each: one hot pixel of noise does not decide
    ink = darker if _box_mean3(darker).max() >= _box_mean3(lighter).max() else lighter
    border = ink[_border_mask(ink.shape)]
    noise = float(1.4826 * np.median(np.abs(border - np.median(border))))
    return ink.astype(np.float32), noise


def _window(a: np.ndarray, k: int, op, mode: str = "constant", fill=0) -> np.ndarray:
    """A k x k window (k odd) reduced at every pixel with the ufunc `op` (np.maximum, np.minimum,
    np.add), (H, W) -> (H, W), over `a` padded by k // 2 with `mode`/`fill`: max, min and sum are
    separable, so a k-window along the rows, then along the columns, each k - 1 whole-array `op`
    calls on views."""
    r = k // 2
    p = np.pad(a, r, mode=mode, **({"constant_values": fill} if mode == "constant" else {}))
    h, w = a.shape
    rows = p[0:h].copy()
    for i in range(1, k):
        op(rows, p[i : i + h], out=rows)
    out = rows[:, 0:w].copy()
    for j in range(1, k):
        op(out, rows[:, j : j + w], out=out)
    return out


def _box_mean3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge padding (H, W) -> (H, W), float32."""
    return _window(a, 3, np.add, mode="edge") / np.float32(9)


def _dilate(a: np.ndarray, steps: int) -> np.ndarray:
    """Grey dilation (H, W) -> (H, W) of ink >= 0: a 3x3 maximum `steps` times, i.e. one (2 steps +
    1) square maximum with zeros outside; each step widens a stroke by 2 pixels."""
    return _window(a, 2 * steps + 1, np.maximum) if steps > 0 else a


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: labels (H, W) int32 (0 = background), count;
    numbered in the order of each component's first pixel in raster order (as scipy.ndimage.label
    numbers them)."""
    h, w = mask.shape
    none = h * w  # larger than any pixel index: what the background and the outside offer
    label = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        # every pixel takes the smallest label among its 3x3 neighbours, then the label of the pixel
        # that label names (pointer jumping): a component's labels fall to its first pixel's index
        # in a few rounds
        low = np.where(mask, _window(label, 3, np.minimum, fill=none), none)
        low = np.append(low.ravel(), none)[low]
        if np.array_equal(low, label):
            break
        label = low
    roots = np.unique(label[mask])  # sorted: the raster order of each component's first pixel
    labels = np.zeros((h, w), np.int32)
    labels[mask] = np.searchsorted(roots, label[mask]) + 1
    return labels, len(roots)


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width of a boolean mask in pixels: twice the area over the boundary (a stroke of
    width w and length L has area w*L and about 2*L boundary pixels)."""
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    boundary = int((mask & ~inner).sum())
    return 2.0 * mask.sum() / boundary if boundary else 0.0


def _resize(a: np.ndarray, shape) -> np.ndarray:
    """Resize a float32 (H, W) array to `shape` (rows, cols) with Pillow's anti-aliasing filters."""
    Image, _ = _pil()
    rows, cols = shape
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F")
    shrink = rows < a.shape[0] or cols < a.shape[1]
    out = img.resize((cols, rows), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------- the recipe
def mnist_style(picture, size=(28, 28)) -> tuple[np.ndarray, list[str]]:
    """Make a picture of one digit into an input like MNIST's: float32 (rows, cols) in [0, 1], ink
    1.

    `picture`: a Pillow image (any mode: RGB, RGBA, palette, grey, 16-bit; EXIF orientation applied)
    or a NumPy array (H, W), (H, W, 3) or (H, W, 4) of integers (0..255, or 0..65535) or floats ([0,
    1] or 0..255). `size`: the model's image size (rows, cols). Returns the image and a list of
    warnings (plain sentences, e.g. when the ink forms several separate blobs). Steps: paper from
    the border (tint and uneven light removed), ink stretched to full range and cleaned of noise and
    specks, cropped to the ink, thin strokes widened to MNIST's width, scaled to fit a 20/28 box
    keeping the aspect ratio, and placed with its centre of mass at the field's centre. Raises
    DataError when the picture has no ink.
    """
    rows, cols = (int(size[0]), int(size[1]))
    if rows < 4 or cols < 4:
        raise DataError(f"size: expected at least 4x4 pixels, got {size}")
    if hasattr(picture, "getbbox") and hasattr(picture, "mode"):  # a Pillow image
        rgb = _from_pil(picture)
    else:
        rgb = _shrink(_from_array(picture))
    ink, warnings = _clean(*_ink(rgb))
    crop, edge = _crop(ink)
    if edge:
        warnings.append("the ink touches the edge of the picture: the digit may be cut off")
    return _place(crop, rows, cols), warnings


def _clean(ink: np.ndarray, noise: float) -> tuple[np.ndarray, list[str]]:
    """Ink strength (H, W) -> ink in [0, 1] (solid ink 1, paper 0) without specks, and warnings."""
    # contrast: the strongest ink (3x3 means, so one hot pixel is not "ink"), against the paper's
    # noise
    smooth = _box_mean3(ink) if min(ink.shape) >= 3 else ink
    peak = float(smooth.max())
    if peak < max(0.08, 6 * noise):
        raise DataError(
            f"no ink found: the picture is one flat shade (strongest mark {peak:.2f} against "
            f"paper noise {noise:.2f}; a digit needs dark marks on light paper or the reverse)"
        )
    high = float(
        np.percentile(ink[ink > 0.5 * peak], 75)
    )  # solid ink: most of the strong pixels become 1
    low = max(4 * noise, 0.15 * high)  # below this: paper, JPEG ringing, shadows of dust
    ink = np.clip((ink - low) / max(high - low, 1e-6), 0, 1)

    # blobs: specks (< 3% of the ink) are dropped; several large ones get a warning
    k = max(1, math.ceil(max(ink.shape) / 64))  # label blobs on a grid of at most 64x64 blocks
    labels, count = _components(_blocks(ink > 0.3, k, np.any))
    if count == 0:
        raise DataError("no ink found: the marks are too faint or too small to be a digit")
    mass = np.bincount(
        labels.ravel(), weights=_blocks(ink, k, np.sum).ravel(), minlength=count + 1
    )[1:]
    warnings = []
    if (big := int((mass >= 0.10 * mass.sum()).sum())) > 1:
        warnings.append(
            f"several blobs of ink ({big}): a broken digit, or more than one mark in the "
            f"picture (the model reads them as one digit)"
        )
    keep = mass >= 0.03 * mass.sum()
    if not keep.all():
        grown = _dilate(
            np.isin(labels, np.flatnonzero(keep) + 1).astype(np.float32), 1
        )  # keep soft edges
        ink = (
            ink * np.repeat(np.repeat(grown, k, axis=0), k, axis=1)[: ink.shape[0], : ink.shape[1]]
        )
    return ink, warnings


def _crop(ink: np.ndarray) -> tuple[np.ndarray, bool]:
    """The ink's bounding box (h, w), and whether it touches the picture's edge."""
    ys, xs = np.nonzero(ink > 0.05)
    if len(ys) == 0:
        raise DataError("no ink found: the marks are too faint or too small to be a digit")
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    edge = top == 0 or left == 0 or bottom == ink.shape[0] or right == ink.shape[1]
    return ink[top:bottom, left:right], edge


def _place(crop: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The cropped ink (h, w) -> float32 (rows, cols): thin strokes widened, fitted to the 20/28 box
    keeping the aspect ratio, and moved so that its centre of mass is at the field's centre."""
    # work at 4x the box, where the stroke width can be measured and adjusted in whole pixels
    box = max(2, round(_BOX * min(rows, cols)))
    if max(crop.shape) > 4 * box:
        k = 4 * box / max(crop.shape)
        crop = _resize(crop, (max(1, round(crop.shape[0] * k)), max(1, round(crop.shape[1] * k))))
        crop = np.clip(
            crop / max(float(np.percentile(crop[crop > 0.5 * crop.max()], 75)), 1e-6), 0, 1
        )
    # A thin line (a pen on a big sheet) would fade to a faint trace at 20x20: widen it to MNIST's
    # stroke. Thick strokes are left alone: MNIST has thick digits too, and thinning them (erosion)
    # cost 1.2 points on MNIST digits put through this recipe (measured: 97.15% -> 96.0%, the model
    # read 97.4%).
    scale = box / max(crop.shape)  # working pixels -> output pixels
    width = _stroke_width(crop > 0.5) * scale
    target = MNIST_STROKE * min(rows, cols) / 28
    if 0 < width < THIN * target and (steps := round((target - width) / (2 * scale))):
        crop = _dilate(np.pad(crop, steps), steps)

    h, w = crop.shape
    k = box / max(h, w)
    small = np.clip(_resize(crop, (max(1, round(h * k)), max(1, round(w * k)))), 0, 1)
    total = float(small.sum())
    if total <= 0:
        raise DataError("no ink found: the marks vanish at the model's resolution")
    cy = float((small.sum(axis=1) * np.arange(small.shape[0])).sum()) / total
    cx = float((small.sum(axis=0) * np.arange(small.shape[1])).sum()) / total
    # MNIST's centres of mass sit at (rows/2, cols/2) in pixel-index units (measured: 13.99, 14.00)
    oy = int(np.clip(round(rows / 2 - cy), 0, rows - small.shape[0]))
    ox = int(np.clip(round(cols / 2 - cx), 0, cols - small.shape[1]))
    out = np.zeros((rows, cols), np.float32)
    out[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
    return out


def _blocks(a: np.ndarray, k: int, reduce) -> np.ndarray:
    """Reduce (H, W) over k x k blocks (zero-padded to whole blocks) with np.any or np.sum."""
    h, w = math.ceil(a.shape[0] / k) * k, math.ceil(a.shape[1] / k) * k
    p = np.zeros((h, w), a.dtype)
    p[: a.shape[0], : a.shape[1]] = a
    return reduce(p.reshape(h // k, k, w // k, k), axis=(1, 3))


# ------------------------------------------------------------------------------------------ files
def _load_picture(path: Path, size) -> tuple[np.ndarray, list[str]]:
    """An image file -> float32 (1, rows*cols) made MNIST-style, and its warnings."""
    Image, _ = _pil()
    try:  # Pillow raises many exception types for broken files
        with Image.open(path) as img:
            img.load()
            rgb = _from_pil(img)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    try:
        pixels, warnings = mnist_style(rgb, size)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    return pixels.reshape(1, -1), warnings


def _load_npy(path: Path, size) -> tuple[np.ndarray, list[str]]:
    """A .npy file -> float32 (N, rows*cols). Arrays already shaped like the model's inputs are kept
    as they are (scaled to [0, 1]); any other 2-D or (H, W, 3|4) array is a picture, made
    MNIST-style."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read .npy file ({exc})") from exc
    (rows, cols), pixels = size, size[0] * size[1]
    shaped = arr.shape in ((rows, cols), (pixels,)) or arr.shape[1:] in ((rows, cols), (pixels,))
    picture = (
        not shaped
        and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)))
        and min(arr.shape[:2]) >= 8
    )
    if not shaped and not picture:
        raise DataError(
            f"{path}: array of shape {arr.shape} is not ({rows}, {cols}), ({pixels},), "
            f"(N, {rows}, {cols}), (N, {pixels}) nor a picture (H, W) or (H, W, 3|4)"
        )
    if arr.dtype.kind not in "uifb":
        raise DataError(
            f"{path}: unsupported dtype {arr.dtype} (use uint8 0..255 or floats in [0, 1])"
        )
    if picture:
        try:
            img, warnings = mnist_style(arr, size)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
        return img.reshape(1, -1), warnings
    return to_unit_scale(arr.reshape(-1, pixels), str(path)), []


def image_size(in_features: int) -> tuple[int, int]:
    """The image size (rows, cols) of a model with `in_features` inputs: (side, side) for a square
    number (784 -> (28, 28)), else (1, in_features): such a model reads .npy rows but no
    pictures."""
    side = math.isqrt(int(in_features))
    return (side, side) if side * side == in_features else (1, int(in_features))


def load_image_file(path, size=(28, 28)) -> tuple[np.ndarray, list[str]]:
    """One file -> (float32 (N, rows*cols) in [0, 1], warnings: list of sentences about the file).

    Pictures (PNG, JPEG, ...) hold one digit and go through :func:`mnist_style`; ``.npy`` files hold
    (rows, cols), (rows*cols,), (N, rows, cols) or (N, rows*cols) arrays, kept as they are (brought
    to [0, 1] by :func:`to_unit_scale`), or one picture of another shape.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path, size)
    if suffix in _IMAGE_SUFFIXES:
        if min(size) < 4:
            raise DataError(
                f"{path}: the model takes {size[0] * size[1]} inputs, which is not a square image, "
                f"so it cannot read pictures; give .npy arrays of {size[0] * size[1]} values"
            )
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        return _load_picture(path, size)
    raise DataError(
        f"{path}: unknown file type {suffix or '(no extension)'!r}; "
        f"expected .npy or an image ({', '.join(_IMAGE_SUFFIXES)})"
    )


def load_images(paths, size=(28, 28)) -> np.ndarray:
    """Load image files for prediction as one float32 array (N, size[0]*size[1]) in [0, 1]; see
    :func:`load_image_file` (warnings are dropped here)."""
    parts = [
        load_image_file(p, size)[0]
        for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    ]
    return np.concatenate(parts) if parts else np.empty((0, size[0] * size[1]), np.float32)
