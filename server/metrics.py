"""Prometheus metrics, served on their own port (`--metrics-port`, TOML `metrics_port`; 0 = off).

Each server has its own registry (several servers may live in one process, e.g. in tests). Names:

    onnxplain_calls_total{rpc, model, code}              calls by RPC, model and final gRPC status
    onnxplain_call_seconds{rpc, model}                   latency histogram of every call, refused ones included
    onnxplain_maps_total{model, method}                  final maps sent
    onnxplain_model_samples_total{model, pass}           samples through the model; pass = forward | backward
    onnxplain_model_runs_total{model}                    onnxruntime runs (batches)
    onnxplain_model_seconds_total{model}                 time inside onnxruntime runs
    onnxplain_streamed_bytes_total{rpc, model}           serialized bytes of response messages
    onnxplain_jobs_running{device}, onnxplain_jobs_queued{device}   admission state, read at scrape time
    onnxplain_job_slots{device, state}                   limits: state = running | queued

`model` is a served model's name, or "" for a request that names no served model (so that random names in
requests cannot grow the label set); `method` is a known method's name.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _AdmissionCollector:
    """Queue depth and in-flight jobs per device, read from the admission queues when scraped."""

    def __init__(self, admissions: Callable[[], dict]):
        self.admissions = admissions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("onnxplain_jobs_running", "jobs computing now", labels=["device"])
        queued = GaugeMetricFamily("onnxplain_jobs_queued", "jobs waiting for a compute slot", labels=["device"])
        slots = GaugeMetricFamily("onnxplain_job_slots", "admission limits", labels=["device", "state"])
        for device, admission in sorted(self.admissions().items()):
            running.add_metric([device], admission.running)
            queued.add_metric([device], admission.queued)
            slots.add_metric([device, "running"], admission.max_running)
            slots.add_metric([device, "queued"], admission.max_queued)
        yield from (running, queued, slots)


class Metrics:
    def __init__(self, admissions: Callable[[], dict] = dict):
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("onnxplain_calls", "calls by RPC, model and status", ["rpc", "model", "code"], registry=r)
        self.latency = Histogram("onnxplain_call_seconds", "call latency", ["rpc", "model"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.maps = Counter("onnxplain_maps", "final maps sent", ["model", "method"], registry=r)
        self.samples = Counter("onnxplain_model_samples", "samples run through the model", ["model", "pass"],
                               registry=r)
        self.runs = Counter("onnxplain_model_runs", "onnxruntime runs (batches)", ["model"], registry=r)
        self.model_seconds = Counter("onnxplain_model_seconds", "seconds inside onnxruntime runs", ["model"],
                                     registry=r)
        self.streamed = Counter("onnxplain_streamed_bytes", "serialized bytes of responses", ["rpc", "model"],
                                registry=r)
        r.register(_AdmissionCollector(admissions))
        self._http = None

    def observer(self, model: str) -> Callable[[int, bool, float], None]:
        """A `Passes.observer` that counts every model run of a job as it ends."""
        forward, backward = self.samples.labels(model, "forward"), self.samples.labels(model, "backward")
        runs, seconds = self.runs.labels(model), self.model_seconds.labels(model)

        def observe(samples: int, is_backward: bool, elapsed: float) -> None:
            (backward if is_backward else forward).inc(samples)
            runs.inc()
            seconds.inc(elapsed)

        return observe

    def call_ended(self, rpc: str, model: str, code: str, seconds: float) -> None:
        self.calls.labels(rpc, model, code).inc()
        self.latency.labels(rpc, model).observe(seconds)

    # ------------------------------------------------------------------------------------------ exposition

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on (host, port) in a daemon thread; returns the port (0 picks a free one)."""
        self._http, thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            http.shutdown()
            http.server_close()
