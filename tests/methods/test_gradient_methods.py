"""Gradient and CAM methods on torch-defined nets exported to ONNX, against Captum (relative error <= 1e-3)
and, for the methods Captum lacks, against the paper's formula evaluated on PyTorch autograd tensors
(Pearson r >= 0.999). The ONNX side runs through kernels only (no gRPC); test_methods_served.py drives them
through the real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from onnxplain.kernels import graph
from onnxplain.kernels.methods import METHODS, Job, Maps
from onnxplain.kernels.methods.gradients import smoothgrad_noise
from onnxplain.kernels.runtime import Runner

captum_attr = pytest.importorskip("captum.attr")
torch.set_num_threads(1)

TARGETS = (3, 7)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


class Net:
    """One zoo net: the torch module, its ONNX export in a Runner, the default layer, and an input."""

    def __init__(self, name, exporter, path):
        self.name, self.exporter = name, exporter
        self.torch = zoo.build(name)
        self.model = graph.load_model(path)
        self.runner = Runner(self.model, graph.score_tensor(self.model), graph.input_spec(self.model)[0], max_batch=16)
        self.layer = graph.default_layer(self.model)
        self.x = zoo.example_input(name, 1, seed=5)

    def run(self, method, params=None, targets=TARGETS) -> Maps:
        m = METHODS[method]
        sample = self.x[0].numpy()
        job = Job(self.runner, sample, np.array(targets), m.resolve(params or {}, sample.shape[1:]), "NCHW",
                  self.layer if m.uses_layer else None)
        return [e for e in m.run(job) if isinstance(e, Maps) and e.final][-1]

    def captum(self, cls, *args, targets=TARGETS, **kwargs):
        method = cls(self.torch, *args)
        return np.concatenate([method.attribute(self.x.clone().requires_grad_(), target=t, **kwargs).detach().numpy()
                               for t in targets])

    def layer_tensors(self, targets=TARGETS):
        """[T, K, h, w] activations and gradients of the default probe, from torch autograd."""
        acts, grads = [], []
        for t in targets:
            seed = torch.zeros(1, 10)
            seed[0, t] = 1
            out = zoo.run_with_probes(self.torch, self.x, seed)
            acts.append(out["acts"]["default"])
            grads.append(out["grads"]["default"])
        a, g = np.concatenate(acts), np.concatenate(grads)
        if a.ndim == 3:  # tokens: drop the CLS token, tokens to the patch grid, channels first
            h, w = self.layer.grid
            a, g = (v[:, self.layer.prefix_tokens:].reshape(len(v), h, w, -1).transpose(0, 3, 1, 2) for v in (a, g))
        elif self.layer.kind == "spatial_nhwc":
            a, g = a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
        return a.astype(np.float64), g.astype(np.float64)


@pytest.fixture(scope="module", params=[("resnet", "legacy"), ("resnet", "dynamo"), ("densenet", "legacy"),
                                        ("vit", "legacy"), ("vit", "dynamo"), ("swin", "legacy"),
                                        ("swin", "dynamo"), ("swin_nhwc", "dynamo")], ids=lambda p: "-".join(p))
def net(request, zoo_model):
    return Net(*request.param, zoo_model(*request.param))


def test_gradient_is_captum_saliency(net):
    ours = net.run("gradient")
    np.testing.assert_array_less(rel(np.abs(ours.attribution), net.captum(captum_attr.Saliency)), 1e-3)
    raw = net.captum(captum_attr.Saliency, abs=False)
    assert rel(ours.attribution, raw) <= 1e-3
    np.testing.assert_allclose(ours.maps, np.abs(raw).max(1), rtol=1e-3, atol=1e-3 * np.abs(raw).max())


def test_input_x_gradient_is_captum(net):
    ours = net.run("input_x_gradient")
    expected = net.captum(captum_attr.InputXGradient)
    assert rel(ours.attribution, expected) <= 1e-3
    assert rel(ours.maps, expected.sum(1)) <= 1e-3


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_is_captum(net, method):
    ours = net.run("integrated_gradients", {"steps": 12, "method": method, "baseline": "zero"})
    expected = net.captum(captum_attr.IntegratedGradients, n_steps=12, method=method,
                          baselines=torch.zeros_like(net.x))
    if method == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (halved at the ends), which sum to (n-1)/n; the trapezoid rule on
        # n points of [0, 1] has spacing 1/(n-1). We follow the rule (weights summing to 1, so completeness holds
        # as the steps grow): ours = Captum's * n/(n-1).
        expected = expected * 12 / 11
    assert rel(ours.attribution, expected) <= 1e-3
    # the reported completeness gap is the one Captum computes
    gaps = [s["completeness_gap"] for s in ours.stats]
    logits = net.torch(net.x).detach().numpy()[0] - net.torch(torch.zeros_like(net.x)).detach().numpy()[0]
    np.testing.assert_allclose(gaps, expected.reshape(2, -1).sum(1) - logits[list(TARGETS)],
                               atol=1e-3 * np.abs(logits).max())


def test_integrated_gradients_custom_and_blurred_baselines(net):
    custom = np.full(net.x.shape[1:], 0.3, np.float32)
    ours = net.run("integrated_gradients", {"steps": 8, "baseline": "custom", "baseline_tensor": custom},
                   targets=(2,))
    expected = net.captum(captum_attr.IntegratedGradients, n_steps=8, baselines=torch.from_numpy(custom)[None],
                          targets=(2,))
    assert rel(ours.attribution, expected) <= 1e-3
    from scipy.ndimage import gaussian_filter
    blurred = gaussian_filter(net.x[0].numpy(), (0, 2.0, 2.0), mode="nearest")
    ours = net.run("integrated_gradients", {"steps": 8, "baseline": "blurred", "blur_sigma": 2.0}, targets=(2,))
    expected = net.captum(captum_attr.IntegratedGradients, n_steps=8, baselines=torch.from_numpy(blurred)[None],
                          targets=(2,))
    assert rel(ours.attribution, expected) <= 1e-3


@pytest.mark.parametrize("variant, nt_type", [("plain", "smoothgrad"), ("squared", "smoothgrad_sq"),
                                              ("variance", "vargrad")])
def test_smoothgrad_is_captum_noise_tunnel_with_the_same_noise(net, variant, nt_type, monkeypatch):
    params = {"samples": 6, "noise_level": 0.2, "variant": variant, "seed": 11}
    ours = net.run("smoothgrad", params)
    sample = net.x[0].numpy()
    noise = torch.from_numpy(np.concatenate(list(smoothgrad_noise(sample, 6, 0.2, 11))))
    monkeypatch.setattr(torch, "normal", lambda mean, std: noise.clone())   # Captum draws its noise with it
    stdev = 0.2 * float(sample.max() - sample.min())
    expected = np.concatenate([
        captum_attr.NoiseTunnel(captum_attr.Saliency(net.torch)).attribute(
            net.x.clone(), target=t, nt_type=nt_type, nt_samples=6, stdevs=stdev, abs=False).detach().numpy()
        for t in TARGETS])
    assert rel(ours.attribution, expected) <= 1e-3


@pytest.fixture(scope="module", params=[("resnet", "legacy"), ("resnet", "dynamo"), ("densenet", "legacy")],
                ids=lambda p: "-".join(p))
def relu_net(request, zoo_model):
    """Nets whose activations are nn.ReLU modules, the only ones Captum's GuidedBackprop/Deconvolution modify
    (on the ViT's GELU they would return the plain gradient; our rules for GELU are documented in autodiff)."""
    return Net(*request.param, zoo_model(*request.param))


def test_guided_backprop_and_deconvnet_are_captum(relu_net):
    for method, cls in (("guided_backprop", captum_attr.GuidedBackprop), ("deconvnet", captum_attr.Deconvolution)):
        ours, expected = relu_net.run(method).attribution, relu_net.captum(cls)
        assert rel(ours, expected) <= 1e-3, method
        assert rel(ours, relu_net.run("gradient").attribution) > 0.05, f"{method} should differ from the gradient"


def test_gradcam_is_captum_layer_gradcam_and_guided_gradcam(net):
    ours = net.run("gradcam")
    if net.name in ("vit", "swin", "swin_nhwc"):
        # Captum's LayerGradCam averages over the last dims (N x T x C, N x H x W x C): use the formula
        a, g = net.layer_tensors()
        expected = np.maximum((g.mean((2, 3), keepdims=True) * a).sum(1), 0)
        assert rel(ours.maps, expected) <= 1e-3
        return
    layer = net.torch.probes["default"]
    expected = net.captum(captum_attr.LayerGradCam, layer, relu_attributions=True)[:, 0]
    assert ours.maps.shape == expected.shape
    assert rel(ours.maps, expected) <= 1e-3
    guided = net.run("guided_gradcam")
    expected = net.captum(captum_attr.GuidedGradCam, layer, interpolate_mode="bilinear")
    assert rel(guided.attribution, expected) <= 1e-3


def _formula(name, a, g):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    if name == "gradcampp":   # Chattopadhay et al. eq. 19 with exp(S): alpha = g^2 / (2 g^2 + sum A * g^3)
        den = 2 * g ** 2 + a.sum((2, 3), keepdims=True) * g ** 3
        alpha = np.where(g != 0, g ** 2 / np.where(den != 0, den, 1), 0)
        return relu(((alpha * relu(g)).sum((2, 3), keepdims=True) * a).sum(1))
    if name == "xgradcam":    # Fu et al. eq. 9
        return relu(((g * a).sum((2, 3), keepdims=True) / (a.sum((2, 3), keepdims=True) + 1e-7) * a).sum(1))
    if name == "hirescam":
        return relu((g * a).sum(1))
    if name == "layercam":
        return relu((relu(g) * a).sum(1))
    if name == "eigencam":    # first right-singular vector of the centred [positions x channels] matrix
        out = []
        for act in a:
            m = act.reshape(act.shape[0], -1).T
            m = m - m.mean(0)
            proj = m @ np.linalg.svd(m, full_matrices=False)[2][0]
            out.append((proj * np.sign(proj[np.argmax(np.abs(proj))])).reshape(act.shape[1:]))
        return np.stack(out)
    raise KeyError(name)


@pytest.mark.parametrize("method", ["gradcampp", "xgradcam", "hirescam", "layercam", "eigencam"])
def test_cam_variants_follow_their_formulas_on_autograd_tensors(net, method):
    a, g = net.layer_tensors()
    ours = net.run(method).maps
    expected = _formula(method, a, g)
    assert ours.shape == expected.shape
    for t in range(len(TARGETS)):
        if np.ptp(expected[t]) == 0:
            np.testing.assert_allclose(ours[t], expected[t], atol=1e-5)
        else:
            assert pearson(ours[t], expected[t]) >= 0.999, (method, t)


def test_eigencam_decomposes_once_for_all_targets(net, monkeypatch):
    """EigenCAM is class-agnostic: three targets cost one eigen-decomposition, and each gets the map of the
    formula on the autograd activations."""
    from onnxplain.kernels.methods import cam

    calls = []
    top = cam._top_eigenpair
    monkeypatch.setattr(cam, "_top_eigenpair", lambda m: (calls.append(m.shape), top(m))[1])
    maps = net.run("eigencam", targets=(3, 7, 1)).maps
    assert len(calls) == 1 and maps.shape[0] == 3
    expected = _formula("eigencam", *net.layer_tensors(targets=(3,)))[0]
    for m in maps:
        np.testing.assert_array_equal(m, maps[0])
    assert pearson(maps[0], expected) >= 0.999


def test_gradcampp_matches_its_literal_formula_at_zero_denominators():
    """The simplified weights g / (2 + sum(A) g) and the literal alpha formula agree, also where 2 + sum(A) g is
    exactly 0 for a positive g (alpha = g^2 there) and where g is 0 or negative."""
    from onnxplain.kernels.methods.cam import gradcampp

    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    g = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    g[0, 0, 0, 0], g[1, 2, 1, 1] = 0.0, -1.0
    a[0, 1] = -0.125                                # sum(A) = -1 exactly: 2 + sum(A) g = 0 where g = 2
    a[0, 1, 0, 0] = 0.0
    g[0, 1, 2, 2] = 2.0
    for a_, g_ in ((a[1:], g[1:]), (a, g)):         # without, then with a zero denominator
        np.testing.assert_allclose(gradcampp(a_, g_), _formula("gradcampp", a_, g_), rtol=1e-5, atol=1e-6)


def test_cam_reads_the_linear_head_weights(net):
    if net.name == "vit":
        with pytest.raises(Exception, match="global-average-pooling"):
            net.run("cam")
        return
    a, _ = net.layer_tensors()
    weights = (net.torch.head if net.name.startswith("swin") else net.torch.fc).weight.detach().numpy()
    weights = weights.astype(np.float64)
    expected = np.einsum("tk,tkhw->thw", weights[list(TARGETS)], a)
    ours = net.run("cam").maps
    for t in range(len(TARGETS)):
        assert pearson(ours[t], expected[t]) >= 0.999
    assert rel(ours, expected) <= 1e-3


def test_several_targets_share_one_forward_to_the_layer(net):
    """Four targets: the model up to the layer runs once on the sample, the head's gradient graph once for the four
    (one batch), and each map equals the one explained alone (one forward+backward of the whole model)."""
    from onnxplain.kernels.methods import METHODS as ALL
    m = ALL["gradcam"]
    sample = net.x[0].numpy()
    job = Job(net.runner, sample, np.array([1, 2, 3, 4]), {}, "NCHW", net.layer)
    together = list(m.run(job))[-1].maps
    assert (job.passes.runs, job.passes.forward_samples, job.passes.backward_samples) == (2, 1, 4)
    for t, target in enumerate([1, 2, 3, 4]):
        alone = Job(net.runner, sample, np.array([target]), {}, "NCHW", net.layer)
        np.testing.assert_allclose(together[t], list(m.run(alone))[-1].maps[0], rtol=1e-5, atol=1e-6)
        assert (alone.passes.runs, alone.passes.forward_samples, alone.passes.backward_samples) == (1, 0, 1)


def test_a_layer_gradient_after_its_activations_runs_the_head_alone(net, monkeypatch):
    """EigenCAM, then Grad-CAM on one target of the same sample (one request: Job.shared): the first runs the model
    up to the layer, the second only the head's gradient graph, fed that run's outputs instead of the image, and
    its map equals Grad-CAM asked alone (one forward+backward of the whole model)."""
    from onnxplain.kernels.methods import METHODS as ALL
    sample, shared, fed = net.x[0].numpy(), {}, []
    run = net.runner.run
    monkeypatch.setattr(net.runner, "run", lambda session, outputs, feeds, *a, **k: (
        fed.append(set(feeds)), run(session, outputs, feeds, *a, **k))[1])
    first = Job(net.runner, sample, np.array([3]), {}, "NCHW", net.layer, shared=shared)
    list(ALL["eigencam"].run(first))
    second = Job(net.runner, sample, np.array([3]), {}, "NCHW", net.layer, shared=shared)
    maps = list(ALL["gradcam"].run(second))[-1].maps
    assert len(fed) == 2 and fed[0] == {"input"} and "input" not in fed[1] and net.layer.name in fed[1]
    assert (second.passes.runs, second.passes.forward_samples, second.passes.backward_samples) == (1, 0, 1)
    alone = Job(net.runner, sample, np.array([3]), {}, "NCHW", net.layer)
    np.testing.assert_allclose(maps, list(ALL["gradcam"].run(alone))[-1].maps, rtol=1e-5, atol=1e-6)
    assert "input" in fed[2]


def test_several_targets_share_one_forward_of_the_image(net):
    """Pixel-level methods with four targets: Runner.sample_gradients runs the image forward once for the four
    seed rows (the CNNs, both ViTs and the Swins, whose windows hold the batch merged into a dim), and each map
    equals the one explained alone."""
    from onnxplain.kernels.methods.layers import one_hot
    from onnxplain.kernels.runtime import Passes

    targets = [1, 2, 3, 4]
    sample = net.x[0].numpy()
    for rule in ("standard", "guided", "deconvnet"):
        passes = Passes()
        out = net.runner.sample_gradients(sample[None], one_hot(np.array(targets), 10), passes, rule=rule)
        copies = net.runner.gradients(np.repeat(sample[None], 4, axis=0), one_hot(np.array(targets), 10), Passes(),
                                      rule=rule)
        assert (passes.runs, passes.forward_samples, passes.backward_samples) == (1, 0, 4)
        assert rel(out["input__grad"], copies["input__grad"]) <= 1e-5
        net.runner.max_rows = 3        # a shared chunk of three rows, then a lone row through the plain graph
        try:
            passes = Passes()
            out = net.runner.sample_gradients(sample[None], one_hot(np.array(targets), 10), passes, rule=rule)
        finally:
            net.runner.max_rows = 16
        assert (passes.runs, passes.backward_samples) == (2, 4)
        assert rel(out["input__grad"], copies["input__grad"]) <= 1e-5
    for method in ("gradient", "guided_backprop", "deconvnet", "guided_gradcam"):
        together = net.run(method, targets=targets).maps
        for t, target in enumerate(targets):
            np.testing.assert_allclose(together[t], net.run(method, targets=[target]).maps[0], rtol=1e-4, atol=1e-6)
