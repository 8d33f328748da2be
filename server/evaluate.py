"""The Evaluate RPC: faithfulness metrics (kernels/metrics.py) of maps the server computes in the same call
(request.methods, run exactly as Explain runs them) or that the client sends (request.maps).

Everything is validated before any work (the same checks as Explain for the model, images, targets and
methods, plus the maps, metrics, options and boxes), the call is admitted under the same limits, decodes its
images in its compute slot (boxes given in original-image pixels are checked then), and the metrics of all the
maps of one image run together, batched, on the model's runner.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import grpc
import numpy as np

from onnxplain import tensors
from onnxplain.kernels import metrics as km
from onnxplain.kernels.images import upsample_bilinear
from onnxplain.kernels.methods import Job, Maps
from onnxplain.v1 import methods_pb2, service_pb2

from . import validation
from .admission import Gone
from .validation import RequestError, invalid

METRIC_NAMES = {
    methods_pb2.AVERAGE_DROP: km.AVERAGE_DROP, methods_pb2.AVERAGE_GAIN: km.AVERAGE_GAIN,
    methods_pb2.AVERAGE_INCREASE: km.AVERAGE_INCREASE, methods_pb2.INSERTION: km.INSERTION,
    methods_pb2.DELETION: km.DELETION, methods_pb2.POINTING_GAME: km.POINTING_GAME,
    methods_pb2.ENERGY_POINTING_GAME: km.ENERGY_POINTING_GAME,
}
METRIC_ENUMS = {name: number for number, name in METRIC_NAMES.items()}
METRIC_TITLES = {name: methods_pb2.Metric.Name(number) for name, number in METRIC_ENUMS.items()}
DEFAULT_STEPS = 50
MAX_STEPS = 1000
DEFAULT_BLUR = 5.0
BLUR_RANGE = (0.1, 1000.0)


@dataclass
class Options:
    metrics: list[str]
    steps: int
    blur_sigma: float
    return_curves: bool
    boxes: dict[int, list[tuple[float, float, float, float]]]   # image index -> boxes in input pixels


@dataclass
class ScoredMap:
    order: tuple            # position in the response
    image_index: int
    method: str
    class_id: int
    saliency: np.ndarray    # [H, W] at the input resolution


def described(m: ScoredMap) -> str:
    """A scored map as the request names it: a client's maps[j], or the map of methods[i] for a class."""
    if m.order[0] == 1:
        return f"maps[{m.order[1]}]"
    return f"the map of methods[{m.order[2]}] ({m.method}) for class {m.class_id}"


def metric_list(values) -> list[str]:
    if not values:
        raise invalid(f"metrics must hold at least 1 metric; metrics: {_enum_names()}")
    names = []
    for i, value in enumerate(values):
        if value not in METRIC_NAMES:
            raise invalid(f"metrics[{i}] must be one of {_enum_names()}, got {value}")
        names.append(METRIC_NAMES[value])
    return list(dict.fromkeys(names))


def _enum_names() -> list[str]:
    return [methods_pb2.Metric.Name(n) for n in METRIC_NAMES]


def options(entry, request, images: int, geometries=None) -> Options:
    """The metric options. Before the images are decoded (geometries None) a box in original-image pixels is
    checked only for its own coordinates; once they are, it is mapped to model-input pixels and checked there."""
    opts = request.options
    pre = entry.preprocessing
    height, width = pre.height, pre.width
    names = metric_list(request.metrics)
    max_steps = min(MAX_STEPS, height * width)
    steps = opts.steps or DEFAULT_STEPS
    if not 1 <= steps <= max_steps:
        raise invalid(f"options.steps must be in [1, {max_steps}], got {opts.steps}")
    blur = opts.blur_sigma or DEFAULT_BLUR
    if not (math.isfinite(blur) and BLUR_RANGE[0] <= blur <= BLUR_RANGE[1]):
        raise invalid(f"options.blur_sigma must be in [{BLUR_RANGE[0]:g}, {BLUR_RANGE[1]:g}] input pixels "
                      f"(0 for the default {DEFAULT_BLUR:g}), got {opts.blur_sigma}")
    boxes: dict[int, list] = {}
    for i, box in enumerate(opts.boxes):
        where = f"options.boxes[{i}]"
        if not 0 <= box.image_index < images:
            raise invalid(f"{where}.image_index must be in [0, {images - 1}], got {box.image_index}")
        coords = (box.x0, box.y0, box.x1, box.y1)
        if not all(math.isfinite(v) for v in coords):
            raise invalid(f"{where} must have finite coordinates, got {list(coords)}")
        if not (box.x0 < box.x1 and box.y0 < box.y1):
            raise invalid(f"{where} must have x0 < x1 and y0 < y1, got {list(coords)}")
        if box.original_pixels:
            if geometries is None:
                continue
            g = geometries[box.image_index]
            if g.original_width == 0:
                raise invalid(f"{where}.original_pixels needs an encoded image; images[{box.image_index}] is a "
                              "tensor (give the box in model-input pixels)")
            cx0, cy0, cx1, cy1 = g.crop
            sx, sy = g.input_width / (cx1 - cx0), g.input_height / (cy1 - cy0)
            coords = ((box.x0 - cx0) * sx, (box.y0 - cy0) * sy, (box.x1 - cx0) * sx, (box.y1 - cy0) * sy)
        if not km.box_mask([coords], height, width).any():
            raise invalid(f"{where} covers no pixel centre of the {width}x{height} model input "
                          f"(in input pixels: {[round(v, 2) for v in coords]})")
        boxes.setdefault(box.image_index, []).append(tuple(float(v) for v in coords))
    pointing = [m for m in names if m in km.POINTING]
    if pointing and not opts.boxes:   # (before decoding, boxes in original pixels are not in `boxes` yet)
        wanted = [methods_pb2.Metric.Name(METRIC_ENUMS[m]) for m in pointing]
        raise invalid(f"options.boxes must hold at least 1 box for {wanted}")
    return Options(names, steps, float(blur), opts.return_curves, boxes)


def client_maps(entry, request, images: int, limits) -> list[ScoredMap]:
    most = limits.max_images * limits.max_methods * limits.max_targets
    if len(request.maps) > most:
        raise invalid(f"maps holds {len(request.maps)} maps; at most {most} are allowed")
    shape = (entry.preprocessing.height, entry.preprocessing.width)
    result = []
    for i, m in enumerate(request.maps):
        where = f"maps[{i}]"
        if not 0 <= m.image_index < images:
            raise invalid(f"{where}.image_index must be in [0, {images - 1}], got {m.image_index}")
        if not 0 <= m.class_id < entry.num_classes:
            raise invalid(f"{where}.class_id must be in [0, {entry.num_classes - 1}], got {m.class_id}")
        try:
            array = tensors.from_proto(m.map, f"{where}.map")
        except tensors.TensorError as exc:
            raise invalid(str(exc)) from None
        if array.dtype != np.float32 or array.shape != shape:
            raise invalid(f"{where}.map must be FLOAT32 {list(shape)} (the model input's resolution), got "
                          f"{array.dtype} {list(array.shape)}")
        if not np.isfinite(array).all():
            raise invalid(f"{where}.map contains NaN or Inf")
        result.append(ScoredMap((1, i), m.image_index, m.method or "client", m.class_id, array))
    return result


def job_bytes(entry, plans, images: int, targets: int, sent: list[ScoredMap], opts: Options) -> int:
    """Estimated peak memory of one Evaluate job: what an Explain job of its methods holds (validation.job_bytes:
    images, one batch per pass kind, the server's maps), plus the client's maps, one batch of masked or
    revealed inputs with its end points (black, blurred), and per image the pixel ranks (int64) and the curves
    of the maps scored together."""
    pre = entry.preprocessing
    sample = 4 * int(np.prod(pre.sample_shape))
    pixels = pre.height * pre.width
    per_image = len(plans) * targets + max([sum(m.image_index == i for m in sent) for i in range(images)] or [0])
    curves = sum(m in km.CURVES for m in opts.metrics)
    metric_batch = (entry.runner.max_batch + 2) * sample
    ranks = per_image * pixels * 8 if curves else 0
    curve_values = per_image * (opts.steps + 1) * 8 * curves
    return (validation.job_bytes(entry, plans, images, targets, False) + len(sent) * 4 * pixels + metric_batch
            + ranks + curve_values)


def memory_budget(entry, plans, images: int, targets: int, sent: list[ScoredMap], opts: Options, limits) -> None:
    estimate = job_bytes(entry, plans, images, targets, sent, opts)
    if estimate > limits.max_job_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this job needs about {estimate} bytes ({images} images x {len(plans)} methods x "
                           f"{targets} targets, {len(sent)} maps sent, batch {entry.runner.max_batch}); "
                           f"limits.max_job_bytes is {limits.max_job_bytes}: send fewer images, methods, targets "
                           "or maps")


def response_budget(entry, plans, images: int, targets: int, return_maps: bool, limits) -> None:
    """Refuse before any work a response that cannot be sent: with return_maps it carries every map the server
    computes, each height x width float32 values, and gRPC refuses a message over max_message_bytes."""
    pre = entry.preprocessing
    maps = images * len(plans) * targets if return_maps else 0
    size = maps * 4 * pre.height * pre.width
    if size > limits.max_message_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the response would carry {maps} maps of {pre.height}x{pre.width} float32 values "
                           f"(at least {size} bytes: {images} images x {len(plans)} methods x {targets} targets); "
                           f"limits.max_message_bytes is {limits.max_message_bytes}: send fewer images, methods or "
                           "targets, or leave return_maps off")


def evaluate(explainer, request, context) -> service_pb2.EvaluateResponse:
    started = time.perf_counter()
    limits = explainer.limits
    entry = validation.model(explainer.registry, request.model)
    explainer.admission_for(entry).refuse_if_full()
    plans = validation.method_plans(entry, request.methods, limits) if request.methods else []
    explicit, k = validation.class_ids(entry, request.targets, limits)
    validation.prepared_images(entry, request.images, limits)
    count = len(request.images)
    opts = options(entry, request, count)   # again once decoded, for boxes in original-image pixels
    sent = client_maps(entry, request, count, limits)
    if not plans and not sent:
        raise invalid("an Evaluate call needs maps to score: set methods (maps the server computes) or maps")
    memory_budget(entry, plans, count, len(explicit) or k, sent, opts, limits)
    response_budget(entry, plans, count, len(explicit) or k, request.return_maps, limits)
    checked_ms = (time.perf_counter() - started) * 1e3
    record = explainer._record("Evaluate", entry)
    context.add_callback(record.rpc_ended)

    def check():
        if not context.is_active():
            record.status = "cancelled"
            raise Gone("the call was cancelled or its deadline passed")

    from .service import class_score, finite_scores, geometry, map_results   # service imports this module lazily

    pre = entry.preprocessing
    response = service_pb2.EvaluateResponse()
    admission = explainer.admission_for(entry)
    with admission.slot(context.is_active) as waited:
        decode_start = time.perf_counter()
        prepared = validation.prepared_images(entry, request.images, limits, admission.decoder, context.is_active)
        opts = options(entry, request, count, [p.geometry for p in prepared])
        compute_start = time.perf_counter()
        scores = finite_scores(entry.runner.scores(validation.stack(prepared), record.passes))
        targets = [np.array(explicit) if explicit else np.argsort(-s, kind="stable")[:k] for s in scores]
        for i, (p, s, t) in enumerate(zip(prepared, scores, targets)):
            response.images.append(service_pb2.ImageTargets(
                image_index=i, image_name=p.name, geometry=geometry(p.geometry),
                targets=[class_score(entry, s, c) for c in t] if plans else []))
        results: list[tuple[ScoredMap, km.MapScores]] = []
        for i, (p, s, t) in enumerate(zip(prepared, scores, targets)):
            maps, shared = [], {}      # shared: what one method computed on this image that the next may reuse
            for pi, plan in enumerate(plans):
                job = Job(entry.runner, p.sample, t.astype(np.int64), plan.params, pre.layout, plan.layer,
                          record.passes, preprocessing=pre, scores=s, shared=shared)
                for event in plan.method.run(job):
                    check()
                    if isinstance(event, Maps) and event.final:
                        final = event.maps
                        if final.shape[-2:] != (pre.height, pre.width):
                            final = upsample_bilinear(final, pre.height, pre.width)
                        maps += [ScoredMap((0, i, pi, ti), i, plan.method.name, int(c), final[ti])
                                 for ti, c in enumerate(t)]
                        if request.return_maps:
                            response.maps.extend(map_results(entry, i, p.name, plan, t, event,
                                                             methods_pb2.OutputOptions()))
            maps += [m for m in sent if m.image_index == i]
            if not maps:
                continue
            image_boxes = opts.boxes.get(i, [])
            wanted = [m for m in opts.metrics if image_boxes or m not in km.POINTING]
            try:
                scored = km.evaluate(entry.runner, p.sample, np.stack([m.saliency for m in maps]),
                                     [m.class_id for m in maps], pre, wanted, steps=opts.steps,
                                     blur_sigma=opts.blur_sigma, boxes=image_boxes, return_curves=opts.return_curves,
                                     passes=record.passes, between_batches=check, scores=s)
            except km.NotFinite as exc:   # never a score made of a NaN
                raise invalid(f"images[{i}], {described(maps[exc.index])}: "
                              f"{', '.join(METRIC_TITLES[m] for m in exc.metrics)} would not be finite: "
                              f"{exc.reason}") from None
            results += zip(maps, scored)
        results.sort(key=lambda pair: pair[0].order)
        for m, scored in results:
            for name in opts.metrics:
                if name not in scored.values:
                    continue
                score = service_pb2.MetricScore(
                    image_index=m.image_index, method=m.method, class_id=m.class_id, metric=METRIC_ENUMS[name],
                    value=scored.values[name], class_score=scored.class_score,
                    curve=scored.curves.get(name, np.empty(0)).tolist())
                if name in km.MASKING:
                    score.masked_score = scored.masked_score
                response.scores.append(score)
        record.status = "ok"
        finished = time.perf_counter()
        response.done.CopyFrom(service_pb2.Done(
            timings=service_pb2.Timings(queue_ms=waited * 1e3,
                                        preprocess_ms=checked_ms + (compute_start - decode_start) * 1e3,
                                        compute_ms=(finished - compute_start) * 1e3,
                                        total_ms=(finished - started) * 1e3, model_ms=record.passes.seconds * 1e3),
            forward_samples=record.passes.forward_samples, backward_samples=record.passes.backward_samples,
            model_runs=record.passes.runs, maps=len(results)))
    return response
