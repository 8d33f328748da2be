"""Occlusion against a straightforward numpy re-implementation (real model, real photo, through the real
server), and its maps on the shipped default model, whose object locations are known."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from PIL import Image

from onnxplain.client import MapResult

from support import EFFICIENTNET, SHARED, needs_shared, pointing_game


def reference_occlusion(session, x, target, window, stride, baseline):
    """Captum's definition, written out: every window position, one occluded input each; each pixel gets the
    mean score drop over the windows that cover it."""
    _, _, height, width = x.shape
    base = session.run(None, {"input": x})[0][0, target]
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    occluded = []
    positions = [(y, x0) for y in range(0, height - window + 1, stride) for x0 in range(0, width - window + 1, stride)]
    for y, x0 in positions:
        z = x.copy()
        z[:, :, y:y + window, x0:x0 + window] = baseline
        occluded.append(z)
    scores = np.concatenate([session.run(None, {"input": np.concatenate(occluded[i:i + 32])})[0]
                             for i in range(0, len(occluded), 32)])[:, target]
    for (y, x0), score in zip(positions, scores):
        total[y:y + window, x0:x0 + window] += base - score
        count[y:y + window, x0:x0 + window] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def efficientnet_input(path):
    """The model's declared preprocessing, written out independently of kernels.images."""
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    img = img.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    x = (np.asarray(img, np.float32) - 127.5) / 128.0
    return x.transpose(2, 0, 1)[None].copy()


@needs_shared
def test_occlusion_on_efficientnet_matches_numpy_reference(client):
    window, stride, baseline = 48, 25, 0.25   # 8 x 8 windows; the last row and column are covered by none
    photo = SHARED / "images" / "chelsea.jpg"
    events = client.explain("efficientnet", [photo], [("occlusion", dict(window=window, stride=stride,
                                                                         baseline=baseline))], targets=[285])
    served = next(e for e in events if isinstance(e, MapResult) and e.final).map
    session = ort.InferenceSession(str(EFFICIENTNET), providers=["CPUExecutionProvider"])
    expected = reference_occlusion(session, efficientnet_input(photo), 285, window, stride, baseline)
    assert served.shape == expected.shape == (224, 224)
    # Same occluded inputs and same batches of 32: equal up to float32 rounding of the accumulation.
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert (served[:, 223] == 0).all() and (served[223] == 0).all()
    assert np.abs(expected).max() > 0.1


def test_occlusion_points_at_the_object_on_held_out_shapes(client):
    from onnxplain.default_model import shapes

    held_out = shapes.generate(60, seed=9_000_001, size=128)
    hits, on_mask = pointing_game(client, held_out, "occlusion", dict(window=16, stride=8))
    assert hits / 60 >= 0.9, f"occlusion maximum in the object's box on {hits}/60 ({on_mask}/60 on its pixels)"
