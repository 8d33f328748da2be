"""Procedural shapes dataset: one coloured shape on a textured background, object pixels known exactly.

The label lives only in the object's *shape*: its colour, position, scale and rotation are drawn
independently of the class, and the background (a random mix of noise, stripes, gradients,
checkerboards and colour blobs) is drawn the same way for every class. A classifier can therefore
only succeed by looking at the object, which makes the data a ground truth for saliency maps.

numpy + Pillow only (no torch), deterministic for a given ``seed``, vectorised over image chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
)

_CHUNK = 256                  # images drawn per vectorised step (bounds memory)
_SIDE_RANGE = (0.36, 0.60)    # object extent (diameter of its enclosing disk) / image side
_MIN_CONTRAST = 90.0          # min RGB distance between object colour and background key colours


@dataclass(frozen=True)
class Sample:
    images: np.ndarray   # uint8 (n, size, size, 3), RGB
    labels: np.ndarray   # int64 (n,), index into CLASSES
    masks: np.ndarray    # bool (n, size, size), exact object pixels
    boxes: np.ndarray    # int64 (n, 4): x0, y0, x1, y1 of the mask, inclusive-exclusive (x1 = last col + 1)

    def __len__(self) -> int:
        return len(self.labels)


def generate(n: int, seed: int, size: int = 96) -> Sample:
    """n images with balanced classes (each class n // K or n // K + 1 times, shuffled)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    return _draw(labels, rng, size)


def render(label: int, seed: int, size: int = 96) -> Sample:
    """A single image of class ``label`` (a Sample of length 1; ``.images[0]`` is the picture)."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES) - 1}], got {label}")
    rng = np.random.default_rng(seed)
    return _draw(np.array([label], dtype=np.int64), rng, size)


def _draw(labels: np.ndarray, rng: np.random.Generator, size: int) -> Sample:
    n = len(labels)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        images[sl], masks[sl] = _draw_chunk(labels[sl], rng, size)
    boxes = _boxes(masks)
    return Sample(images=images, labels=labels.astype(np.int64), masks=masks, boxes=boxes)


def _boxes(masks: np.ndarray) -> np.ndarray:
    n, h, w = masks.shape
    cols = masks.any(axis=1)   # (n, w)
    rows = masks.any(axis=2)   # (n, h)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------- colours

def _far_colours(rng: np.random.Generator, obj: np.ndarray, k: int) -> np.ndarray:
    """k random colours per image, each pushed to at least _MIN_CONTRAST away from the object colour."""
    n = len(obj)
    c = rng.uniform(0, 255, (n, k, 3))
    d = c - obj[:, None, :]
    dist = np.linalg.norm(d, axis=-1, keepdims=True)
    # Too close: move along the difference (or a random direction when identical) to the min distance,
    # then reflect back into the cube if that overshoots it.
    direction = np.where(dist > 1e-3, d / np.maximum(dist, 1e-3), rng.normal(size=d.shape))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    pushed = obj[:, None, :] + direction * _MIN_CONTRAST
    flipped = obj[:, None, :] - direction * _MIN_CONTRAST
    pushed = np.where(((pushed < 0) | (pushed > 255)).any(-1, keepdims=True), flipped, pushed)
    c = np.where(dist < _MIN_CONTRAST, pushed, c)
    return np.clip(c, 0, 255)


# ----------------------------------------------------------------------------------------- backgrounds

def _smooth_noise(rng: np.random.Generator, n: int, size: int, grid: int) -> np.ndarray:
    """Value noise: a random grid x grid lattice, bilinearly upsampled to size x size, in [0, 1]."""
    g = rng.uniform(0, 1, (n, grid + 1, grid + 1))
    t = np.linspace(0, grid, size, dtype=np.float64)
    i0 = np.minimum(t.astype(int), grid - 1)
    f = (t - i0)[None, :]
    rows = g[:, i0, :] * (1 - f[..., None]) + g[:, i0 + 1, :] * f[..., None]       # (n, size, grid+1)
    return (rows[:, :, i0] * (1 - f[:, None, :]) + rows[:, :, i0 + 1] * f[:, None, :]).astype(np.float32)


def _backgrounds(rng: np.random.Generator, obj: np.ndarray, size: int) -> np.ndarray:
    n = len(obj)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size       # (size, size) in [0, 1)
    X, Y = xx[None], yy[None]
    cols = _far_colours(rng, obj, 6).astype(np.float32)               # (n, 6, 3)
    kinds = 5
    primary = rng.integers(0, kinds, n)
    secondary = (primary + rng.integers(1, kinds, n)) % kinds
    alpha = np.where(rng.random(n) < 0.6, rng.uniform(0.25, 0.6, n), 0.0).astype(np.float32)

    def uniform(lo: float, hi: float, m: int) -> np.ndarray:
        return rng.uniform(lo, hi, (m, 1, 1)).astype(np.float32)

    def direction(m: int) -> tuple[np.ndarray, np.ndarray]:
        a = uniform(0, np.pi, m)
        return np.cos(a), np.sin(a)

    def noise(m: int) -> np.ndarray:             # smooth value noise plus per-pixel grain
        amount = uniform(0.1, 0.7, m)
        grain = rng.random((m, size, size), dtype=np.float32)
        return np.clip(_smooth_noise(rng, m, size, 6) * (1 - amount) + grain * amount, 0, 1)

    def stripes(m: int) -> np.ndarray:           # sinusoidal or hard, random angle / frequency / phase
        c, s = direction(m)
        freq, phase = uniform(3, 14, m), uniform(0, 2 * np.pi, m)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (X * c + Y * s) + phase)
        hard = rng.random((m, 1, 1)) < 0.5
        return np.where(hard, (t > 0.5).astype(np.float32), t)

    def gradient(m: int) -> np.ndarray:          # linear ramp along a random direction
        c, s = direction(m)
        p = X * c + Y * s
        lo, hi = p.min(axis=(1, 2), keepdims=True), p.max(axis=(1, 2), keepdims=True)
        return (p - lo) / np.maximum(hi - lo, 1e-6)

    def checker(m: int) -> np.ndarray:           # rotated, cells small enough never to pass for an object
        c, s = direction(m)
        cell = uniform(3, 12, m) / size
        u, v = (X * c + Y * s) / cell, (-X * s + Y * c) / cell
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)

    def blobs(m: int) -> np.ndarray:             # soft gaussian patches blended over a base level
        t = np.zeros((m, size, size), np.float32)
        for level in (0.25, 0.5, 0.75, 1.0):
            cx, cy, sigma = uniform(-0.1, 1.1, m), uniform(-0.1, 1.1, m), uniform(0.08, 0.3, m)
            w = np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * sigma**2))
            t = t * (1 - w) + level * w
        return t

    # Each texture is a scalar field t in [0, 1] mapped onto two of the image's colours; blobs get a
    # three-colour ramp so that patches of several colours appear.
    fields = ((noise, 0, 1), (stripes, 2, 3), (gradient, 0, 4), (checker, 1, 5), (blobs, 2, 5))
    out = np.zeros((n, size, size, 3), np.float32)
    for k, (field, a, b) in enumerate(fields):
        weight = np.where(primary == k, 1 - alpha, 0) + np.where(secondary == k, alpha, 0)
        idx = np.flatnonzero(weight > 0)
        if not len(idx):
            continue
        t = field(len(idx))[..., None]
        ca, cb = cols[idx, None, None, a], cols[idx, None, None, b]
        if field is blobs:
            cm = cols[idx, None, None, 3]
            tex = np.where(t < 0.5, ca + (cm - ca) * (2 * t), cm + (cb - cm) * (2 * t - 1))
        else:
            tex = ca + (cb - ca) * t
        out[idx] += weight[idx, None, None, None].astype(np.float32) * tex
    return out


# ---------------------------------------------------------------------------------------------- shapes
# Each shape is an implicit function of local coordinates (u, v), rotated and scaled so that the
# shape fits the unit disk; the disk's diameter is the object's nominal side.

def _circle(u, v):
    return u * u + v * v <= 0.95**2


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.68


def _triangle(u, v):
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
    return inside


def _star(u, v, inner=0.45, points=5):
    r = np.sqrt(u * u + v * v)
    sector = 2 * np.pi / points
    t = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2)     # 0 at a tip, sector/2 at a notch
    ax, ay = 1.0, 0.0
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    px, py = r * np.cos(t), r * np.sin(t)
    side = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    side_origin = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return side * side_origin >= 0


def _cross(u, v, w=0.3, arm=0.92):
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _crescent(u, v):
    return (u * u + v * v <= 0.95**2) & ((u - 0.45) ** 2 + v * v > 0.8**2)


def _heart(u, v):
    x, y = u * 1.2, 0.1 - v * 1.2
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


_SHAPES = (_circle, _square, _triangle, _star, _cross, _ring, _crescent, _heart)
assert len(_SHAPES) == len(CLASSES)


def _draw_chunk(labels: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    obj = rng.uniform(0, 255, (n, 3))
    bg = _backgrounds(rng, obj, size)

    radius = rng.uniform(*_SIDE_RANGE, n) * size / 2
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    theta = rng.uniform(0, 2 * np.pi, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5                 # pixel centres
    dx = xx[None] - cx[:, None, None].astype(np.float32)
    dy = yy[None] - cy[:, None, None].astype(np.float32)
    c = np.cos(theta)[:, None, None].astype(np.float32)
    s = np.sin(theta)[:, None, None].astype(np.float32)
    r = radius[:, None, None].astype(np.float32)
    u, v = (dx * c + dy * s) / r, (-dx * s + dy * c) / r

    masks = np.zeros((n, size, size), bool)
    for k, shape in enumerate(_SHAPES):
        sel = labels == k
        if sel.any():
            masks[sel] = shape(u[sel], v[sel])

    # object: its colour with a gentle shading ramp so it is not perfectly flat
    shade = rng.uniform(-25, 25, (n, 1, 1, 1)).astype(np.float32) * u[..., None]
    fg = obj[:, None, None, :].astype(np.float32) + shade
    img = np.where(masks[..., None], fg, bg)
    sigma = rng.uniform(0, 10, (n, 1, 1, 1)).astype(np.float32)
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks
