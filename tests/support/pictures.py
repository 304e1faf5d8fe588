"""Realistic pictures of digits, built in the tests (no files committed): MNIST test digits
"re-photographed" and digits typed in the fonts this machine has; plus the old loader, for "before".

Each builder returns a list of (Pillow image, label, description); `save_set` writes them as files
the way a user would have them (PNG or JPEG, with EXIF orientation where a phone would put one).
"""

from __future__ import annotations

import glob
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PAPERS = [
    (1.0, 1.0, 1.0),
    (0.96, 0.92, 0.78),
    (0.85, 0.9, 0.97),
    (0.8, 0.8, 0.8),
    (0.98, 0.86, 0.86),
]
INKS = [(0.0, 0.0, 0.0), (0.1, 0.15, 0.45), (0.25, 0.25, 0.25), (0.05, 0.3, 0.1)]
EXIF_ORIENTATION = 0x0112


def photographed(digits: np.ndarray, labels: np.ndarray, seed: int = 0):
    """MNIST digits (N, 28, 28) float32 in [0, 1] made into pictures a person might take of them:
    enlarged 2.5-5x, dark ink on tinted paper, shifted in a larger canvas, under uneven light, some
    blurred, with sensor noise; the last field of each item says which file form it takes (see
    `encode`)."""
    rng = np.random.default_rng(seed)
    items = []
    for i, (digit, label) in enumerate(zip(digits, labels)):
        side = int(28 * rng.uniform(2.5, 5))
        big = Image.fromarray((digit * 255).astype(np.uint8)).resize(
            (side, side), Image.Resampling.BICUBIC
        )
        h, w = int(side * rng.uniform(1.2, 1.8)), int(side * rng.uniform(1.2, 1.8))
        canvas = np.zeros((h, w), np.float32)
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        canvas[y0 : y0 + side, x0 : x0 + side] = np.asarray(big, np.float32) / 255
        form = ["png", "jpeg", "jpeg-exif", "rgba", "palette", "grey16"][i % 6]
        if form == "rgba":  # a canvas drawing: black strokes on transparent pixels
            rgba = np.zeros((h, w, 4), np.uint8)
            rgba[..., 3] = (canvas * 255).astype(np.uint8)
            items.append((Image.fromarray(rgba, "RGBA"), int(label), form))
            continue
        paper, ink = (
            np.array(PAPERS[rng.integers(len(PAPERS))]),
            np.array(INKS[rng.integers(len(INKS))]),
        )
        rgb = paper * (1 - canvas[..., None]) + ink * canvas[..., None]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        light = 1.0 - 0.25 * rng.uniform() * (
            xx * np.cos(i) + yy * np.sin(i)
        )  # light falls off one way
        rgb = rgb * light[..., None] + rng.normal(0, 0.015, rgb.shape)
        img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
        if rng.uniform() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.25 * side / 28 + 0.5)))
        if form == "palette":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        elif form == "grey16":
            img = Image.fromarray(
                (np.asarray(img.convert("L"), np.float32) * 257).astype(np.uint16)
            )
        items.append((img, int(label), form))
    return items


def font_paths():
    """TrueType fonts on this machine, or [] (the caller then uses Pillow's own scalable font)."""
    return sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))


def typed(seed: int = 1, size: int = 120):
    """Digits 0-9 typed in every font found: dark on white or tinted paper, of varied size and
    place."""
    rng = np.random.default_rng(seed)
    fonts = font_paths() or [None]
    items = []
    for path in fonts:
        for label in range(10):
            pt = int(rng.uniform(0.35, 0.7) * size)
            font = ImageFont.truetype(path, pt) if path else ImageFont.load_default(size=pt)
            paper = tuple(int(255 * c) for c in PAPERS[rng.integers(len(PAPERS))])
            img = Image.new("RGB", (size, size), paper)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), str(label), font=font)
            x = rng.uniform(0.05, 0.95) * (size - (right - left)) - left
            y = rng.uniform(0.05, 0.95) * (size - (bottom - top)) - top
            draw.text((x, y), str(label), fill=(20, 20, 30), font=font)
            items.append((img, label, "jpeg" if label % 2 else "png"))
    return items


def encode(img: Image.Image, form: str, seed: int = 0) -> bytes:
    """The picture's file bytes: PNG, or JPEG (quality 60-90); "jpeg-exif" stores the pixels turned
    a quarter turn with EXIF orientation 6, as a phone held upright does."""
    buf = io.BytesIO()
    if form.startswith("jpeg"):
        quality = 60 + seed % 31
        if form == "jpeg-exif":
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = (
                6  # "rotate 90 clockwise to show": the stored pixels lie turned left
            )
            img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=quality, exif=exif)
        else:
            img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def save_set(items, folder):
    """Write each picture as a file; returns [(path, label)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (img, label, form) in enumerate(items):
        path = folder / f"{i:04d}-{label}-{form}.{'jpg' if form.startswith('jpeg') else 'png'}"
        path.write_bytes(encode(img, form, i))
        out.append((path, label))
    return out


def old_loader(path, size=(28, 28)) -> np.ndarray:
    """What `gpunet predict` did before MNIST-style preprocessing (issue 15): the whole picture made
    grey, shrunk to 28x28, inverted when mostly light. Float32 (rows*cols,)."""
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        grey = img.convert("L").resize((size[1], size[0]), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, dtype=np.float32) / np.float32(255)
    if pixels.mean() > 0.5:
        pixels = 1.0 - pixels
    return pixels.reshape(-1)
