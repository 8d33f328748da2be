"""The thin Python client: grpcio + protobuf + numpy, no onnxruntime. Results come back as typed dataclasses
with numpy maps.

    from onnxplain.client import Client
    with Client("127.0.0.1:50051") as c:
        for event in c.explain("shapes", ["star.png"], methods=["occlusion"], top_k=2):
            if isinstance(event, MapResult) and event.final:
                print(event.label, event.map.shape)

Several replicas: `Client(["10.0.0.1:50051", "10.0.0.2:50051"])` or `Client("dns:///onnxplain.ns.svc:50051")`
balances calls over them with gRPC's round_robin policy (each call goes to the next ready replica; a replica
that goes away leaves the rotation, and one that comes back rejoins it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import grpc
import numpy as np

from onnxplain import tensors
from onnxplain.v1 import admin_pb2, admin_pb2_grpc, methods_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from . import auth

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, tensor_pb2.Image]
MethodLike = Union[str, tuple, methods_pb2.MethodSpec]
Norm = methods_pb2.OutputOptions
NORMALIZATIONS = {"none": Norm.NONE, "minmax": Norm.MINMAX, "maxabs": Norm.MAX_ABS}


@dataclass(frozen=True)
class ClassScore:
    class_id: int
    label: str
    logit: float
    probability: float


@dataclass(frozen=True)
class Geometry:
    original_width: int
    original_height: int
    crop: tuple[float, float, float, float]
    input_width: int
    input_height: int


@dataclass(frozen=True)
class Prediction:
    image_index: int
    image_name: str
    top: list[ClassScore]
    geometry: Geometry


@dataclass(frozen=True)
class ImageTargets:
    image_index: int
    image_name: str
    geometry: Geometry
    targets: list[ClassScore]


@dataclass(frozen=True)
class Accepted:
    job_id: str
    request_id: str
    model: str
    execution_provider: str
    images: list[ImageTargets]
    total_maps: int


@dataclass(frozen=True)
class Progress:
    image_index: int
    method: str
    done: int
    total: int
    stage: str


@dataclass(frozen=True)
class MapResult:
    image_index: int
    image_name: str
    method: str
    class_id: int
    label: str
    final: bool
    layer: str
    map: np.ndarray
    attribution: np.ndarray | None
    stats: dict[str, float]
    step: int


@dataclass(frozen=True)
class Done:
    queue_ms: float
    preprocess_ms: float
    compute_ms: float
    total_ms: float
    model_ms: float
    forward_samples: int
    backward_samples: int
    model_runs: int
    maps: int


Event = Union[Accepted, Progress, MapResult, Done]

METRICS = ("average_drop", "average_gain", "average_increase", "insertion", "deletion", "pointing_game",
           "energy_pointing_game")   # the Metric enum's values, lower case (Evaluate)


@dataclass(frozen=True)
class MetricScore:
    """One metric of one map (see service.proto's Evaluate definitions)."""
    image_index: int
    method: str
    class_id: int
    metric: str                     # one of METRICS
    value: float
    curve: np.ndarray | None        # insertion/deletion curve (steps + 1 points) when asked for
    class_score: float              # Y: probability of the class on the image (ModelInfo.probabilities)
    masked_score: float | None      # O: on the image masked by the map (average drop/gain/increase)


@dataclass(frozen=True)
class Evaluation:
    """The answer of one Evaluate call."""
    scores: list[MetricScore]
    maps: list[MapResult]           # the server-computed maps, when return_maps
    images: list[ImageTargets]      # geometry and targets of each image
    done: Done

    def value(self, image_index: int, method: str, class_id: int, metric: str) -> float:
        return next(s.value for s in self.scores if (s.image_index, s.method, s.class_id, s.metric)
                    == (image_index, method, class_id, metric))


def _scores(items) -> list[ClassScore]:
    return [ClassScore(s.class_id, s.label, s.logit, s.probability) for s in items]


def _geometry(g) -> Geometry:
    return Geometry(g.original_width, g.original_height, (g.crop_x0, g.crop_y0, g.crop_x1, g.crop_y1),
                    g.input_width, g.input_height)


def image_message(image: ImageLike, name: str = "") -> tensor_pb2.Image:
    """An Image message from a file path, encoded bytes, or an already preprocessed float32 array."""
    if isinstance(image, tensor_pb2.Image):
        return image
    if isinstance(image, np.ndarray):
        return tensor_pb2.Image(tensor=tensors.to_proto(image), name=name)
    if isinstance(image, (bytes, bytearray)):
        return tensor_pb2.Image(encoded=bytes(image), name=name)
    path = pathlib.Path(image)
    return tensor_pb2.Image(encoded=path.read_bytes(), name=name or path.name)


def method_spec(method: MethodLike, layer: str = "") -> methods_pb2.MethodSpec:
    """A MethodSpec from a name, a (name, {param: value}) pair, or a MethodSpec. Parameter values may be
    strings (as typed on a command line); they are converted to the field's type."""
    if isinstance(method, methods_pb2.MethodSpec):
        return method
    name, params = (method, {}) if isinstance(method, str) else method
    spec = methods_pb2.MethodSpec(method=name, layer=layer)
    if not params:
        return spec
    field_desc = methods_pb2.MethodSpec.DESCRIPTOR.fields_by_name.get(name)
    if field_desc is None or field_desc.containing_oneof is None:
        raise ValueError(f"method {name!r} has no parameter message in this client's contract")
    message = getattr(spec, name)
    for key, value in params.items():
        fd = message.DESCRIPTOR.fields_by_name.get(key)
        if fd is None:
            raise ValueError(f"{name} has no parameter {key!r}; it takes {sorted(message.DESCRIPTOR.fields_by_name)}")
        setattr(message, key, _convert(fd, value, f"{name}.{key}"))
    return spec


def _convert(fd, value: Any, where: str) -> Any:
    from google.protobuf.descriptor import FieldDescriptor as F

    try:
        if fd.type in (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64):
            return int(value)
        if fd.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            return float(value)
        if fd.type == F.TYPE_BOOL:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if fd.type == F.TYPE_ENUM and isinstance(value, str):
            return fd.enum_type.values_by_name[value.upper()].number
        return value
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{where}: cannot use {value!r}: {exc}") from None


BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")   # targets that may name several replicas
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for one or several replicas. A single target passes through (`HOST:PORT`,
    `dns:///NAME:PORT`, `ipv4:a:p1,b:p2`, ...); several `HOST:PORT` become `ipv4:a:p1,b:p2` (or `ipv6:`), the
    target syntax of a fixed list of addresses (gRPC resolves no names inside it: hosts must be IP addresses,
    `localhost` is taken as 127.0.0.1)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("no server given")
    if len(targets) == 1:
        return targets[0]
    hosts, family = [], set()
    for s in targets:
        host, sep, port = s.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"server {s!r} must be HOST:PORT when several servers are given")
        host = "127.0.0.1" if host == "localhost" else host
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"server {s!r}: several servers must be IP addresses (or give one dns:///NAME:PORT "
                             "target that resolves to every replica)") from None
        family.add(address.version)
        hosts.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    if len(family) > 1:
        raise ValueError("servers mix IPv4 and IPv6 addresses; use one family")
    return f"ipv{family.pop()}:" + ",".join(hosts)


def balanced(target: str) -> bool:
    """Whether a target may name several replicas (then calls go round-robin over them)."""
    return target.startswith(BALANCED_SCHEMES)


def make_channel(targets: str | Sequence[str], max_message_bytes: int = 64 * 1024 * 1024,
                 credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to one server, or balanced round-robin over the replicas `targets` names; TLS when
    `credentials` (auth.channel_credentials) are given, plaintext otherwise."""
    target = channel_target(targets)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if balanced(target):
        # pick_first (the default) would send every call to one replica; round_robin keeps a connection to
        # each address the resolver returns and rotates over the ready ones.
        options.append(("grpc.service_config", ROUND_ROBIN))
    if credentials is not None:
        if target.startswith(("ipv4:", "ipv6:")):
            # An address list has no name for TLS to check (gRPC would check "localhost"): every replica's
            # certificate is checked against the first address, so they must all name it (e.g. 127.0.0.1 for
            # replicas on one machine); replicas with their own names want a dns:/// target instead.
            first = target.split(":", 1)[1].split(",")[0]
            options.append(("grpc.ssl_target_name_override", first.rsplit(":", 1)[0].strip("[]")))
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


class Client:
    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.Channel | None = None,
                 token: str | None = None, tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None):
        """`token`: bearer token sent on every call (default $ONNXPLAIN_TOKEN); TLS when `tls` or any `tls_*`
        path is given (`tls_ca`: CA that signed the server, default the system's roots; `tls_cert` + `tls_key`:
        this client's certificate for mutual TLS). See client/auth.py."""
        credentials = (auth.channel_credentials(tls_ca, tls_cert, tls_key)
                       if tls or tls_ca or tls_cert or tls_key else None)
        self.channel = auth.with_token(channel or make_channel(target, max_message_bytes, credentials), token)
        self.stub = service_pb2_grpc.ExplainerStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def models(self) -> list[service_pb2.ModelSummary]:
        return list(self.stub.ListModels(service_pb2.ListModelsRequest(), timeout=self.timeout).models)

    # Model management (the Admin service; the `admin` role when the server has tokens).
    def load_model(self, path: str, name: str = "", replace: bool = False) -> service_pb2.ModelSummary:
        """Serve the .onnx or model .toml at `path` (inside one of the server's model directories)."""
        request = admin_pb2.LoadModelRequest(path=str(path), name=name, replace=replace)
        return self.admin.LoadModel(request, timeout=self.timeout).model

    def unload_model(self, name: str) -> service_pb2.ModelSummary:
        """Stop serving `name`; calls already running on it finish."""
        return self.admin.UnloadModel(admin_pb2.UnloadModelRequest(name=name), timeout=self.timeout).model

    def reload_model(self, name: str) -> service_pb2.ModelSummary:
        """Load `name` again from its file and swap it in; calls already running finish on the old one."""
        return self.admin.ReloadModel(admin_pb2.ReloadModelRequest(name=name), timeout=self.timeout).model

    def model(self, name: str) -> service_pb2.ModelInfo:
        return self.stub.GetModel(service_pb2.GetModelRequest(name=name), timeout=self.timeout)

    def methods(self) -> list[methods_pb2.MethodInfo]:
        return list(self.stub.ListMethods(service_pb2.ListMethodsRequest(), timeout=self.timeout).methods)

    def predict(self, model: str, images: Iterable[ImageLike], top_k: int = 5) -> list[Prediction]:
        request = service_pb2.PredictRequest(model=model, images=[image_message(i) for i in images], top_k=top_k)
        response = self.stub.Predict(request, timeout=self.timeout)
        return [Prediction(p.image_index, p.image_name, _scores(p.top), _geometry(p.geometry))
                for p in response.predictions]

    def explain_request(self, model: str, images: Iterable[ImageLike], methods: Iterable[MethodLike],
                        targets: Iterable[int | str] = (), top_k: int = 0, layer: str = "",
                        normalization: str = "none", partial_maps: bool = False,
                        return_attribution: bool = False, request_id: str = "") -> service_pb2.ExplainRequest:
        targets = list(targets)
        return service_pb2.ExplainRequest(
            model=model, images=[image_message(i) for i in images], request_id=request_id,
            methods=[method_spec(m, layer) for m in methods],
            targets=service_pb2.Targets(class_ids=[t for t in targets if isinstance(t, int)],
                                        class_names=[t for t in targets if isinstance(t, str)], top_k=top_k),
            output=Norm(normalization=NORMALIZATIONS[normalization], partial_maps=partial_maps,
                        return_attribution=return_attribution))

    def explain(self, model: str, images: Iterable[ImageLike], methods: Iterable[MethodLike], *,
                timeout: float | None = None, **options) -> Iterator[Event]:
        """Stream the events of one Explain call. Stop iterating (or call .cancel() on the underlying
        call, see `explain_call`) to cancel it: the server stops within one model batch."""
        call = self.explain_call(self.explain_request(model, images, methods, **options), timeout=timeout)
        try:
            for message in call:
                yield event_from_message(message)
        finally:
            call.cancel()

    def explain_call(self, request: service_pb2.ExplainRequest, timeout: float | None = None):
        """The raw streaming call (an iterator of ExplainEvent that also has .cancel())."""
        return self.stub.Explain(request, timeout=timeout if timeout is not None else self.timeout)

    def evaluate(self, model: str, images: Iterable[ImageLike], methods: Iterable[MethodLike] = (), *,
                 maps: Iterable = (), metrics: Iterable[str | int] = METRICS[:5], targets: Iterable[int | str] = (),
                 top_k: int = 0, layer: str = "", steps: int = 0, blur_sigma: float = 0.0,
                 return_curves: bool = False, boxes: Iterable = (), return_maps: bool = False,
                 timeout: float | None = None) -> Evaluation:
        """Faithfulness metrics of the maps of `methods` (computed by the server) and of `maps` (sent: Map
        messages or (image_index, class_id, label, float32 [H, W] array) tuples). `metrics` are names from
        METRICS (or Metric enum values); `boxes` are Box messages or (image_index, x0, y0, x1, y1[,
        original_pixels]) tuples, in model-input pixels unless original_pixels."""
        targets = list(targets)
        request = service_pb2.EvaluateRequest(
            model=model, images=[image_message(i) for i in images], methods=[method_spec(m, layer) for m in methods],
            targets=service_pb2.Targets(class_ids=[t for t in targets if isinstance(t, int)],
                                        class_names=[t for t in targets if isinstance(t, str)], top_k=top_k),
            maps=[m if isinstance(m, methods_pb2.Map) else methods_pb2.Map(
                image_index=m[0], class_id=m[1], method=m[2], map=tensors.to_proto(np.asarray(m[3], np.float32)))
                for m in maps],
            metrics=[m if isinstance(m, int) else methods_pb2.Metric.Value(m.upper()) for m in metrics],
            options=service_pb2.MetricOptions(steps=steps, blur_sigma=blur_sigma, return_curves=return_curves, boxes=[
                b if isinstance(b, service_pb2.Box) else service_pb2.Box(
                    image_index=b[0], x0=b[1], y0=b[2], x1=b[3], y1=b[4], original_pixels=bool(b[5:] and b[5]))
                for b in boxes]),
            return_maps=return_maps)
        return evaluation_from_message(self.stub.Evaluate(request, timeout=timeout if timeout is not None else self.timeout))


def event_from_message(message: service_pb2.ExplainEvent) -> Event:
    kind = message.WhichOneof("event")
    if kind == "accepted":
        a = message.accepted
        return Accepted(a.job_id, a.request_id, a.model, a.execution_provider,
                        [ImageTargets(i.image_index, i.image_name, _geometry(i.geometry), _scores(i.targets))
                         for i in a.images], a.total_maps)
    if kind == "progress":
        p = message.progress
        return Progress(p.image_index, p.method, p.done, p.total, p.stage)
    if kind == "map":
        m = message.map
        return MapResult(m.image_index, m.image_name, m.method, m.class_id, m.label, m.final, m.layer,
                         tensors.from_proto(m.map, "map"),
                         tensors.from_proto(m.attribution, "attribution") if m.HasField("attribution") else None,
                         dict(m.stats), m.step)
    if kind == "done":
        d = message.done
        t = d.timings
        return Done(t.queue_ms, t.preprocess_ms, t.compute_ms, t.total_ms, t.model_ms, d.forward_samples, d.backward_samples,
                    d.model_runs, d.maps)
    raise ValueError(f"unknown event {kind!r}")


def evaluation_from_message(r: service_pb2.EvaluateResponse) -> Evaluation:
    return Evaluation(
        scores=[MetricScore(s.image_index, s.method, s.class_id, methods_pb2.Metric.Name(s.metric).lower(), s.value,
                            np.array(s.curve) if len(s.curve) else None, s.class_score,
                            s.masked_score if s.metric in (1, 2, 3) else None) for s in r.scores],
        maps=[event_from_message(service_pb2.ExplainEvent(map=m)) for m in r.maps],
        images=[ImageTargets(i.image_index, i.image_name, _geometry(i.geometry), _scores(i.targets)) for i in r.images],
        done=event_from_message(service_pb2.ExplainEvent(done=r.done)))
