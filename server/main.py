"""`onnxplain-server`: serve the configured models (the shipped default model when none is configured)."""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onnxplain.v1 import admin_pb2, admin_pb2_grpc, service_pb2, service_pb2_grpc

from . import config as config_module
from . import logs
from .config import ConfigError, ServerConfig
from .admin import Admin
from .admission import ReflectionStreams
from .registry import load_registry
from .security import TokenAuth, load_tokens, server_credentials
from .service import Explainer, MalformedRequests

log = logging.getLogger("onnxplain.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name
ADMIN_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
DRAIN_SETTLE = 0.25   # seconds between NOT_SERVING and closing the port at shutdown (within the grace period)
LOOPBACK = {"127.0.0.1", "::1", "localhost", "[::1]"}
# Threads for calls that are neither jobs nor reflection streams (Check, ListModels, GetModel, Admin, refusals), and
# for Explain streams still sending to slow readers after their job ended. Generous (idle threads cost little, and
# are only made when needed): a call refused past the pool is answered by gRPC itself, which the metrics and logs
# never see, so ordinary overload should meet the admission queue's refusal first.
SHORT_CALL_THREADS = 32


class Server:
    """A running gRPC server: the Explainer, health checking and reflection on one port."""

    def __init__(self, config: ServerConfig):
        self.config = config
        limits = config.limits
        security = config.security
        self.registry = load_registry(config.models, limits, config.provider, config.threads,
                                      roots=config.model_dirs, allowed_domains=security.allowed_domains,
                                      fail_fast=config.fail_fast)
        credentials = server_credentials(security.tls_cert, security.tls_key, security.tls_client_ca)
        tokens = load_tokens(security.tokens_file)
        interceptors = [TokenAuth(tokens)] if tokens else []
        if tokens:
            log.info("bearer-token auth on: %d tokens", len(tokens))
        elif config.host not in LOOPBACK:
            log.warning("no tokens configured: anyone who reaches %s may call every service, Admin included",
                        config.host)
        self.explainer = Explainer(self.registry, limits)
        # unparsable request bytes: INVALID_ARGUMENT, not INTERNAL; counted in the metrics like any other call
        interceptors.append(MalformedRequests(self.explainer.metrics))
        # keepalive, idle and age limits: connections whose peer vanished or that never end are reclaimed
        # (config.Connections); a call's own length is capped by the servicer (limits.max_call_seconds)
        options = [("grpc.max_receive_message_length", limits.max_message_bytes),
                   ("grpc.max_send_message_length", limits.max_message_bytes),
                   ("grpc.so_reuseport", 0), *config.connections.options(limits)]
        interceptors.append(ReflectionStreams(limits.max_reflection_streams))
        # Waiting jobs hold a thread, so the pool has room for every running and queued job, the reflection streams
        # and short calls (health Watch streams hold none). A call past the pool is refused with RESOURCE_EXHAUSTED
        # ("Concurrent RPC limit exceeded!", gRPC's words) rather than left waiting, unanswered, for a thread.
        workers = (limits.max_concurrent_jobs + limits.max_queued_jobs + limits.max_reflection_streams
                   + SHORT_CALL_THREADS)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxplain"),
                                options=options, interceptors=interceptors, maximum_concurrent_rpcs=workers)
        admin_pb2_grpc.add_AdminServicer_to_server(Admin(self.registry), self.grpc)
        service_pb2_grpc.add_ExplainerServicer_to_server(self.explainer, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, ADMIN_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc)
        address = f"{config.host}:{config.port}"
        self.tls = credentials is not None
        self.port = (self.grpc.add_secure_port(address, credentials) if credentials is not None
                     else self.grpc.add_insecure_port(address))
        if self.port == 0:
            raise ConfigError(f"cannot listen on {config.host}:{config.port}")
        self.metrics_port = 0   # the port of /metrics once started (config.metrics_port; 0 = off)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "Server":
        if self.config.metrics_port:
            try:
                self.metrics_port = self.explainer.metrics.serve(self.config.host, self.config.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {exc}")
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", self.registry.names, self.address)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let running calls finish within `grace` seconds."""
        self.explainer.draining.set()
        self.health.enter_graceful_shutdown()
        if grace:
            # Calls that reached the port but no handler yet when gRPC stops are cancelled by gRPC itself; for a
            # moment, the servicer answers every new call UNAVAILABLE while clients see NOT_SERVING and go away.
            time.sleep(min(grace, DRAIN_SETTLE))
        self.grpc.stop(grace).wait()
        self.explainer.cap.stop()
        self.explainer.metrics.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onnxplain-server", description=__doc__)
    parser.add_argument("--config", type=pathlib.Path, help="server TOML (limits, [[models]], model_dirs)")
    parser.add_argument("--model-dir", type=pathlib.Path, action="append", default=[],
                        help="serve every model in this directory (repeatable)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    parser.add_argument("--provider", choices=("auto", "cpu"), help="execution provider (default auto: CUDA if present)")
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--max-queued-jobs", type=int)
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--max-image-pixels", type=int)
    parser.add_argument("--max-message-bytes", type=int)
    parser.add_argument("--max-call-seconds", type=int,
                        help="end a call without an earlier deadline after this long, DEADLINE_EXCEEDED (default 600)")
    parser.add_argument("--fail-fast", action="store_true", default=None,
                        help="exit when any configured model cannot be loaded (default: report it, serve the others)")
    parser.add_argument("--allow-domain", action="append", default=[], dest="allowed_domains",
                        help="custom operator domain models may use (repeatable; default: none)")
    parser.add_argument("--tls-cert", type=pathlib.Path, help="server certificate (PEM); with --tls-key: TLS")
    parser.add_argument("--tls-key", type=pathlib.Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=pathlib.Path,
                        help="CA (PEM) that client certificates must chain to: mutual TLS")
    parser.add_argument("--tokens-file", type=pathlib.Path,
                        help="`token role[,role]` lines (roles: explain, admin); also ONNXPLAIN_TOKENS; none: auth off")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds running calls get at shutdown")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 or absent: off)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines, or one JSON object per line with the call's request id")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        config = config_module.load(args.config, args.model_dir, host=args.host, port=args.port,
                                    provider=args.provider, metrics_port=args.metrics_port,
                                    max_concurrent_jobs=args.max_concurrent_jobs,
                                    max_queued_jobs=args.max_queued_jobs, max_batch=args.max_batch,
                                    max_image_pixels=args.max_image_pixels, max_message_bytes=args.max_message_bytes,
                                    max_call_seconds=args.max_call_seconds,
                                    fail_fast=args.fail_fast, allowed_domains=tuple(args.allowed_domains),
                                    tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                    tokens_file=args.tokens_file)
        server = Server(config).start()
    except (ConfigError, OSError) as exc:
        print(f"onnxplain-server: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):   # before the line that says the server serves
        signal.signal(sig, lambda *_: stop.set())
    print(f"onnxplain-server: serving {', '.join(server.registry.names)} on {server.address}", flush=True)
    # Python runs a signal's handler in the main thread, and only between bytecodes: a SIGTERM that the kernel
    # delivers to another thread (gRPC's, onnxruntime's) while this one sleeps in an untimed wait would never be
    # acted on. Waking up every half second lets the handler run.
    while not stop.wait(0.5):
        pass
    log.info("shutting down (grace %.1f s)", args.grace)
    server.stop(args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
