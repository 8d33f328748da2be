"""SmoothGrad and integrated gradients sum their gradients as the batches arrive: the same attribution
however the samples are chunked into batches, and memory that holds a batch, not every sample's gradient."""

from __future__ import annotations

import tracemalloc

import numpy as np

from onnxplain.default_model import shapes
from onnxplain.kernels import graph
from onnxplain.kernels.images import Preprocessing
from onnxplain.kernels.methods import METHODS, Job, Maps
from onnxplain.kernels.methods.gradients import smoothgrad_noise
from onnxplain.kernels.runtime import Runner

from support import ROOT, shapes_input

MODEL = graph.load_model(ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx")
PRE = Preprocessing(96, 96, fit="stretch", mean=(0.5,) * 3, std=(0.5,) * 3)
TARGETS = np.array([0, 3, 5])


def attribution(runner, method, params, targets=TARGETS):
    x = shapes_input(shapes.generate(1, seed=9_000_321, size=96).images[0])
    job = Job(runner, x, targets, METHODS[method].resolve(params, x.shape[1:]), "NCHW", preprocessing=PRE)
    events = list(METHODS[method].run(job))
    final = [e for e in events if isinstance(e, Maps) and e.final]
    return final[-1], job, events


def runner(max_batch):
    return Runner(MODEL, graph.score_tensor(MODEL), "input", max_batch=max_batch, providers=["CPUExecutionProvider"])


def test_noise_draws_are_the_same_however_chunked():
    sample = np.random.default_rng(1).standard_normal((3, 9, 9)).astype(np.float32)
    whole = np.concatenate(list(smoothgrad_noise(sample, 10, 0.2, 7)))
    chunked = np.concatenate(list(smoothgrad_noise(sample, 10, 0.2, 7, chunk=3)))
    assert whole.shape == (10, 3, 9, 9) and np.array_equal(whole, chunked)
    assert abs(whole.std() / (0.2 * (sample.max() - sample.min())) - 1) < 0.05


def test_noise_draws_are_normal_and_independent():
    """The Box-Muller draws against N(0, sigma^2): Kolmogorov-Smirnov, the moments, and no correlation between
    the two values of a pair or between neighbouring samples (fixed seed: the statistics are deterministic)."""
    from scipy import stats

    sample = np.array([0.0, 2.0, 1.0], np.float32).reshape(1, 1, 3)      # odd size: the last value of a pair dropped
    draws = np.concatenate(list(smoothgrad_noise(sample, 200_000, 0.5, 3, chunk=7_777)))[:, 0, 0]   # sigma = 1
    flat = draws.ravel().astype(np.float64)
    assert stats.kstest(flat, "norm").pvalue > 0.01
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert abs(stats.skew(flat)) < 0.02 and abs(stats.kurtosis(flat)) < 0.05
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.01     # the cos and sin of one pair
    assert abs(np.corrcoef(draws[:-1, 2], draws[1:, 0])[0, 1]) < 0.01   # across samples
    assert np.abs(flat).max() < 6.0                                        # the tails end at 5.8 sigma


def test_smoothgrad_and_integrated_gradients_do_not_depend_on_the_batch_size():
    """Batches of 32 rows (3 targets: one sample's forward shared by its 3 backward rows per run) against batches
    of 2 rows (two targets of a sample per run, then two samples of the third target); the progress events count
    rows in both."""
    for method, params in [("smoothgrad", {"samples": 13, "variant": "variance", "seed": 4}),
                           ("smoothgrad", {"samples": 13, "variant": "plain", "seed": 4}),
                           ("integrated_gradients", {"steps": 17, "method": "riemann_trapezoid"})]:
        big, big_job, big_events = attribution(runner(32), method, params)
        small, small_job, small_events = attribution(runner(2), method, params)
        rows = params.get("samples", params.get("steps")) * len(TARGETS)
        assert big_job.passes.backward_samples == small_job.passes.backward_samples == rows
        assert big_job.passes.runs < small_job.passes.runs
        for events in (big_events, small_events):
            done = [e.done for e in events if not isinstance(e, Maps)]
            assert done == sorted(done) and done[-1] == rows
        assert np.abs(big.attribution).max() > 0
        np.testing.assert_allclose(small.attribution, big.attribution, rtol=1e-5,
                                   atol=1e-6 * np.abs(big.attribution).max())
        if method == "integrated_gradients":
            assert np.allclose([s["completeness_gap"] for s in small.stats],
                               [s["completeness_gap"] for s in big.stats], atol=1e-4)


def test_three_targets_share_each_samples_forward(monkeypatch):
    """From SHARED_FROM (3) targets on, SmoothGrad and integrated gradients run each noisy copy or path point
    forward once for all the targets: one run per sample with a backward row per target. Their attribution is
    what the copies repeated per target give (the path below SHARED_FROM targets, or where the graph cannot share
    its forward), and each target's equals that target explained alone."""
    from onnxplain.kernels.methods import gradients

    assert gradients.SHARED_FROM == len(TARGETS)
    for method, params in [("smoothgrad", {"samples": 7, "variant": "variance", "seed": 4}),
                           ("integrated_gradients", {"steps": 9, "method": "gausslegendre"})]:
        samples = params.get("samples", params.get("steps"))
        final_scores = int(method == "integrated_gradients")     # its completeness check: one forward run
        shared, job, _ = attribution(runner(32), method, params)
        assert (job.passes.runs, job.passes.backward_samples) == (samples + final_scores, samples * len(TARGETS))
        with monkeypatch.context() as patch:
            patch.setattr(Runner, "shared_session", lambda self, *args, **kwargs: None)
            copies, copies_job, _ = attribution(runner(32), method, params)
        assert (copies_job.passes.runs, copies_job.passes.backward_samples) == (1 + final_scores,
                                                                                samples * len(TARGETS))
        scale = np.abs(copies.attribution).max()
        assert scale > 0
        np.testing.assert_allclose(shared.attribution, copies.attribution, rtol=1e-5, atol=1e-6 * scale)
        for i, target in enumerate(TARGETS):
            alone, _, _ = attribution(runner(32), method, params, targets=np.array([target]))
            np.testing.assert_allclose(shared.attribution[i], alone.attribution[0], rtol=1e-5, atol=1e-6 * scale)


def test_shared_and_repeated_sums_keep_their_own_graphs():
    """One runner explains three targets (each sample's forward shared), then two (the sample repeated per
    target), then three again: each call runs its own graph (a batch of rows in the second, one sample in the
    others) and gives what each target explained alone gives."""
    run = runner(32)
    params = {"samples": 5, "variant": "squared", "seed": 2}
    alone = {int(t): attribution(runner(32), "smoothgrad", params, targets=np.array([t]))[0].attribution[0]
             for t in TARGETS}
    for targets in (TARGETS, TARGETS[:2], TARGETS):
        result, job, _ = attribution(run, "smoothgrad", params, targets=targets)
        assert job.passes.runs == (5 if len(targets) == 3 else 1)
        for row, target in zip(result.attribution, targets):
            scale = np.abs(alone[int(target)]).max()
            np.testing.assert_allclose(row, alone[int(target)], rtol=1e-5, atol=1e-6 * scale)


def test_integrated_gradients_memory_holds_a_batch_not_the_path():
    """1000 path points x 4 targets of a 96 x 96 image: every gradient at once is 4000 x 110 KB = 442 MB (and as
    much again for the inputs); summed as they arrive, numpy's peak stays near a few batches."""
    run = runner(32)
    attribution(run, "integrated_gradients", {"steps": 2})           # sessions built outside the measurement
    tracemalloc.start()
    try:
        result, job, _ = attribution(run, "integrated_gradients", {"steps": 1000}, targets=np.array([0, 2, 4, 6]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert job.passes.backward_samples == 4000 and result.attribution.shape == (4, 3, 96, 96)
    assert peak < 40e6, f"numpy peak {peak / 1e6:.0f} MB"
