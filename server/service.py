"""The Explainer servicer: plain code over the registry and the kernels; Explain streams as a generator.

Every call is validated before any work (validation.py), admitted under the concurrency limits
(admission.py), decodes its images and then runs its methods batch by batch: between two images and between two
batches the servicer checks that the caller is still there, so a cancelled or expired call stops within one image
or one model batch.

An Explain job computes in its own thread and hands its events to the stream through an EventBuffer: a client
that reads slowly, or stops reading, holds its stream (until its deadline or cancellation) but not the compute
slot, which is released as soon as the job's last batch ends.

A call whose client set no deadline (or one past limits.max_call_seconds) gets the server's: CallCap ends it with
DEADLINE_EXCEEDED when it runs longer, and from there it goes the way of a call whose client deadline passed.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import inspect
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np
import onnx
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from onnxplain import tensors
from onnxplain.kernels.autodiff import AutodiffError
from onnxplain.kernels.images import upsample_bilinear
from onnxplain.kernels.metrics import probabilities as class_probabilities
from onnxplain.kernels.methods import METHODS, Job, Maps, Method, ParamError, Progress
from onnxplain.kernels.runtime import Passes
from onnxplain.v1 import methods_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from . import logs, validation
from .admission import Admission, Exhausted, Gone, non_blocking_like
from .config import Limits
from .metrics import Metrics
from .registry import ModelEntry, Registry
from .validation import RequestError

log = logging.getLogger("onnxplain.server")

PARAM_TYPES = {"int": methods_pb2.ParamInfo.TYPE_INT, "float": methods_pb2.ParamInfo.TYPE_FLOAT,
               "bool": methods_pb2.ParamInfo.TYPE_BOOL, "enum": methods_pb2.ParamInfo.TYPE_ENUM,
               "tensor": methods_pb2.ParamInfo.TYPE_TENSOR}
Norm = methods_pb2.OutputOptions


@dataclass
class JobRecord:
    """What one call did; the last few are kept for operators and tests (e.g. passes after a cancel)."""

    job_id: str
    rpc: str
    model: str
    status: str = "running"
    passes: Passes = field(default_factory=Passes)
    samples_at_end: int | None = None   # samples run when the RPC ended (completed, cancelled or expired)

    def samples(self) -> int:
        return self.passes.forward_samples + self.passes.backward_samples

    def rpc_ended(self) -> None:
        self.samples_at_end = self.samples()


ORT_ERRORS = tuple(getattr(ort_errors, name) for name in (
    "Fail", "InvalidArgument", "RuntimeException", "EPFail", "EngineError", "NotImplemented", "InvalidGraph"))


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of a failed call. A model that the engine cannot differentiate: FAILED_PRECONDITION. A
    fault inside the server (an onnxruntime error included) fails this call only: RESOURCE_EXHAUSTED when memory
    ran out, INTERNAL otherwise."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, ParamError):   # a parameter that only the method itself could judge
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, AutodiffError):   # an operator without a rule: no retry helps until the model changes
        return grpc.StatusCode.FAILED_PRECONDITION, f"the model cannot be differentiated: {exc}"
    if isinstance(exc, Exhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or (isinstance(exc, ORT_ERRORS) and "alloc" in str(exc).lower()):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the model run ran out of memory: {text}"
    if isinstance(exc, ORT_ERRORS):
        return grpc.StatusCode.INTERNAL, f"the model run failed (onnxruntime): {text}"
    return grpc.StatusCode.INTERNAL, text


DEADLINE_SLACK = 0.1   # seconds; see Call.gone


class CallCap:
    """Ends the calls that run past limits.max_call_seconds when their client set no deadline, or a longer one.

    gRPC only enforces the client's deadline. Without one, a call lasts as long as its client wants: an Explain
    stream whose client stops reading keeps its server thread blocked in gRPC's send (HTTP/2 flow control), with
    the job's undelivered maps, until the connection closes; enough of them take every thread of the server's
    pool. At the cap the server cancels the call with DEADLINE_EXCEEDED, which is what a client deadline does: the
    client gets that status, the call stops being active (a queued job leaves the queue, a running one stops
    within one batch, a blocked send fails and frees its thread and buffer) and Call.gone records it so.

    All calls get the same cap, so they expire in the order they started: one thread waits for the oldest."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self._calls: collections.OrderedDict[int, tuple[float, "Call"]] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, call: "Call") -> None:
        """Cap `call` unless its client's own deadline comes first."""
        remaining = call.context.time_remaining()
        if remaining is not None and remaining <= self.seconds:
            return
        with self._cond:
            if self._stopped:
                return
            self._calls[id(call)] = (time.monotonic() + self.seconds, call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="onnxplain-call-cap")
                self._thread.start()
            if len(self._calls) == 1:   # a later call never expires before the ones already watched
                self._cond.notify()

    def forget(self, call: "Call") -> None:
        with self._cond:
            self._calls.pop(id(call), None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._calls.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    wait = None
                    if self._calls:
                        expiry, call = next(iter(self._calls.values()))
                        wait = expiry - time.monotonic()
                        if wait <= 0:
                            self._calls.popitem(last=False)
                            break
                    self._cond.wait(wait)
            call.expire(f"the call ran past the server's limit for a call without an earlier deadline "
                        f"(limits.max_call_seconds = {self.seconds} s); set a deadline, or ask for less work per call")


class Call:
    """One RPC as operators see it: request id, model label, status, bytes sent; counted and logged at the end."""

    def __init__(self, explainer: "Explainer", rpc: str, request, context):
        self.explainer, self.rpc, self.context = explainer, rpc, context
        self.start = time.perf_counter()
        name = getattr(request, "model", "") or getattr(request, "name", "")
        self.model = name if name and explainer.registry.get(name) is not None else ""
        metadata = dict((k, v) for k, v in (context.invocation_metadata() or ()) if k == "x-request-id")
        given = metadata.get("x-request-id") or getattr(request, "request_id", "")
        self.request_id = logs.clean_request_id(given) if isinstance(given, str) else ""
        self._token = logs.REQUEST_ID.set(self.request_id)
        if self.request_id:
            context.set_trailing_metadata((("x-request-id", self.request_id),))
        self.code = grpc.StatusCode.OK
        self.sent = 0
        self.expired = False   # ended by the server's CallCap
        explainer.cap.watch(self)

    def expire(self, message: str) -> None:
        """End the call with DEADLINE_EXCEEDED from outside its thread (which may be blocked in gRPC's send).
        grpc's Python API can cancel a call only with CANCELLED; the core call under the context cancels with
        a status, which the client receives as the call's own."""
        self.expired = True
        call = getattr(getattr(self.context, "_rpc_event", None), "call", None)
        if call is not None:
            call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], logs.status_detail(message).encode())
        else:   # another gRPC implementation of the context: at least free the call
            self.context.cancel()

    def failed(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, Gone):   # the client saw its own deadline or cancel, which only the context knows
            self.code = self.gone()
            return self.code, logs.status_detail(str(exc))
        self.code, message = status_of(exc)
        if self.code == grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", self.rpc, message, exc_info=exc)
        return self.code, logs.status_detail(message)

    def sending(self, message):
        """Count a response message, refusing it when gRPC would: a message over max_message_bytes fails the
        call with RESOURCE_EXHAUSTED on the client's side, so it is recorded as such here, not as OK."""
        size = message.ByteSize()
        limit = self.explainer.limits.max_message_bytes
        if size > limit:
            raise Exhausted(f"a {type(message).__name__} of {size} bytes is over limits.max_message_bytes "
                            f"({limit}); ask for fewer images, methods, targets or maps per call")
        self.sent += size
        return message

    def gone(self) -> grpc.StatusCode:
        """Why the caller went away: its deadline passed (the client's, or the server's max_call_seconds), or it
        cancelled. The server's deadline is the client's plus the request's transit time, so a client whose own
        deadline fired cancels the stream a few milliseconds before the server's passes: a cancellation within
        DEADLINE_SLACK of it counts as expiry."""
        if self.expired:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        remaining = self.context.time_remaining()
        return (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_SLACK
                else grpc.StatusCode.CANCELLED)

    def ended(self) -> None:
        self.explainer.cap.forget(self)
        if self.code == grpc.StatusCode.OK and not self.context.is_active():
            self.code = self.gone()
        seconds = time.perf_counter() - self.start
        metrics = self.explainer.metrics
        metrics.call_ended(self.rpc, self.model, self.code.name, seconds)
        metrics.streamed.labels(self.rpc, self.model).inc(self.sent)
        log.info("%s model=%s code=%s %.1f ms%s", self.rpc, self.model or "-", self.code.name, seconds * 1e3,
                 " (ran past limits.max_call_seconds)" if self.expired else "",
                 extra={"rpc": self.rpc, "model": self.model, "code": self.code.name,
                        "duration_ms": round(seconds * 1e3, 3), "bytes_sent": self.sent})
        logs.REQUEST_ID.reset(self._token)


class Malformed:
    """A request whose bytes are not the RPC's message (stands in for it; answered with INVALID_ARGUMENT)."""

    def __init__(self, message: str):
        self.message = message
        self.started = time.perf_counter()


class MalformedRequests(grpc.ServerInterceptor):
    """Bytes that do not parse as the RPC's request message get INVALID_ARGUMENT (gRPC's own answer would be
    INTERNAL, which the contract keeps for faults inside the server). Such a call never reaches a servicer, so
    it is counted and logged here (rpc = the method's name, model = "")."""

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics

    def refused(self, method: str, started: float) -> None:
        rpc = method.rsplit("/", 1)[-1]
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.call_ended(rpc, "", grpc.StatusCode.INVALID_ARGUMENT.name, seconds)
        log.info("%s model=- code=INVALID_ARGUMENT %.1f ms (request does not parse)", rpc, seconds * 1e3,
                 extra={"rpc": rpc, "model": "", "code": "INVALID_ARGUMENT",
                        "duration_ms": round(seconds * 1e3, 3), "bytes_sent": 0})

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def deserializer(data: bytes):
            try:
                return parse(data)
            except Exception as exc:   # protobuf's DecodeError, or any other failure to parse
                return Malformed(f"the request is not a valid message for {method}: {exc}")

        def guarded(behaviour):
            def run(request, context, *send_response_callback):
                if isinstance(request, Malformed):
                    self.refused(method, request.started)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, logs.status_detail(request.message))
                return behaviour(request, context, *send_response_callback)
            return non_blocking_like(behaviour, run)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(guarded(handler.unary_stream), deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(guarded(handler.unary_unary), deserializer,
                                                   handler.response_serializer)


def handles_errors(rpc):
    """Turn RequestError / capacity / unexpected faults into gRPC statuses (the server keeps serving), and count
    and log every call (metrics.py, logs.py)."""

    @functools.wraps(rpc)
    def unary(self, request, context):
        call = Call(self, rpc.__name__, request, context)
        try:
            self.refuse_if_draining()
            return call.sending(rpc(self, request, context))
        except Exception as exc:
            context.abort(*call.failed(exc))
        finally:
            call.ended()

    @functools.wraps(rpc)
    def streaming(self, request, context):
        call = Call(self, rpc.__name__, request, context)
        try:
            self.refuse_if_draining()
            for message in rpc(self, request, context):
                yield call.sending(message)
        except GeneratorExit:   # the stream was closed under us (the caller went away)
            call.code = call.gone()
            raise
        except Exception as exc:
            context.abort(*call.failed(exc))
        finally:
            call.ended()

    return streaming if inspect.isgeneratorfunction(rpc) else unary


class Explainer(service_pb2_grpc.ExplainerServicer):
    def __init__(self, registry: Registry, limits: Limits, metrics: Metrics | None = None):
        self.registry = registry
        self.limits = limits
        # One bounded queue per device (execution provider and device id): jobs on different devices do not
        # wait for each other, and each device refuses past its own capacity.
        self.admissions: dict[str, Admission] = {}
        self._admissions_lock = threading.Lock()
        self.metrics = metrics or Metrics(lambda: dict(self.admissions))
        self.cap = CallCap(limits.max_call_seconds)
        self.jobs: collections.deque[JobRecord] = collections.deque(maxlen=256)
        # Set at shutdown before health reports NOT_SERVING: from then on a call that reaches the servicer is
        # refused with UNAVAILABLE (gRPC refuses new calls itself only once Server.stop has closed the port).
        self.draining = threading.Event()

    def refuse_if_draining(self) -> None:
        if self.draining.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")

    def admission_for(self, entry: ModelEntry) -> Admission:
        device = device_of(entry)
        with self._admissions_lock:
            admission = self.admissions.get(device)
            if admission is None:
                admission = self.admissions[device] = Admission(self.limits.max_concurrent_jobs,
                                                                 self.limits.max_queued_jobs)
            return admission

    # ------------------------------------------------------------------------------------------ describing

    @handles_errors
    def ListModels(self, request, context):
        entries = self.registry.entries      # one snapshot: the dict is replaced on load/unload, never mutated
        return service_pb2.ListModelsResponse(models=[
            service_pb2.ModelSummary(name=e.name, num_classes=e.num_classes, description=e.description,
                                     execution_provider=e.runner.provider)
            for _, e in sorted(entries.items())])

    @handles_errors
    def GetModel(self, request, context):
        return model_info(validation.model(self.registry, request.name), self.limits)

    @handles_errors
    def ListMethods(self, request, context):
        return service_pb2.ListMethodsResponse(methods=[method_info(m, self.limits) for m in METHODS.values()],
                                               limits=limits_info(self.limits, self.limits.max_batch))

    @handles_errors
    def Evaluate(self, request, context):
        from .evaluate import evaluate   # server/evaluate.py: validation, methods, metrics

        return evaluate(self, request, context)

    # ------------------------------------------------------------------------------------------ computing

    @handles_errors
    def Predict(self, request, context):
        entry = validation.model(self.registry, request.model)
        self.admission_for(entry).refuse_if_full()
        k = validation.top_k(entry, request.top_k)
        validation.prepared_images(entry, request.images, self.limits)
        record = self._record("Predict", entry)
        admission = self.admission_for(entry)
        with admission.slot(context.is_active):
            prepared = validation.prepared_images(entry, request.images, self.limits, admission.decoder,
                                                  context.is_active)
            scores = finite_scores(entry.runner.scores(validation.stack(prepared), record.passes))
        record.status = "ok"
        return service_pb2.PredictResponse(predictions=[
            service_pb2.Prediction(image_index=i, image_name=p.name, geometry=geometry(p.geometry),
                                   top=top_classes(entry, s, k))
            for i, (p, s) in enumerate(zip(prepared, scores))])

    @handles_errors
    def Explain(self, request, context):
        started = time.perf_counter()
        entry = validation.model(self.registry, request.model)
        self.admission_for(entry).refuse_if_full()
        plans = validation.method_plans(entry, request.methods, self.limits)
        validation.output_options(request.output)
        explicit, k = validation.class_ids(entry, request.targets, self.limits)
        validation.prepared_images(entry, request.images, self.limits)
        count, output = len(request.images), request.output
        validation.memory_budget(entry, plans, count, len(explicit) or k, output.return_attribution, self.limits)
        map_message_budget(entry, output, self.limits)
        checked_ms = (time.perf_counter() - started) * 1e3
        record = self._record("Explain", entry)
        if not logs.REQUEST_ID.get():
            logs.REQUEST_ID.set(record.job_id)
        context.add_callback(record.rpc_ended)
        buffer = EventBuffer(validation.map_bytes(entry, len(plans), count, len(explicit) or k,
                                                  output.return_attribution))

        def wanted() -> bool:
            return context.is_active() and not buffer.abandoned

        job = self._explain(request, wanted, entry, plans, explicit, k, record, started, checked_ms)
        # the job's thread runs in a copy of this context, so that its log lines carry the call's request id
        threading.Thread(target=contextvars.copy_context().run, args=(buffer.fill, job), daemon=True,
                         name=f"explain-{record.job_id}").start()
        try:
            for message in buffer.drain():
                if message.WhichOneof("event") == "map" and message.map.final:
                    self.metrics.maps.labels(entry.name, message.map.method).inc()
                yield message
        finally:
            buffer.abandon()
            if record.status == "running":   # the caller went away (or the stream was closed) mid-way
                record.status = "cancelled"

    def _explain(self, request, wanted, entry, plans, explicit, k, record, started, checked_ms):
        """The job: runs in its own thread, and its events go to the stream's EventBuffer."""
        output = request.output
        admission = self.admission_for(entry)
        with admission.slot(wanted) as waited:
            decode_start = time.perf_counter()
            prepared = validation.prepared_images(entry, request.images, self.limits, admission.decoder, wanted)
            compute_start = time.perf_counter()
            scores = finite_scores(entry.runner.scores(validation.stack(prepared), record.passes))
            targets = [np.array(explicit) if explicit else np.argsort(-s, kind="stable")[:k] for s in scores]
            total = sum(len(t) for t in targets) * len(plans)
            yield service_pb2.ExplainEvent(accepted=service_pb2.Accepted(
                job_id=record.job_id, request_id=logs.REQUEST_ID.get(), model=entry.name,
                execution_provider=entry.runner.provider, total_maps=total,
                images=[service_pb2.ImageTargets(
                    image_index=i, image_name=p.name, geometry=geometry(p.geometry),
                    targets=[class_score(entry, s, c) for c in t])
                    for i, (p, s, t) in enumerate(zip(prepared, scores, targets))]))
            sent = 0
            for i, (p, s, t) in enumerate(zip(prepared, scores, targets)):
                shared = {}     # what one method computed on this image that the next may reuse (Job.shared)
                for plan in plans:
                    job = Job(entry.runner, p.sample, t.astype(np.int64), plan.params, entry.preprocessing.layout,
                              plan.layer, record.passes, partial_every=4 if output.partial_maps else 0,
                              preprocessing=entry.preprocessing, scores=s, shared=shared)
                    for event in plan.method.run(job):
                        if not wanted():
                            record.status = "cancelled"
                            return
                        if isinstance(event, Progress):
                            yield service_pb2.ExplainEvent(progress=service_pb2.Progress(
                                image_index=i, method=plan.method.name, done=event.done, total=event.total,
                                stage=event.stage))
                        elif isinstance(event, Maps) and (event.final or output.partial_maps):
                            for result in map_results(entry, i, p.name, plan, t, event, output):
                                sent += result.final
                                yield service_pb2.ExplainEvent(map=result)
            record.status = "ok"
            finished = time.perf_counter()
            yield service_pb2.ExplainEvent(done=service_pb2.Done(
                timings=service_pb2.Timings(queue_ms=waited * 1e3,
                                            preprocess_ms=checked_ms + (compute_start - decode_start) * 1e3,
                                            compute_ms=(finished - compute_start) * 1e3,
                                            total_ms=(finished - started) * 1e3,
                                            model_ms=record.passes.seconds * 1e3),
                forward_samples=record.passes.forward_samples, backward_samples=record.passes.backward_samples,
                model_runs=record.passes.runs, maps=sent))

    def _record(self, rpc: str, entry: ModelEntry) -> JobRecord:
        record = JobRecord(uuid.uuid4().hex[:16], rpc, entry.name)
        record.passes.observer = self.metrics.observer(entry.name)
        self.jobs.append(record)
        return record


# ---------------------------------------------------------------------------------------------- streaming

_END = object()


class EventBuffer:
    """The events of one Explain job, from the job's thread to its stream. The job never waits for the reader:
    a stream blocked by gRPC flow control (a client that stops reading) must not hold the compute slot. What it
    holds instead is bounded: every essential event (accepted, final maps, done) is kept, and those are the maps
    that validation.job_bytes already counts for the job (validation.map_bytes); progress events and partial maps, mere
    previews of what comes next, are dropped while the buffer already holds that many bytes, so a reader that
    keeps up sees them all and a stalled one costs no more than the job's counted maps."""

    def __init__(self, budget: int):
        self.budget = budget
        self.abandoned = False   # the stream ended before the job: the job stops at its next batch
        self._events: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, message) -> None:
        kind = message.WhichOneof("event")
        preview = kind == "progress" or (kind == "map" and not message.map.final)
        size = message.ByteSize()
        with self._cond:
            if preview and self._bytes >= self.budget:
                return
            self._events.append((message, size))
            self._bytes += size
            self._cond.notify()

    def fill(self, events) -> None:
        """Run the job (a generator of events) into the buffer; its exception, if any, goes to the stream."""
        end = _END
        try:
            for message in events:
                self.put(message)
        except BaseException as exc:   # handed to the stream, which turns it into the call's status
            end = exc
        finally:
            with self._cond:
                self._events.append((end, 0))
                self._cond.notify()

    def drain(self):
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                item, size = self._events.popleft()
                self._bytes -= size
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def abandon(self) -> None:
        self.abandoned = True


def map_message_budget(entry: ModelEntry, output, limits: Limits) -> None:
    """Refuse before any work an Explain whose every map message is over max_message_bytes: a map at the input's
    resolution is height x width float32 values (an attribution adds more, but not every method has one)."""
    pre = entry.preprocessing
    size = 4 * pre.height * pre.width
    if output.resolution != Norm.LAYER and size > limits.max_message_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"each map is {pre.height}x{pre.width} float32 values ({size} bytes), over "
                           f"limits.max_message_bytes ({limits.max_message_bytes}); a layer method can answer at "
                           "output.resolution = LAYER")


def finite_scores(scores: np.ndarray) -> np.ndarray:
    """The model's scores, refused when an image's are not finite: such an input drives the model out of float
    range, and every probability, target and map computed from those scores would be NaN."""
    for i, s in enumerate(scores):
        if not np.isfinite(s).all():
            raise validation.invalid(f"images[{i}]: the model's scores for this image are not finite (NaN or Inf): "
                                     "its values drive the model out of float32 range")
    return scores


# ---------------------------------------------------------------------------------------------- messages

def geometry(g) -> tensor_pb2.ImageGeometry:
    return tensor_pb2.ImageGeometry(original_width=g.original_width, original_height=g.original_height,
                                    crop_x0=g.crop[0], crop_y0=g.crop[1], crop_x1=g.crop[2], crop_y1=g.crop[3],
                                    input_width=g.input_width, input_height=g.input_height)


def class_score(entry: ModelEntry, scores: np.ndarray, c: int, probabilities=None) -> service_pb2.ClassScore:
    probabilities = class_probabilities(scores, entry.runner.probabilities) if probabilities is None else probabilities
    return service_pb2.ClassScore(class_id=int(c), label=entry.label(int(c)), logit=float(scores[c]),
                                  probability=float(probabilities[c]))


def top_classes(entry: ModelEntry, scores: np.ndarray, k: int) -> list[service_pb2.ClassScore]:
    probabilities = class_probabilities(scores, entry.runner.probabilities)
    return [class_score(entry, scores, c, probabilities) for c in np.argsort(-scores, kind="stable")[:k]]


def normalise(m: np.ndarray, how: int) -> np.ndarray:
    if how == Norm.MINMAX:   # in float64: hi - lo of a float32 map spanning +-3e38 overflows float32
        lo, hi = float(m.min()), float(m.max())
        return ((m.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros_like(m)).astype(np.float32)
    if how == Norm.MAX_ABS:
        top = np.abs(m).max()
        return (m / top if top > 0 else m).astype(np.float32)
    return m


def map_results(entry: ModelEntry, index: int, name: str, plan: validation.MethodPlan, targets: np.ndarray,
                event: Maps, output) -> list[service_pb2.MapResult]:
    pre = entry.preprocessing
    maps = event.maps
    if output.resolution != Norm.LAYER and maps.shape[-2:] != (pre.height, pre.width):
        maps = upsample_bilinear(maps, pre.height, pre.width)
    results = []
    for t, c in enumerate(targets):
        result = service_pb2.MapResult(
            image_index=index, image_name=name, method=plan.method.name, class_id=int(c), label=entry.label(int(c)),
            final=event.final, layer=plan.layer.name if plan.layer is not None else "", step=event.step,
            map=tensors.to_proto(normalise(maps[t], output.normalization)),
            stats=event.stats[t] if event.stats else {})
        if output.return_attribution and event.attribution is not None:
            result.attribution.CopyFrom(tensors.to_proto(event.attribution[t]))
        results.append(result)
    return results


def model_info(entry: ModelEntry, limits: Limits) -> service_pb2.ModelInfo:
    graph = entry.model.graph
    initializers = {i.name for i in graph.initializer}

    def info(vi) -> service_pb2.TensorInfo:
        t = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else ""
        return service_pb2.TensorInfo(name=vi.name, dtype=dtype, shape=[
            d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])

    pre = entry.preprocessing
    return service_pb2.ModelInfo(
        name=entry.name, description=entry.description,
        inputs=[info(vi) for vi in graph.input if vi.name not in initializers],
        outputs=[info(vi) for vi in graph.output], score_tensor=entry.runner.score_name,
        preprocessing=service_pb2.Preprocessing(
            fit=pre.fit, resize_shorter=pre.resize_shorter, scale=pre.scale, mean=pre.mean, std=pre.std,
            channel_order=pre.channel_order, layout=pre.layout, input_height=pre.height, input_width=pre.width),
        num_classes=entry.num_classes, labels=entry.labels,
        layers=[service_pb2.LayerInfo(
            name=layer.name, shape=[-1 if d is None else d for d in layer.shape], kind=layer.kind,
            grid_height=layer.grid[0], grid_width=layer.grid[1], prefix_tokens=layer.prefix_tokens,
            is_default=entry.default_layer is not None and layer.name == entry.default_layer.name,
            op_type=layer.op_type) for layer in entry.layers],
        execution_provider=entry.runner.provider, limits=limits_info(limits, entry.runner.max_batch, device_of(entry)),
        probabilities=entry.runner.probabilities)


def device_of(entry: ModelEntry) -> str:
    """The device a model's jobs queue for: its execution provider and device id."""
    provider = entry.runner.provider
    device_id = entry.runner.session.get_provider_options().get(provider, {}).get("device_id", "0")
    return f"{provider.removesuffix('ExecutionProvider').lower()}:{device_id}"


def limits_info(limits: Limits, max_batch: int, device: str = "") -> service_pb2.Limits:
    return service_pb2.Limits(
        max_image_pixels=limits.max_image_pixels, max_images=limits.max_images, max_methods=limits.max_methods,
        max_targets=limits.max_targets, max_batch=max_batch,
        max_concurrent_jobs=limits.max_concurrent_jobs, max_queued_jobs=limits.max_queued_jobs,
        max_message_bytes=limits.max_message_bytes, max_masks=limits.max_masks, max_steps=limits.max_steps,
        max_iterations=limits.max_iterations, max_job_bytes=limits.max_job_bytes,
        max_call_seconds=limits.max_call_seconds, max_reflection_streams=limits.max_reflection_streams, device=device)


def method_info(method: Method, limits: Limits) -> methods_pb2.MethodInfo:
    params = []
    for p in method.params:
        info = methods_pb2.ParamInfo(name=p.name, type=PARAM_TYPES[p.type], description=p.description,
                                     choices=list(p.choices))
        if p.type == "bool":
            info.default_bool = bool(p.default)
        elif p.type == "enum":
            info.default_string = str(p.default)
        elif p.default is not None:
            info.default_number = float(p.default)
        if p.minimum is not None:
            info.minimum = p.minimum
        maximum = validation.param_maximum(p, limits)
        if maximum is not None:
            info.maximum = maximum
        params.append(info)
    return methods_pb2.MethodInfo(name=method.name, family=method.family, description=method.description,
                                  reference=method.reference, uses_layer=method.uses_layer,
                                  uses_gradients=method.uses_gradients, params=params)
