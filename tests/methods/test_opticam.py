"""Opti-CAM against a straightforward re-implementation (torch upsampling, numpy Adam, the model run by
onnxruntime; dF/du by coordinate-wise central differences for the gradient-graph path, by the same random
directions for the finite-difference path), its objective over the iterations, the finite-difference path's
gain against the gradient path's, the fallback for a model the engine cannot differentiate, the real server
with several targets, held-out shapes, and its average drop on the real ImageNet model against Grad-CAM's and
Score-CAM's."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onnxplain.client import MapResult
from onnxplain.default_model import shapes
from onnxplain.kernels import graph
from onnxplain.kernels.compose import PREFIX
from onnxplain.kernels.images import Preprocessing, linear_weights, upsample_bilinear
from onnxplain.kernels.methods import METHODS, Job, Maps, Progress
from onnxplain.kernels.methods.opticam import (ACTS, BASE, SEED, U, activation_span, directions_for,
                                                 gradient_session, gradient_subspace)
from onnxplain.kernels.runtime import Runner

from support import EFFICIENTNET, ROOT, SHARED_IMAGES, needs_shared, png_bytes, pointing_game, shapes_input

SHAPES_MODEL = ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx"


def runner_for(model) -> Runner:
    model = graph.load_model(model)
    return Runner(model, graph.score_tensor(model), "input", max_batch=32, providers=["CPUExecutionProvider"])


# the shipped shapes model's preprocessing, (pixel / 255 - 0.5) / 0.5: its black image is -1 in every channel
SHAPES_PREPROCESSING = Preprocessing(96, 96, fit="stretch", mean=(0.5,) * 3, std=(0.5,) * 3)


def run_opticam(runner, x, targets, partial_every=0, preprocessing=None, **params):
    job = Job(runner, x, np.asarray(targets), METHODS["opticam"].resolve(params, x.shape[1:]),
              layer=graph.default_layer(runner.model), partial_every=partial_every, preprocessing=preprocessing)
    return job, list(METHODS["opticam"].run(job))


class Reference:
    """Opti-CAM written out for one target: S(u) in numpy/torch, the model by onnxruntime. The masked image is
    black + S * (x - black): the pixels multiplied by S, as the official code does (its images are in [0, 1] and
    the normalisation is part of its model); black = 0 means the input tensor itself multiplied."""

    def __init__(self, path, x, layer, target, black=0.0):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        model.graph.output.append(next(v for v in model.graph.value_info if v.name == layer))
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.x, self.target, self.black = x, target, black
        self.acts = np.maximum(self.session.run(None, {"input": x[None]})[1][0], 0).astype(np.float64)

    def saliency(self, u):
        w = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        s = np.einsum("k,khw->hw", w, self.acts)[None, None]
        up = F.interpolate(torch.from_numpy(s), size=self.x.shape[1:], mode="bilinear", align_corners=False)[0, 0]
        up = up.numpy()
        return (up - up.min()) / (up.max() - up.min())

    def scores(self, us):
        masked = np.stack([(self.black + self.saliency(u)[None] * (self.x - self.black)).astype(np.float32)
                           for u in us])
        return np.concatenate([self.session.run(None, {"input": masked[i:i + 32]})[0][:, self.target]
                               for i in range(0, len(masked), 32)]).astype(np.float64)

    def optimise(self, gradient, iterations, lr=0.1):
        u = np.full(self.acts.shape[0], 0.5)
        m, v = np.zeros_like(u), np.zeros_like(u)
        for t in range(1, iterations + 1):
            g = gradient(self, u, t, m)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            u = u + lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return u


def central_differences(ref, u, t, m, h=1e-2):
    eye = np.eye(len(u))
    values = ref.scores([*(u + h * eye), *(u - h * eye)])
    return (values[:len(u)] - values[len(u):]) / (2 * h)


@pytest.fixture(scope="module")
def shapes_runner():
    return runner_for(SHAPES_MODEL)


@pytest.fixture(scope="module")
def sample(shapes_runner):
    x = shapes_input(shapes.generate(1, seed=9_000_141, size=96).images[0])
    scores = shapes_runner.scores(x[None], Job(shapes_runner, x, np.array([0]), {}).passes)[0]
    return x, np.argsort(-scores)[:2]


@pytest.mark.parametrize("preprocessing, black", [(None, 0.0), (SHAPES_PREPROCESSING, -1.0)])
def test_gradient_graph_path_matches_reference_with_central_differences(shapes_runner, sample, preprocessing, black):
    """Without the model's preprocessing the input tensor is multiplied; with it, the pixels (towards black)."""
    x, targets = sample
    job, events = run_opticam(shapes_runner, x, targets, iterations=3, gradient="gradient_graph",
                              preprocessing=preprocessing)
    assert all(e.stage == "optimising (gradient graph)" for e in events if isinstance(e, Progress))
    # one forward for the activations, one for the image's scores (given by the server otherwise), one
    # forward+backward per step for both targets, one forward at the end
    assert job.passes.backward_samples == 3 * 2 and job.passes.runs == 1 + 1 + 3 + 1
    final = events[-1]
    layer = graph.default_layer(shapes_runner.model).name
    for t, c in enumerate(targets):
        ref = Reference(SHAPES_MODEL, x, layer, c, black=black)
        u = ref.optimise(central_differences, 3)
        # the objective has kinks (the model's ReLUs, the map's min and max), so central differences stay ~1e-3
        # off the exact derivative (whose components reach 0.2) at any step; through Adam's normalised steps
        # that leaves the maps up to ~3.5e-3 apart after three steps
        np.testing.assert_allclose(final.maps[t], ref.saliency(u), atol=4e-3)
        assert final.stats[t]["objective"] == pytest.approx(ref.scores([u])[0], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("seed, rank, directions", [(9_000_141, 91, 8), (9_000_147, 96, 8), (9_000_141, 91, 128)])
def test_finite_difference_path_matches_reference_with_the_same_directions(shapes_runner, seed, rank, directions):
    """On the first image the layer's 96 maps of 12 x 12 have rank 91, so the directions are drawn in the
    gradient's subspace (gradient_subspace, recomputed at every u); on the second they span all of R^96 and the
    directions range over all of u-space. With 128 directions (>= the rank) they are the subspace's basis itself:
    the full forward-difference gradient, nothing drawn."""
    x = shapes_input(shapes.generate(1, seed=seed, size=96).images[0])
    target = int(np.argmax(shapes_runner.scores(x[None], Job(shapes_runner, x, np.array([0]), {}).passes)[0]))
    _, events = run_opticam(shapes_runner, x, [target], iterations=10, gradient="finite_differences",
                            directions=directions, step=0.05, seed=5)
    layer = graph.default_layer(shapes_runner.model).name
    ref = Reference(SHAPES_MODEL, x, layer, target)
    rng = np.random.default_rng(5)

    span = activation_span(ref.acts.astype(np.float32).astype(np.float64).reshape(len(ref.acts), -1))
    assert (96 if span is None else span.shape[1]) == rank

    def same_directions(ref, u, t, m):
        basis = np.eye(len(u)) if span is None else gradient_subspace(span, u)
        count = min(directions, basis.shape[1])
        if count == basis.shape[1]:
            z, weight = np.eye(count)[None], np.ones((1, count))
        else:
            lead = basis.T @ m
            z, weight = directions_for(rng, 1, count, basis.shape[1], lead=lead[None] if t > 1 else None)
            if t > 1:   # the first direction is Adam's running mean itself (in the subspace), the others orthogonal
                assert abs(z[0, 0] @ lead) == pytest.approx(np.linalg.norm(lead), rel=1e-9)
        delta = z[0] @ basis.T
        np.testing.assert_allclose(delta @ delta.T, np.eye(count), atol=1e-12)
        values = ref.scores([u, *(u + 0.05 * delta)])
        return (weight[0] * (values[1:] - values[0]) / 0.05) @ delta

    u = ref.optimise(same_directions, 10)
    # forward differences of float32 scores: Adam's normalised steps amplify the rounding of tiny components
    np.testing.assert_allclose(events[-1].maps[0], ref.saliency(u), atol=1e-2)
    assert np.abs(ref.saliency(u) - ref.saliency(np.full_like(u, 0.5))).max() > 0.05   # it did move


def test_objective_increases_and_finite_differences_reach_the_gradient_gain(shapes_runner):
    """The method's defaults (50 steps; 128 directions, which on this layer is the full forward-difference
    gradient: its 96 maps have rank <= 96) on 4 held-out images of the shipped model, top class: the
    objective rises, and the finite-difference path's gain is >= 90% of the gradient path's on each image."""
    held_out = shapes.generate(4, seed=9_000_151, size=96)
    for image in held_out.images:
        x = shapes_input(image)
        target = int(np.argmax(shapes_runner.scores(x[None], Job(shapes_runner, x, np.array([0]), {}).passes)[0]))
        gains = {}
        for how in ("gradient_graph", "finite_differences"):
            _, events = run_opticam(shapes_runner, x, [target], partial_every=1, gradient=how)
            maps = [e for e in events if isinstance(e, Maps)]
            assert [m.step for m in maps] == [*range(1, 51), 50] and maps[-1].final
            objective = np.array([m.stats[0]["objective"] for m in maps])
            steps_up = (np.diff(objective) > 0).mean()
            assert steps_up >= 0.8, f"{how}: the objective rose on {steps_up:.0%} of the steps"
            assert objective[-1] > objective[0] + 0.5
            gains[how] = objective[-1] - objective[0]
            for m in maps:
                assert m.maps.shape == (1, 96, 96) and m.maps.min() >= 0 and m.maps.max() == pytest.approx(1)
        assert gains["finite_differences"] >= 0.9 * gains["gradient_graph"], gains


def test_finite_differences_for_several_targets_match_one_target_at_a_time(shapes_runner, sample):
    """Targets are rows of one batch (their directions concatenated, their values split back): with the full
    forward-difference gradient (the default directions) the maps and objectives of two targets run together
    match those of each target run alone (the same directions: the subspace's basis), up to rounding."""
    x, targets = sample
    together = run_opticam(shapes_runner, x, targets, iterations=5, gradient="finite_differences")[1][-1]
    for t, target in enumerate(targets):
        alone = run_opticam(shapes_runner, x, [target], iterations=5, gradient="finite_differences")[1][-1]
        np.testing.assert_allclose(together.maps[t], alone.maps[0], atol=1e-2)
        assert together.stats[t]["objective"] == pytest.approx(alone.stats[0]["objective"], rel=5e-3)


@pytest.mark.parametrize("gradient", ["gradient_graph", "finite_differences"])
def test_a_model_with_a_fixed_batch_of_one_runs_one_target_per_call(shapes_runner, sample, gradient):
    """A model whose batch dimension is fixed to 1 is served with max_batch 1: the targets' rows (and the
    finite differences' directions) go one per run, with the same maps as the dynamic-batch model's batches."""
    x, targets = sample
    model = onnx.load(str(SHAPES_MODEL))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    model = graph.load_model(model.SerializeToString())
    fixed = Runner(model, graph.score_tensor(model), "input", max_batch=1, providers=["CPUExecutionProvider"])
    job, events = run_opticam(fixed, x, targets, iterations=3, gradient=gradient, directions=8)
    want = run_opticam(shapes_runner, x, targets, iterations=3, gradient=gradient, directions=8)[1][-1]
    # batch-size-dependent rounding (~3e-7 of a score), through three of Adam's normalised steps. Finite
    # differences also divide it by the step (~3e-5 of a derivative), and Adam's first step is the sign of each
    # component, so a component that close to zero moves u_k by +-lr either way: on 4 images x 8 and 128
    # directions the maps differed by up to 2.8e-3 (the same before and after the 2026-11-24 mask graph)
    np.testing.assert_allclose(events[-1].maps, want.maps, atol=5e-5 if gradient == "gradient_graph" else 1e-2)
    assert job.passes.runs >= 3 * len(targets)


def test_auto_falls_back_to_finite_differences_when_the_engine_cannot_differentiate(sample, tmp_path):
    x, targets = sample
    model = onnx.load(str(SHAPES_MODEL))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "before"
    # a one-tensor sequence and its element: the identity, and kernels.autodiff has no rule for sequence operators
    model.graph.node.extend([onnx.helper.make_node("SequenceConstruct", ["before"], ["sequence"]),
                             onnx.helper.make_node("SequenceAt", ["sequence", "zero"], ["logits"])])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"))
    runner = runner_for(model)
    _, events = run_opticam(runner, x, targets[:1], iterations=2, directions=4)
    assert {e.stage for e in events if isinstance(e, Progress)} == {"optimising (finite differences)"}
    with pytest.raises(Exception, match="opticam.gradient"):
        run_opticam(runner, x, targets[:1], iterations=2, gradient="gradient_graph")


def test_opticam_through_the_server_with_several_targets(client):
    image = png_bytes(shapes.generate(1, seed=9_000_142, size=96).images[0])
    events = list(client.explain("shapes", [image], [("opticam", dict(iterations=8))], top_k=3, partial_maps=True))
    maps = [e for e in events if isinstance(e, MapResult)]
    final = [m for m in maps if m.final]
    assert len(final) == 3 and len({m.class_id for m in final}) == 3
    assert {m.step for m in maps if not m.final} == {4, 8}
    for m in final:
        assert m.map.shape == (96, 96) and 0 <= m.map.min() and m.map.max() <= 1 + 1e-6 and m.layer
        assert set(m.stats) == {"objective", "score"}
    assert not np.allclose(final[0].map, final[1].map)


def test_opticam_points_at_the_object_on_held_out_shapes(client):
    """At the method's defaults (the paper's 50 Adam steps, loss "max"), through the server."""
    held_out = shapes.generate(40, seed=9_000_013, size=128)
    hits, on_mask = pointing_game(client, held_out, "opticam")
    assert hits / 40 >= 0.9, f"Opti-CAM maximum in the object's box on {hits}/40 ({on_mask}/40 on its pixels)"


def efficientnet_input(path):
    """The model's declared preprocessing (centre crop, 224, (v - 127.5) / 128), written out."""
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    img = img.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return ((np.asarray(img, np.float32) - 127.5) / 128.0).transpose(2, 0, 1).copy()


@needs_shared
def test_opticam_average_drop_is_lower_than_gradcam_and_scorecam_on_efficientnet():
    runner = runner_for(EFFICIENTNET)
    layer = graph.default_layer(runner.model)
    drops = {"opticam": [], "gradcam": [], "scorecam": []}
    pre = Preprocessing(224, 224, scale=1.0, mean=(127.5,) * 3, std=(128.0,) * 3)
    black = -127.5 / 128.0
    for path in SHARED_IMAGES:
        x = efficientnet_input(path)
        job = Job(runner, x, np.array([0]), {})
        logits = job.sample_scores()
        c = int(np.argmax(logits))
        y = softmax(logits)[c]
        for name in drops:
            method = METHODS[name]
            job = Job(runner, x, np.array([c]), method.resolve({}, (224, 224)), layer=layer, scores=logits,
                      preprocessing=pre)
            saliency = upsample_bilinear([e for e in method.run(job) if isinstance(e, Maps)][-1].maps, 224, 224)[0]
            saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min())
            # the paper's masked image: the pixels times the map (black where it is 0)
            o = softmax(runner.scores((black + saliency * (x - black))[None], job.passes)[0])[c]
            drops[name].append(max(0.0, y - o) / y)
    average = {name: float(np.mean(d)) for name, d in drops.items()}
    assert average["opticam"] < average["gradcam"] and average["opticam"] < average["scorecam"], average


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_the_gradient_lies_in_the_finite_difference_subspace_numpy():
    """F(u) = v . minmax(up(A^T softmax(u))) with A [30, 3 x 3] and a fixed v, written out in numpy: its central-
    difference gradient lies in gradient_subspace's span (rank <= 9 of 30); a random vector does not."""
    rng = np.random.default_rng(4)
    acts = np.maximum(rng.standard_normal((30, 3, 3)), 0)
    v = rng.standard_normal((12, 12))
    resize = linear_weights(3, 12).astype(np.float64)

    def objective(u):
        w = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        up = resize @ np.einsum("k,khw->hw", w, acts) @ resize.T                 # bilinear, in float64
        return float((v * (up - up.min()) / (up.max() - up.min())).sum())

    u = rng.standard_normal(30)
    eye = np.eye(30) * 1e-4
    gradient = np.array([(objective(u + e) - objective(u - e)) / 2e-4 for e in eye])
    basis = gradient_subspace(activation_span(acts.reshape(30, -1)), u)
    assert basis.shape == (30, 9)
    np.testing.assert_allclose(basis.T @ basis, np.eye(9), atol=1e-12)
    assert np.linalg.norm(gradient - basis @ (basis.T @ gradient)) <= 1e-3 * np.linalg.norm(gradient)
    other = rng.standard_normal(30)
    assert np.linalg.norm(other - basis @ (basis.T @ other)) > 0.3 * np.linalg.norm(other)


@pytest.mark.parametrize("spread", [1.0, 9.0, 20.0, 40.0])
def test_the_subspace_basis_is_orthonormal_however_far_apart_the_weights_are(spread):
    """One Cholesky QR pass while max(w) / min(w) <= 1e4 (u spread 1 or 9: e^9 = 8e3), two beyond it (spread 20:
    4.9e8, where one pass was 1e-5 from orthonormal), numpy's QR when the Gram matrix is too ill-conditioned for
    Cholesky (spread 40: 2e17): the basis is orthonormal to the documented 2e-8 and spans diag(w) span."""
    rng = np.random.default_rng(5)
    span = activation_span(np.maximum(rng.standard_normal((40, 25)), 0))
    u = rng.uniform(0, spread, 40)
    u[:2] = 0, spread
    basis = gradient_subspace(span, u)
    assert basis.shape == (40, 25)
    np.testing.assert_allclose(basis.T @ basis, np.eye(25), atol=2e-8)
    target = softmax(u)[:, None] * span
    scale = np.linalg.norm(target, axis=0)
    np.testing.assert_allclose(basis @ (basis.T @ target) / scale, target / scale, atol=1e-8)


@needs_shared
def test_the_gradient_lies_in_the_finite_difference_subspace_on_efficientnet():
    """The gradient graph's dF/du (kernels.autodiff) on EfficientNet-Lite0's last layer (1280 maps of 7 x 7), at
    a random u, the pixels masked towards black: inside gradient_subspace's span, of rank <= 49."""
    runner = runner_for(EFFICIENTNET)
    x = efficientnet_input(SHARED_IMAGES[0])
    layer = graph.default_layer(runner.model)
    passes = Job(runner, x, np.array([0]), {}).passes
    acts = np.maximum(runner.forward(x[None], (layer.name,), passes)[layer.name], 0).astype(np.float32)
    seed = np.zeros((1, runner.num_classes), np.float32)
    seed[0, np.argmax(runner.scores(x[None], passes)[0])] = 1
    session, why = gradient_session(runner, "NCHW", x.shape[1:], x.shape[0], acts.shape[1:])
    assert session is not None, why
    u = 0.5 + np.random.default_rng(8).standard_normal(1280)                    # unequal weights
    gradient = session.run([f"{U}__grad"], {f"{PREFIX}x": x[None], ACTS: acts, U: u[None].astype(np.float32),
                                              BASE: np.full_like(x, -127.5 / 128)[None], SEED: seed})[0][0]
    basis = gradient_subspace(activation_span(acts[0].reshape(1280, -1).astype(np.float64)), u)
    assert basis.shape[1] <= 49
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-9)
    gradient = gradient.astype(np.float64)
    assert np.linalg.norm(gradient - basis @ (basis.T @ gradient)) <= 1e-4 * np.linalg.norm(gradient)


@pytest.mark.parametrize("lead", [False, True])
def test_direction_estimates_are_unbiased(lead):
    """E[sum_d w_d (g . delta_d) delta_d] = g, with and without a lead direction (Monte Carlo, 20000 draws)."""
    rng = np.random.default_rng(3)
    size, count, draws = 12, 4, 20000
    g = rng.standard_normal(size)
    m = (g + rng.standard_normal(size))[None] if lead else None     # a lead correlated with g, as Adam's mean is
    total = np.zeros(size)
    for _ in range(draws):
        delta, weight = directions_for(rng, 1, count, size, lead=m)
        total += (weight[0] * (delta[0] @ g)) @ delta[0]
    np.testing.assert_allclose(total / draws, g, atol=0.06 * np.linalg.norm(g))
    if lead:   # the lead's component is exact, so the estimate varies less than without it
        spread = [np.linalg.norm((w[0] * (d[0] @ g)) @ d[0] - g)
                  for d, w in (directions_for(rng, 1, count, size, lead=m) for _ in range(500))]
        plain = [np.linalg.norm((w[0] * (d[0] @ g)) @ d[0] - g)
                 for d, w in (directions_for(rng, 1, count, size) for _ in range(500))]
        assert np.mean(spread) < np.mean(plain)
