"""Every method on every architecture family of tests/architectures.py (both torch exporters), through the kernels:
the final maps have the method's shape (the layer's grid for the CAM family, the input's for the others), are
finite and not all zero, and the map of a target explained together with another equals its map explained alone
(targets are rows of one batched run). The targets are the two top classes, as a user would ask (random nets leave
some logits at a dead ReLU's exact zero, where a zero map is the right answer). CAM refuses the heads it is not
defined for, naming the method that works.
Numerical agreement with references is checked elsewhere (test_gradient_methods, test_scorecam, ...); this is
about every method composing with every graph shape (token grids with prefix tokens, MLP token mixing, non-global
pools, max heads)."""
import numpy as np
import pytest

from architectures import NETS, export
from onnxplain.kernels import graph
from onnxplain.kernels.methods import METHODS, Job, Maps, ParamError
from onnxplain.kernels.runtime import Passes, Runner

SMALL = {"smoothgrad": dict(samples=4), "integrated_gradients": dict(steps=4, baseline="zero"),
         "rise": dict(masks=64), "opticam": dict(iterations=3), "occlusion": dict(window=4, stride=4)}
AT_LAYER_GRID = {n for n, m in METHODS.items() if m.family == "cam"} - {"guided_gradcam", "opticam"}
# models whose head after the default layer is not global average pooling + linear
NO_CAM_HEAD = {"inception", "convmixer", "deit", "shufflenet", "squeezenet", "einsum_attention"}
CASES = [(name, exporter) for name in NETS for exporter in ("legacy", "dynamo")]


def final_maps(method, runner, layer, x, targets):
    params = method.resolve(SMALL.get(method.name, {}), x.shape[1:], x.shape)
    if method.check_for_layer:
        method.check_for_layer(runner, layer)
    events = list(method.run(Job(runner, x, np.asarray(targets), params, layer=layer)))
    return [e for e in events if isinstance(e, Maps) and e.final][-1].maps


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_every_method_runs_on_the_architecture(name, exporter):
    _, model = export(name, exporter)
    runner = Runner(model, graph.score_tensor(model), "input", max_batch=32, providers=["CPUExecutionProvider"])
    layer = graph.default_layer(model)
    x = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    top, second = np.argsort(runner.scores(x[None], Passes())[0])[::-1][:2]
    for method in METHODS.values():
        if method.name == "cam" and name in NO_CAM_HEAD:
            with pytest.raises(ParamError, match="cam needs a global-average-pooling \\+ linear head.*use gradcam"):
                final_maps(method, runner, layer, x, [top])
            continue
        both = final_maps(method, runner, layer, x, [top, second])
        shape = layer.grid if method.name in AT_LAYER_GRID else (16, 16)
        assert both.shape == (2, *shape), (method.name, both.shape)
        assert np.all(np.isfinite(both)) and np.any(both != 0), method.name
        alone = final_maps(method, runner, layer, x, [second])[0]
        np.testing.assert_allclose(both[1], alone, rtol=1e-4, atol=1e-5 * np.abs(alone).max(), err_msg=method.name)
