"""Draw a map over the original image with a perceptual colormap (numpy + Pillow only)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# viridis (van der Walt & Smith, matplotlib's default), sampled at 9 evenly spaced points; linear
# interpolation between them stays within a few levels of the full table and keeps it perceptually ordered.
VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 RGB."""
    position = np.clip(values, 0, 1) * (len(VIRIDIS) - 1)
    lo = np.floor(position).astype(int).clip(0, len(VIRIDIS) - 2)
    frac = (position - lo)[..., None]
    return (VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def display_scale(saliency: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for display only (the .npy keeps the raw values)."""
    saliency = np.nan_to_num(saliency.astype(np.float64))
    lo, hi = saliency.min(), saliency.max()
    return (saliency - lo) / (hi - lo) if hi > lo else np.zeros_like(saliency)


def overlay(original: Image.Image, saliency: np.ndarray, crop: tuple[float, float, float, float],
            alpha: float = 0.55) -> Image.Image:
    """The map, computed over the model input, resized onto the region `crop` of the original image that
    became that input, blended with the picture; outside the region the picture is dimmed."""
    base = displayed(original)
    x0, y0, x1, y1 = (int(round(v)) for v in crop)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(max(x1, x0 + 1), base.width), min(max(y1, y0 + 1), base.height)
    heat = Image.fromarray(colorize(display_scale(saliency))).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out = np.asarray(base, dtype=np.float32) * 0.5
    region = np.asarray(base.crop((x0, y0, x1, y1)), dtype=np.float32)
    out[y0:y1, x0:x1] = (1 - alpha) * region + alpha * np.asarray(heat, dtype=np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def displayed(original: Image.Image) -> Image.Image:
    """The picture in RGB as it displays and as the server decoded it (kernels/images.py), whose pixels a map's
    crop refers to: its EXIF orientation applied, 16-bit greyscale scaled to 8 bits (v / 257, rounded) where
    Image.convert would clip it at 255."""
    sixteen_bit = original.mode.startswith("I;16") or (original.mode == "I" and original.format == "PNG")
    picture = ImageOps.exif_transpose(original)
    if sixteen_bit:
        picture = Image.fromarray(((np.asarray(picture).astype(np.uint32) + 128) // 257).astype(np.uint8))
    return picture.convert("RGB")
