"""Everything in a request is checked here, before any work starts. A `RequestError` carries the gRPC status
code and a message that names the bad field and the allowed range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from onnxplain import tensors
from onnxplain.kernels import images
from onnxplain.kernels.methods import METHODS, Method, ParamError
from onnxplain.v1 import methods_pb2, tensor_pb2

from .admission import Gone
from .config import Limits
from .registry import ModelEntry, Registry


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


# Parameters that set how much work a method does, and the server limit that caps each.
WORK_CAPS = {"masks": "max_masks", "steps": "max_steps", "samples": "max_steps", "iterations": "max_iterations"}


@dataclass
class MethodPlan:
    method: Method
    params: dict[str, Any]
    layer: Any          # kernels.graph.Layer or None


def model(registry: Registry, name: str) -> ModelEntry:
    entry = registry.get(name)
    if entry is None:
        raise not_found(f"model {name!r} is not served; models: {registry.names}")
    return entry


def prepared_images(entry: ModelEntry, request_images, limits: Limits, decoder=None,
                    still_wanted=None) -> list[images.Prepared]:
    """The request's images as model input samples. The servicer calls this twice: before admission without a
    decoder, for the checks that need no decoding (count, each image's source, tensors; nothing returned), so that
    such errors are answered without queueing; then inside the compute slot with the device's decoder (an
    executor): a legal 40-Mpx PNG takes ~120 MB and up to a second to decode, so decoding is work that admission
    bounds, not validation. `still_wanted` is asked before each image: a call whose caller went away stops
    decoding (admission.Gone)."""
    if not request_images:
        raise invalid("images must hold at least 1 image")
    if len(request_images) > limits.max_images:
        raise invalid(f"images holds {len(request_images)} images; at most {limits.max_images} are allowed")

    def decoded(data: bytes, name: str) -> images.Prepared:
        return images.preprocess(images.decode(data, limits.max_image_pixels), entry.preprocessing, name)

    prepared = []
    for i, image in enumerate(request_images):
        if still_wanted is not None and not still_wanted():
            raise Gone(f"the call ended while its images were decoded ({i} of {len(request_images)} done)")
        name = image_name(image, i)
        where = f"images[{i}]"
        try:
            kind = image.WhichOneof("source")
            if kind == "encoded":
                if decoder is not None:
                    prepared.append(decoder.submit(decoded, image.encoded, name).result())
            elif kind == "tensor":
                sample = images.check_sample(tensors.from_proto(image.tensor, f"{where}.tensor"), entry.preprocessing)
                pre = entry.preprocessing
                geometry = images.Geometry(0, 0, (0.0, 0.0, float(pre.width), float(pre.height)), pre.width, pre.height)
                prepared.append(images.Prepared(sample, geometry, name))
            else:
                raise invalid(f"{where} needs `encoded` bytes or a `tensor`")
        except images.ImageError as exc:
            raise invalid(f"{where}: {exc}") from None
        except tensors.TensorError as exc:     # names its field (images[i].tensor...) itself
            raise invalid(str(exc)) from None
    return prepared if decoder is not None else []


# Image.name is echoed in Accepted and in every MapResult of the call: uncapped, a 1 MB name turned a 1 MB request
# into a 134 MB stream (16 methods x 8 targets). File names fit easily.
MAX_IMAGE_NAME = 256


def image_name(image, index: int) -> str:
    """The name results carry for request image `index`: its own (at most MAX_IMAGE_NAME characters), else
    image<index>."""
    if len(image.name) > MAX_IMAGE_NAME:
        raise invalid(f"images[{index}].name has {len(image.name)} characters; at most {MAX_IMAGE_NAME} are allowed")
    return image.name or f"image{index}"


def output_options(output: methods_pb2.OutputOptions) -> None:
    """Enum values this server does not define are refused: proto3 keeps an unknown value as a plain number,
    which would otherwise read as the default (a client built against a newer contract would get raw maps
    where it asked for a normalisation it believes exists)."""
    for field, enum in (("normalization", methods_pb2.OutputOptions.Normalization),
                        ("resolution", methods_pb2.OutputOptions.Resolution)):
        value = getattr(output, field)
        if value not in enum.values():
            allowed = ", ".join(f"{name} ({number})" for name, number in enum.items())
            raise invalid(f"output.{field} must be one of {allowed}; got {value}")


def class_ids(entry: ModelEntry, targets, limits: Limits) -> tuple[list[int], int]:
    """(explicit class ids, top_k): explicit ids when any class is named, else top_k (default 1)."""
    ids = []
    for i, c in enumerate(targets.class_ids):
        if not 0 <= c < entry.num_classes:
            raise invalid(f"targets.class_ids[{i}] must be in [0, {entry.num_classes - 1}], got {c}")
        ids.append(c)
    for i, label in enumerate(targets.class_names):
        if label not in entry.labels:
            raise invalid(f"targets.class_names[{i}] {label!r} is not a label of model {entry.name}"
                          + ("" if entry.labels else " (it has no labels)"))
        ids.append(entry.labels.index(label))
    ids = list(dict.fromkeys(ids))
    if len(ids) > limits.max_targets:
        raise invalid(f"targets name {len(ids)} classes; at most {limits.max_targets} are allowed")
    top_k = targets.top_k or 1
    if not ids and not 1 <= top_k <= min(limits.max_targets, entry.num_classes):
        raise invalid(f"targets.top_k must be in [1, {min(limits.max_targets, entry.num_classes)}], got {top_k}")
    return ids, top_k


def typed_params(spec: methods_pb2.MethodSpec, index: int) -> tuple[str, dict[str, Any]]:
    """The method's name and the parameters set in its typed message."""
    chosen = spec.WhichOneof("params")
    name = spec.method or chosen or ""
    if not name:
        raise invalid(f"methods[{index}] names no method: set `method` or one parameter message; "
                      f"methods: {sorted(METHODS)}")
    if chosen and spec.method and chosen != spec.method:
        raise invalid(f"methods[{index}].method is {spec.method!r} but its parameters are for {chosen!r}")
    if not chosen:
        return name, {}
    message = getattr(spec, chosen)
    params = {}
    for fd, value in message.ListFields():
        if isinstance(value, tensor_pb2.Tensor):
            try:
                value = tensors.from_proto(value, f"methods[{index}].{chosen}.{fd.name}")
            except tensors.TensorError as exc:
                raise invalid(str(exc)) from None
        params[fd.name] = value
    return name, params


def method_plans(entry: ModelEntry, specs, limits: Limits) -> list[MethodPlan]:
    if not specs:
        raise invalid(f"methods must hold at least 1 method; methods: {sorted(METHODS)}")
    if len(specs) > limits.max_methods:
        raise invalid(f"methods holds {len(specs)} methods; at most {limits.max_methods} are allowed")
    spatial = (entry.preprocessing.height, entry.preprocessing.width)
    plans = []
    for i, spec in enumerate(specs):
        name, given = typed_params(spec, i)
        method = METHODS.get(name)
        if method is None:
            raise not_found(f"methods[{i}]: method {name!r} is not known; methods: {sorted(METHODS)}")
        try:
            params = method.resolve(given, spatial, entry.preprocessing.sample_shape)
        except ParamError as exc:
            raise invalid(f"methods[{i}].{exc}") from None
        for param, limit in WORK_CAPS.items():
            cap = getattr(limits, limit)
            if param in params and isinstance(params[param], int) and params[param] > cap:
                raise invalid(f"methods[{i}].{name}.{param} is {params[param]}; this server allows at most {cap} "
                              f"(limits.{limit})")
        layer = None
        if method.uses_layer:
            layer = entry.layer(spec.layer)
            valid = [layer.name for layer in entry.layers]
            if layer is None and spec.layer in entry.tensor_names:
                raise invalid(f"methods[{i}].layer {spec.layer!r} has no spatial structure (not a feature map or "
                              f"token grid); valid layers: {valid}")
            if layer is None and spec.layer:
                raise not_found(f"methods[{i}].layer {spec.layer!r} is not a layer with spatial structure in model "
                                f"{entry.name}; valid layers: {valid}")
            if layer is None and not valid:
                raise invalid(f"methods[{i}]: {name} needs a layer, and model {entry.name} has none: no float "
                              "feature map or token grid lies between its input and its scores (a model that "
                              "computes on integers keeps its maps as integers)")
            if layer is None:
                raise invalid(f"methods[{i}]: model {entry.name} has no default layer for {name}; "
                              f"set layer to one of {valid}")
            if method.check_for_layer is not None:
                try:
                    method.check_for_layer(entry.runner, layer)
                except ParamError as exc:
                    raise invalid(f"methods[{i}]: {exc}") from None
        elif spec.layer:
            raise invalid(f"methods[{i}].layer is set but {name} uses no layer; leave it empty")
        plans.append(MethodPlan(method, params, layer))
    return plans


def param_maximum(param, limits: Limits) -> float | None:
    """A parameter's effective maximum on this server: its declared bound, lowered by the server's work cap."""
    limit = WORK_CAPS.get(param.name)
    if limit is None or param.type != "int":
        return param.maximum
    cap = getattr(limits, limit)
    return cap if param.maximum is None else min(param.maximum, cap)


def job_bytes(entry: ModelEntry, plans: list[MethodPlan], images: int, targets: int, attributions: bool) -> int:
    """Estimated peak memory of one job: the preprocessed images, one batch of perturbed inputs per pass kind
    (forward; forward+backward when a method uses gradients, whose graph also holds the input gradient), and
    the maps it holds (input-sized attributions when asked). Activations inside the model are not counted."""
    sample = 4 * int(np.prod(entry.preprocessing.sample_shape))
    kinds = 1 + 2 * any(plan.method.uses_gradients for plan in plans)
    rows = max(entry.runner.max_batch, entry.runner.max_rows)
    return images * sample + rows * sample * kinds + map_bytes(entry, len(plans), images, targets, attributions)


def map_bytes(entry: ModelEntry, methods: int, images: int, targets: int, attributions: bool) -> int:
    """The maps one job holds: float32 maps at the input's size, and input-sized attributions when asked."""
    pre = entry.preprocessing
    return images * methods * targets * 4 * (pre.height * pre.width + (int(np.prod(pre.sample_shape))
                                                                      if attributions else 0))


def memory_budget(entry: ModelEntry, plans: list[MethodPlan], images: int, targets: int, attributions: bool,
                  limits: Limits) -> None:
    estimate = job_bytes(entry, plans, images, targets, attributions)
    if estimate > limits.max_job_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this job needs about {estimate} bytes ({images} images x {len(plans)} methods x "
                           f"{targets} targets, batch {entry.runner.max_batch}); limits.max_job_bytes is "
                           f"{limits.max_job_bytes}: send fewer images, methods or targets")


def top_k(entry: ModelEntry, value: int) -> int:
    k = value or min(5, entry.num_classes)
    if not 1 <= k <= entry.num_classes:
        raise invalid(f"top_k must be in [1, {entry.num_classes}], got {value}")
    return k


def stack(prepared: list[images.Prepared]) -> np.ndarray:
    return np.stack([p.sample for p in prepared])
