"""Opti-CAM (Zhang, Rauf, Bardou, Chollet & Dhariwal, "Opti-CAM: Optimizing saliency maps for
interpretability", CVIU 2024).

The map is a convex combination of the layer's (ReLU'd) activation maps, chosen by optimisation:

    S(u) = n(up(sum_k softmax(u)_k A_k))      n: min-max normalisation over the map, up: bilinear, half-pixel
    maximise  F(u) = S_c(x ⊙ S(u))            ("max"; the official code's default loss `plain`)
    or minimise |S_c(x) - S_c(x ⊙ S(u))|      ("diff"; the official code's loss `norm`)

where x ⊙ S multiplies the image's *pixels* by S, as the official code does (its images are in [0, 1] and the
mean/std normalisation is the first layer of its model): with the model's preprocessing known, the masked
input is b + S (x - b), b the preprocessed black image (kernels.images.black_sample), the masking that
kernels.metrics uses for average drop/gain too. Without it (kernels used directly, no preprocessing given)
the input tensor itself is multiplied, x S.

with Adam (lr 0.1, 50 steps, u initialised to 0.5 for every channel, i.e. uniform weights), as the authors'
code (hanwei0912/OptiCAM: generate_opticam.py's defaults, util.py's Basic_OptCAM). S is the model's score
tensor (logits). The returned map is S(u) after the last step, at the input's resolution, in [0, 1]. The
official code also stops early when its loss (summed over its batch of images) rose between two checkpoints
max_iter // 10 steps apart (5 at its default 50); we always run the requested steps (on 40 held-out images of
the shipped shapes model, one image at a time, that rule would have stopped 3 runs of 40, at steps 36, 46 and
46) and stream the map and its objective as it goes (Maps.stats = [{"objective", "score"}] per target;
"objective" is the maximised quantity: S_c(x ⊙ S) for "max", -|S_c(x) - S_c(x ⊙ S)| for "diff").

Everything per pixel — the weighted sum, upsampling (two MatMuls), normalisation (on the coarse map, its extremes
read from the few upsampled pixels that can hold them: kernels.methods.perturb's normalised_upsample), masking — is
a graph composed in front of the model, with all targets as rows of one batch. dF/du comes one of two ways:

* `gradient_graph`: that composed graph (u -> mask -> model -> score) differentiated by kernels.autodiff, so one
  forward+backward per step for all targets;
* `finite_differences`, for models the engine cannot differentiate: a zeroth-order estimate on D unit
  directions delta_d, g = sum_d w_d (F(u + h delta_d) - F(u)) / h delta_d, the D perturbed inputs per target
  batched with the centre point (D + 1 forwards per target and step). The directions lie in the subspace that
  holds dF/du (gradient_subspace: rank r <= min(K, h*w), from the layer's maps and u alone), so no forward is
  spent where the gradient is known to be zero. From the second step the first direction is Adam's
  running mean of the gradient within it (w = 1: the gradient's component along it, exactly) and the others
  are random orthonormal directions orthogonal to it (w = (r - 1) / (D - 1)); at the first step all D are
  random orthonormal (w = r / D). The estimate is unbiased either way; the lead direction makes it precise
  where the optimiser is heading. Forward differences share the centre, so a budget buys twice the directions
  of SPSA's central ones; D >= r gives the full forward-difference gradient (D is capped at r; the directions
  are then the subspace's own basis, nothing is drawn: rotating a full basis at random would only move the
  differences' O(h) error around, at the cost of a QR per step). The default, D = 128, is that full gradient
  wherever r <= 128: every layer of 11 x 11 cells or fewer (a 7 x 7 ImageNet CNN layer: r <= 49) and the
  shipped shapes model's (r <= 96); fewer directions trade the map's quality for time. Measured (pixels
  masked towards black, share of the gradient path's objective gain): on the shapes model (96 maps of 12 x 12,
  of rank 77-96 on 19 images checked; 50 steps, 6 images) D = 16 reaches 63-91% (mean 79%), D = 32 67-96%
  (mean 87%), D = 64 69-110% (mean 94%), D = 96 (the full gradient) 99-104%; on EfficientNet-Lite0's last layer
  (1280 maps of 7 x 7, r = 49; 20 steps, the 4 shared photos) D = 16 74-82% (mean 78%; 30-49%, mean 42%, with
  directions over all of u-space) and D >= 49 98-100%. The subspace costs one SVD per image and ~0.7 ms per step
  there (0.9 ms once max(w) / min(w) > 1e4 takes the second Cholesky pass).

`auto` uses the gradient graph when the engine can build it, else finite differences.

Localisation: the "max" objective rewards whatever raises the score of the masked image, background included,
so the map follows what the model uses. On 40 held-out images of the shipped shapes model the map's maximum
falls in the object's box on 40/40 at steps 5, 10 and 20 and on 38/40 after the default 50 (loss "diff": 39/40;
tests/methods/test_opticam.py asserts >= 36 through the server). The shapes model shipped before 2026-11-24,
which scored many objects higher against their own background than against black, gave 36, 35, 25 and 23:
there the map spread over the background as the steps went on.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy.linalg import solve_triangular

from ..compose import PREFIX
from ..images import black_sample
from .base import Event, Job, Maps, Method, Param, ParamError, Progress
from .cam import layer_activation
from .layers import one_hot
from .perturb import Builder, batches, channels_of, compose_front, sample_info, value_info

U, ACTS, MASK, SEED, BASE = f"{PREFIX}u", f"{PREFIX}acts", f"{PREFIX}mask", f"{PREFIX}seed", f"{PREFIX}base"


def saliency_graph(runner, layout: str, spatial: tuple[int, int], channels: int, grid: tuple[int, ...]):
    """(x, base b, u [B, K], activation maps [1, K, h, w]) -> scores of b + S(u) (x - b) [B, classes] and S(u)
    [B, 1, H, W]."""
    count, h, w = grid
    b = Builder(runner.model)
    maps = b.op("Reshape", ACTS, b.const([count, h * w], np.int64))                  # [K, h*w]
    combined = b.op("MatMul", b.op("Softmax", U, axis=1), maps)                       # [B, h*w]
    combined = b.op("Reshape", combined, b.const([-1, 1, h, w], np.int64))           # [B, 1, h, w]
    mask = b.normalised_upsample(combined, (h, w), *spatial, out=MASK)
    masked = b.masked_input(f"{PREFIX}x", mask, layout, base=BASE)
    inputs = [sample_info(layout, spatial, channels), sample_info(layout, spatial, channels, BASE),
              value_info(U, ["B", count]), value_info(ACTS, [1, count, h, w])]
    return compose_front(runner.model, runner.input_name, b, inputs, masked, [runner.score_name, MASK])


def gradient_session(runner, layout, spatial, channels, grid):
    """The differentiated graph's session (any number of targets), or the reason the engine could not build it."""
    from .. import autodiff

    def build():
        try:
            composed = saliency_graph(runner, layout, spatial, channels, grid)
            model = autodiff.differentiate(composed, runner.score_name, [U], seed_name=SEED)
            return runner.graph(f"opticam/gradient/{layout}/{spatial}/{channels}/{grid}", lambda: model), None
        except Exception as exc:  # noqa: BLE001 - any failure to build or load it means: use finite differences
            return None, f"{type(exc).__name__}: {exc}"
    return runner.cached(f"opticam/gradient-or-why/{layout}/{spatial}/{channels}/{grid}", build)


def directions_for(rng: np.random.Generator, rows: int, count: int, size: int,
                   lead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[rows, count, size] unit directions and [rows, count] weights w with E[sum_d w_d (g . delta_d) delta_d] =
    g for any g. Without `lead`: orthonormal in blocks of `size` (random rotations of the axes), w = size /
    count, so count = size gives the full forward-difference gradient and count < size its projection on a
    random subspace, scaled. With `lead` ([rows, size], e.g. Adam's running mean of the gradient) and 1 < count
    < size: the first direction is lead itself (w = 1: the gradient's component along it, exactly) and the
    others are random orthonormal directions orthogonal to it (w = (size - 1) / (count - 1)); the estimate stays
    unbiased and is most precise where the optimiser is heading."""
    if lead is not None and 1 < count < size and np.all(np.linalg.norm(lead, axis=1) > 0):
        basis = np.concatenate([lead[:, :, None], rng.standard_normal((rows, size, count - 1))], axis=2)
        q = np.linalg.qr(basis)[0].transpose(0, 2, 1)                       # [rows, count, size]
        weights = np.full((rows, count), (size - 1) / (count - 1))
        weights[:, 0] = 1.0
        return q, weights
    blocks = -(-count // size)
    gaussian = rng.standard_normal((rows, blocks, size, min(count, size)))
    q = np.linalg.qr(gaussian)[0]                                      # [rows, blocks, size, min(count, size)]
    return q.transpose(0, 1, 3, 2).reshape(rows, -1, size)[:, :count], np.full((rows, count), size / count)


def activation_span(acts: np.ndarray, tolerance: float = 1e-6) -> np.ndarray | None:
    """An orthonormal basis [K, r] of the range of the layer's maps acts [K, h*w] (r their rank, at most h*w), or
    None when that is all of R^K. Computed once per image (gradient_subspace uses it at every step)."""
    left, sv, _ = np.linalg.svd(acts, full_matrices=False)
    rank = int((sv > tolerance * sv[0]).sum()) if len(sv) and sv[0] > 0 else 0
    if rank == acts.shape[0]:
        return None
    return left[:, :rank] * np.sign(left[np.abs(left[:, :rank]).argmax(axis=0), np.arange(rank)])   # signs fixed


def gradient_subspace(span: np.ndarray, u: np.ndarray) -> np.ndarray:
    """An orthonormal basis [K, r] of diag(w) span (w = softmax(u), span from activation_span), the subspace of
    u-space that holds dF/du at u.

    F depends on u only through the coarse map c = A^T w, and the (linear) upsampling and the min-max
    normalisation that follow are blind to c's scale, so c . dF/dc = 0 (Euler) and dF/du = (diag(w) - w w^T) A
    dF/dc = diag(w) A dF/dc: it lies in diag(w) range(A), of rank at most min(K, h*w), e.g. 49 for a 7 x 7 layer
    of 1280 channels (EfficientNet-Lite0's last), where random directions over all of u-space would spend most
    of the forwards on directions with no gradient. Orthonormalised by Cholesky QR (numpy's QR of the same
    matrix took 5-10x as long), with numpy's QR as the fallback. span's columns are orthonormal, so the
    matrix's condition number is at most max(w) / min(w), and one pass leaves Q^T Q within ~cond^2 * 2.2e-16 of
    the identity: once while that bound is <= 1e4 (2e-8; Opti-CAM's 50 default steps of lr 0.1 move each u_k by
    at most 5, a ratio of at most e^10 = 2.2e4), twice beyond it (CholeskyQR2: exact to rounding up to ~1e8)."""
    w = np.exp(u - u.max())
    w = w / w.sum()
    basis = w[:, None] * span
    try:
        for _ in range(1 if w.max() <= 1e4 * w.min() else 2):
            basis = solve_triangular(np.linalg.cholesky(basis.T @ basis), basis.T, lower=True, check_finite=False).T
    except np.linalg.LinAlgError:
        basis = np.linalg.qr(w[:, None] * span)[0]
    return basis


def unit(mask: np.ndarray) -> np.ndarray:
    """The map as returned: the graph's normalised upsampling is in [0, 1] up to float32 rounding (~1e-7)."""
    return np.clip(mask, 0, 1).astype(np.float32)


class Adam:
    """torch.optim.Adam's update (bias-corrected, no weight decay), ascending."""

    def __init__(self, shape, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

    def ascend(self, u: np.ndarray, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        return u + self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def run(job: Job) -> Iterator[Event]:
    p = job.params
    runner, targets = job.runner, job.targets
    count_t = len(targets)
    acts = np.maximum(layer_activation(job), 0).astype(np.float32)       # [1, K, h, w]
    grid = acts.shape[1:]
    channels = channels_of(job.sample, job.layout)
    reference = job.sample_scores()[targets].astype(np.float64)
    base = (black_sample(job.preprocessing) if job.preprocessing is not None else np.zeros_like(job.sample))[None]
    feeds = {f"{PREFIX}x": runner.resident(job.sample[None]), ACTS: runner.resident(acts), BASE: runner.resident(base)}

    session, why = (None, "not asked for")
    if p["gradient"] in ("auto", "gradient_graph"):
        session, why = gradient_session(runner, job.layout, job.spatial, channels, grid)
        if session is None and p["gradient"] == "gradient_graph":
            raise ParamError(f"opticam.gradient: the model cannot be differentiated ({why}); use "
                             "'finite_differences' or 'auto'")
    forward = runner.graph(f"opticam/forward/{job.layout}/{job.spatial}/{channels}/{grid}", lambda: saliency_graph(
        runner, job.layout, job.spatial, channels, grid))
    stage = "optimising (gradient graph)" if session is not None else "optimising (finite differences)"
    # the finite differences' subspace: [K, r] or None (all of R^K); the gradient graph needs no SVD
    span = activation_span(acts[0].reshape(grid[0], -1).astype(np.float64)) if session is None else None

    def objective(scores: np.ndarray) -> np.ndarray:
        return scores if p["loss"] == "max" else -np.abs(reference - scores)

    def run_rows(session, names: list[str], u_rows: np.ndarray, seeds: np.ndarray | None = None) -> list[np.ndarray]:
        """`names` for many rows of u, in batches of max_batch (one row per run for a model whose batch is fixed
        to 1); with `seeds`, forward+backward."""
        chunks = []
        for start, stop in batches(len(u_rows), runner.max_batch):
            rows = {**feeds, U: u_rows[start:stop].astype(np.float32)}
            if seeds is not None:
                rows[SEED] = seeds[start:stop]
            chunks.append(runner.run(session, names, rows, job.passes, samples=stop - start,
                                     backward=seeds is not None))
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def evaluate(u_rows: np.ndarray, rows_target: np.ndarray) -> np.ndarray:
        """Target scores of x ⊙ S(u) for many rows of u (forward only)."""
        scores = run_rows(forward, [runner.score_name], u_rows)[0]
        return scores[np.arange(len(u_rows)), rows_target]

    def at(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps at u (one forward per target)."""
        scores, mask = run_rows(forward, [runner.score_name, MASK], u)
        return scores[np.arange(count_t), targets].astype(np.float64), mask[:, 0]

    u = np.full((count_t, acts.shape[1]), 0.5)
    adam = Adam(u.shape, p["learning_rate"])
    rng = np.random.default_rng(p["seed"])
    directions, step = p["directions"], p["step"]
    for it in range(1, p["iterations"] + 1):
        partial = bool(job.partial_every) and it % job.partial_every == 0
        mask = None
        if session is not None:       # the map itself is fetched only when it is streamed
            out = run_rows(session, [runner.score_name, f"{U}__grad", *([MASK] if partial else [])], u,
                           one_hot(targets, runner.num_classes))
            score = out[0][np.arange(count_t), targets].astype(np.float64)
            grad = out[1].astype(np.float64)
            if p["loss"] == "diff":      # d(-|r - s|)/du = sign(r - s) ds/du
                grad = np.sign(reference - score)[:, None] * grad
            mask = out[2][:, 0] if partial else None
        else:
            deltas, weights = [], []
            for t in range(count_t):       # D directions in the gradient's subspace (all of it when D >= its rank)
                basis = gradient_subspace(span, u[t]) if span is not None else None
                size = u.shape[1] if basis is None else basis.shape[1]
                count = min(directions, size)
                if count == 0:        # all-zero maps: no direction moves F
                    deltas.append(np.zeros((0, u.shape[1])))
                    weights.append(np.zeros(0))
                    continue
                if count == size:     # the full gradient: any orthonormal basis of the subspace gives it
                    deltas.append(np.eye(size) if basis is None else basis.T)
                    weights.append(np.ones(size))
                    continue
                lead = adam.m[t] if basis is None else basis.T @ adam.m[t]
                z, weight = directions_for(rng, 1, count, size, lead=lead[None] if it > 1 else None)
                deltas.append(z[0] if basis is None else z[0] @ basis.T)
                weights.append(weight[0])
            counts = [len(d) for d in deltas]
            rows = np.concatenate([u, *[u[t] + step * d for t, d in enumerate(deltas)]]).astype(np.float32)
            values = evaluate(rows, np.concatenate([targets, np.repeat(targets, counts)]))
            score = values[:count_t]
            moved = np.split(values[count_t:], np.cumsum(counts)[:-1])
            grad = np.stack([(w * (objective(m) - objective(v)) / step) @ d
                             for w, m, v, d in zip(weights, moved, score, deltas)])
        stats = [{"objective": float(v), "score": float(s)} for v, s in zip(objective(score), score)]
        yield Progress(it, p["iterations"], stage)
        if partial:
            if mask is None:
                mask = at(u)[1]
            yield Maps(unit(mask), final=False, stats=stats, step=it)
        u = adam.ascend(u, grad)
    score, mask = at(u)
    stats = [{"objective": float(v), "score": float(s)} for v, s in zip(objective(score), score)]
    yield Maps(unit(mask), final=True, stats=stats, step=p["iterations"])


METHOD = Method(
    name="opticam",
    family="cam",
    description="The convex combination of the layer's maps, upsampled and min-max normalised, that maximises "
                "the target's score on the image multiplied by it (optimised by Adam); in [0, 1].",
    reference="Zhang et al., Opti-CAM: Optimizing saliency maps for interpretability, CVIU 2024",
    params=(
        Param("iterations", "int", 50, "Adam steps", 1, 1000),
        Param("learning_rate", "float", 0.1, "Adam's learning rate", 0.0001, 10),
        Param("loss", "enum", "max", "'max': maximise S_c(x * S); 'diff': minimise |S_c(x) - S_c(x * S)|",
              choices=("max", "diff")),
        Param("gradient", "enum", "auto", "how dS/du is obtained: 'auto' (gradient graph when the model can be "
              "differentiated), 'gradient_graph' or 'finite_differences'",
              choices=("auto", "gradient_graph", "finite_differences")),
        Param("directions", "int", 128, "finite_differences: directions per step (batched), at most the rank of "
              "the subspace that holds the gradient: the default gives the full forward-difference gradient "
              "wherever that rank is <= 128", 1, 512),
        Param("step", "float", 0.01, "finite_differences: step along each direction, in units of u", 1e-5, 1),
        Param("seed", "int", 0, "seed of the finite-difference directions (numpy's default_rng)", 0, 2**31 - 1),
    ),
    run=run,
    uses_layer=True,
)
