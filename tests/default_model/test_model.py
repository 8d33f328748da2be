"""The shipped default model: artefacts, accuracy on held-out data, and that it looks at the object."""

from __future__ import annotations

import tomllib

import numpy as np
import onnx
from PIL import Image

from conftest import HELD_OUT_SEED, MODEL_DIR, OCCLUSION_SEED, SALIENCY_SEED
from onnxplain.default_model import shapes

GREY = 128


def test_model_toml_and_labels():
    config = tomllib.loads((MODEL_DIR / "model.toml").read_text())
    assert config == {
        "name": "shapes", "path": "shapes_cnn.onnx", "labels": "labels.txt",
        "preprocessing": {"fit": "stretch", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3,
                          "channel_order": "RGB"},
    }
    assert (MODEL_DIR / "labels.txt").read_text().splitlines() == list(shapes.CLASSES)


def test_onnx_interface():
    path = MODEL_DIR / "shapes_cnn.onnx"
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 96, 96]
    assert out.type.tensor_type.shape.dim[0].dim_param
    ops = [n.op_type for n in model.graph.node]
    assert "GlobalAveragePool" in ops and ops[-1] == "Gemm"      # CAM applies


def test_samples_are_classified_correctly(classifier):
    files = sorted((MODEL_DIR / "samples").glob("*.png"))
    assert len(files) == 4
    images = []
    for f in files:
        im = Image.open(f)
        assert im.mode == "RGB" and im.size == (128, 128)
        images.append(np.asarray(im))
    names = [f.stem for f in files]
    assert len(set(names)) == 4 and set(names) <= set(shapes.CLASSES)
    pred = classifier.logits(np.stack(images)).argmax(1)
    assert [shapes.CLASSES[p] for p in pred] == names


def test_held_out_accuracy(classifier):
    s = shapes.generate(500, HELD_OUT_SEED, 96)
    acc = (classifier.logits(s.images).argmax(1) == s.labels).mean()
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"


def test_held_out_accuracy_through_resize(classifier):
    s = shapes.generate(200, HELD_OUT_SEED + 1, 128)         # the server stretches these to 96
    acc = (classifier.logits(s.images).argmax(1) == s.labels).mean()
    assert acc >= 0.9, f"held-out accuracy at 128 px {acc:.3f}"


def _background_box(box, size):
    """A rectangle of the box's size, or transposed, that does not touch the (2 px padded) object box."""
    x0, y0, x1, y1 = box
    for w, h in ((x1 - x0, y1 - y0), (y1 - y0, x1 - x0)):
        for bx, by in ((0, 0), (size - w, 0), (0, size - h), (size - w, size - h)):
            if bx + w <= x0 - 2 or bx >= x1 + 2 or by + h <= y0 - 2 or by >= y1 + 2:
                return bx, by, bx + w, by + h
    return None


def test_occluding_the_object_hurts_more_than_occluding_background(classifier):
    s = shapes.generate(100, OCCLUSION_SEED, 96)
    base = classifier.logits(s.images)[np.arange(100), s.labels]
    on_obj, on_bg = s.images.copy(), s.images.copy()
    yy, xx = np.mgrid[0:96, 0:96]
    for i, box in enumerate(s.boxes):
        x0, y0, x1, y1 = box
        on_obj[i, y0:y1, x0:x1] = GREY
        rect = _background_box(box, 96)
        if rect is not None:
            bx0, by0, bx1, by1 = rect
            on_bg[i, by0:by1, bx0:bx1] = GREY
        else:   # no room for a rectangle: the same number of pixels farthest from the object box
            dist = np.maximum.reduce([x0 - xx, xx - (x1 - 1), y0 - yy, yy - (y1 - 1)])
            far = np.argsort(-dist.ravel(), kind="stable")[:(x1 - x0) * (y1 - y0)]
            on_bg[i].reshape(-1, 3)[far] = GREY
    idx = np.arange(100)
    drop_obj = base - classifier.logits(on_obj)[idx, s.labels]
    drop_bg = base - classifier.logits(on_bg)[idx, s.labels]
    frac = (drop_obj > drop_bg).mean()
    assert frac >= 0.9, f"object occlusion hurts more on only {frac:.2f} of images"


def occlusion_maps(classifier, images, labels, window=16, stride=8):
    """Occlusion saliency (grey window): the true-class logit drop, averaged over covering windows."""
    n, size = len(images), images.shape[1]
    starts = range(0, size - window + 1, stride)
    pos = [(y, x) for y in starts for x in starts]
    base = classifier.logits(images)[np.arange(n), labels]
    maps = np.zeros((n, size, size), np.float32)
    cover = np.zeros((size, size), np.float32)
    for y, x in pos:
        cover[y:y + window, x:x + window] += 1
    for i in range(n):
        batch = np.repeat(images[i:i + 1], len(pos), axis=0)
        for k, (y, x) in enumerate(pos):
            batch[k, y:y + window, x:x + window] = GREY
        drops = base[i] - classifier.logits(batch)[:, labels[i]]
        for (y, x), d in zip(pos, drops):
            maps[i, y:y + window, x:x + window] += d
    return maps / cover


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out, padded, (h, w) = mask.copy(), np.pad(mask, r), mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def test_occlusion_map_peaks_on_the_object(classifier):
    s = shapes.generate(50, SALIENCY_SEED, 96)
    maps = occlusion_maps(classifier, s.images, s.labels)
    # The map is constant on stride x stride cells, so its maximum is a region: a hit when that region
    # reaches the object (the maximum is attained inside the mask dilated by 4 px).
    hits = [m[dilate(mask, 4)].max() >= m.max() for m, mask in zip(maps, s.masks)]
    frac = float(np.mean(hits))
    assert frac >= 0.9, f"occlusion maximum inside the object on only {frac:.2f} of images"
