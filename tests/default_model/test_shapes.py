"""The procedural dataset: API, determinism, exact masks and no shortcut outside the object."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from onnxplain.default_model import shapes


@pytest.fixture(scope="module")
def sample() -> shapes.Sample:
    return shapes.generate(400, seed=5, size=96)


def test_api_shapes_and_dtypes(sample):
    n = 400
    assert isinstance(shapes.CLASSES, tuple) and 6 <= len(shapes.CLASSES) <= 8
    assert len(set(shapes.CLASSES)) == len(shapes.CLASSES)
    assert sample.images.shape == (n, 96, 96, 3) and sample.images.dtype == np.uint8
    assert sample.labels.shape == (n,) and sample.labels.dtype == np.int64
    assert sample.masks.shape == (n, 96, 96) and sample.masks.dtype == bool
    assert sample.boxes.shape == (n, 4) and np.issubdtype(sample.boxes.dtype, np.integer)
    other = shapes.generate(3, seed=5, size=64)
    assert other.images.shape == (3, 64, 64, 3) and other.masks.shape == (3, 64, 64)


def test_deterministic():
    a, b = shapes.generate(50, seed=11), shapes.generate(50, seed=11)
    for field in ("images", "labels", "masks", "boxes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = shapes.generate(50, seed=12)
    assert not np.array_equal(a.images, c.images)
    r1, r2 = shapes.render(3, seed=7, size=128), shapes.render(3, seed=7, size=128)
    np.testing.assert_array_equal(r1.images, r2.images)
    assert r1.images.shape == (1, 128, 128, 3) and r1.labels.tolist() == [3]


def test_classes_balanced(sample):
    assert np.bincount(sample.labels, minlength=len(shapes.CLASSES)).tolist() == [50] * len(shapes.CLASSES)
    counts = np.bincount(shapes.generate(83, seed=1, size=32).labels, minlength=len(shapes.CLASSES))
    assert counts.max() - counts.min() <= 1 and counts.sum() == 83


def test_masks_match_boxes(sample):
    for mask, (x0, y0, x1, y1) in zip(sample.masks, sample.boxes):
        assert mask.any()
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert not (mask & ~inside).any()                       # nothing outside the box
        assert mask[y0].any() and mask[y1 - 1].any()            # the box is tight
        assert mask[:, x0].any() and mask[:, x1 - 1].any()


def test_mask_is_the_drawn_object():
    # Object pixels share one (shaded, noisy) colour that stands apart from the pixels just around them.
    s = shapes.generate(64, seed=3)
    for img, mask in zip(s.images.astype(np.float32), s.masks):
        obj = img[mask]
        ring = img[_dilate(mask, 3) & ~mask]
        spread_obj = np.linalg.norm(obj - obj.mean(0), axis=1).mean()
        gap = np.linalg.norm(obj.mean(0) - ring.mean(0))
        assert gap > spread_obj, "object pixels do not stand out from their surroundings"


def test_object_size(sample):
    side = np.maximum(sample.boxes[:, 2] - sample.boxes[:, 0], sample.boxes[:, 3] - sample.boxes[:, 1]) / 96
    assert side.min() >= 0.22 and side.max() <= 0.62
    assert 0.35 <= np.median(side) <= 0.5


def test_background_statistics_do_not_give_away_the_class():
    # Nearest-class-mean on the background's colour mean/std must stay near chance (1/K).
    s = shapes.generate(2400, seed=21)
    bg = ~s.masks[..., None]
    count = bg.sum(axis=(1, 2))
    mean = (s.images * bg).sum(axis=(1, 2)) / count
    sq = (s.images.astype(np.float64) ** 2 * bg).sum(axis=(1, 2)) / count
    feats = np.concatenate([mean, np.sqrt(np.maximum(sq - mean**2, 0))], axis=1)
    feats = (feats - feats.mean(0)) / feats.std(0)
    train, test = slice(0, 1600), slice(1600, None)
    k = len(shapes.CLASSES)
    centroids = np.stack([feats[train][s.labels[train] == c].mean(0) for c in range(k)])
    pred = np.argmin(((feats[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == s.labels[test]).mean() < 1 / k + 0.06


def test_fast_enough():
    t = time.perf_counter()
    shapes.generate(2000, seed=0)
    assert time.perf_counter() - t < 15.0        # ~3 s here; 10k images in well under a minute


def test_importable_without_torch():
    code = "import sys; sys.modules['torch'] = None; import onnxplain.default_model.shapes as s; s.render(0, 0)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_arguments():
    with pytest.raises(ValueError):
        shapes.render(len(shapes.CLASSES), seed=0)
    with pytest.raises(ValueError):
        shapes.generate(-1, seed=0)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    padded = np.pad(mask, r)
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out
