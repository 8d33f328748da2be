"""Admission: at most `running` jobs compute at once and at most `queued` wait; past that a job is refused
at once (RESOURCE_EXHAUSTED) rather than piling up."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Callable, Iterator

import grpc


class Exhausted(Exception):
    pass


class Gone(Exception):
    """The caller went away (cancelled, or its deadline passed) before the call was done. The servicer asks the
    call's context which of the two it was: this code cannot tell, and the status recorded must be the one the
    client saw (DEADLINE_EXCEEDED or CANCELLED)."""


class Admission:
    def __init__(self, running: int, queued: int):
        self.max_running = running
        self.max_queued = queued
        self.running = 0
        self.queued = 0
        self._cond = threading.Condition()
        # A job decodes its images in its slot, one at a time, on these threads rather than on the call's own:
        # glibc keeps the memory a thread freed in that thread's arena, and a decoded 40-Mpx image is ~120 MB, so
        # decoding on any of the server's 18+ call threads grew the process to 2.6 GB under 8 concurrent calls of
        # such images; on `running` threads the same storm peaks under 0.5 GB.
        self.decoder = ThreadPoolExecutor(max_workers=running, thread_name_prefix="onnxplain-decode")

    def refuse_if_full(self) -> None:
        """Raise Exhausted at once when every slot runs and the queue is full: a call past capacity is refused
        before its images are decoded and checked, so that a storm of refused calls costs the server little.
        (A read without the lock: slot() decides for real; this only sheds load early.)"""
        if self.running >= self.max_running and self.queued >= self.max_queued:
            raise Exhausted(f"server at capacity: {self.running} jobs running, {self.queued} queued "
                            f"(limits {self.max_running} and {self.max_queued})")

    @contextlib.contextmanager
    def slot(self, still_wanted: Callable[[], bool]) -> Iterator[float]:
        """Hold a compute slot for the body; yields the seconds spent waiting. Raises Exhausted when the queue
        is full, and Gone when the caller went away (cancelled, deadline) while waiting."""
        start = time.perf_counter()
        with self._cond:
            if self.running >= self.max_running:
                if self.queued >= self.max_queued:
                    raise Exhausted(f"server at capacity: {self.running} jobs running, {self.queued} queued "
                                    f"(limits {self.max_running} and {self.max_queued})")
                self.queued += 1
                try:
                    while self.running >= self.max_running:
                        self._cond.wait(timeout=0.05)
                        if not still_wanted():
                            raise Gone("the call ended while waiting for a slot")
                finally:
                    self.queued -= 1
            self.running += 1
        try:
            yield time.perf_counter() - start
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify()


def non_blocking_like(behaviour, wrapper):
    """`wrapper` (which takes gRPC's send_response_callback after the context when given one) marked as gRPC's
    non-blocking streaming behaviour when `behaviour` is one. Health's Watch is: the sync server hands it a callback
    and takes its thread back, so an open Watch holds no thread; a wrapper without the mark turned every Watch into
    a thread held for the stream's life."""
    for name in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behaviour, name):
            setattr(wrapper, name, getattr(behaviour, name))
    return wrapper


class ReflectionStreams(grpc.ServerInterceptor):
    """At most `limit` reflection streams open at once. gRPC's sync server gives a stream a thread of its pool for
    as long as its client keeps it open, and reflection's streams are bidirectional: a client may keep one for
    ever. Unbounded, a few dozen took every thread and the server answered nothing else, health Check included.
    Past the limit a stream is refused at once with RESOURCE_EXHAUSTED; the pool has `limit` threads for them beyond
    the jobs' and the short calls'. The rule covers any stream, other than onnxplain's own, that holds a thread
    (onnxplain's Explain streams are jobs, and capped in time); health Watch holds none (non_blocking_like)."""

    def __init__(self, limit: int, own_prefix: str = "/onnxplain."):
        self.limit = limit
        self.own_prefix = own_prefix
        self.open = 0
        self._lock = threading.Lock()

    def _closed(self) -> None:
        with self._lock:
            self.open -= 1

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or not handler.response_streaming
                or handler_call_details.method.startswith(self.own_prefix)):
            return handler
        behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream
        if getattr(behaviour, "experimental_non_blocking", False):
            return handler

        def run(request, context):
            with self._lock:
                admitted = self.open < self.limit
                self.open += admitted
            if not admitted:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.limit} reflection streams are open, the server's limit "
                              f"(limits.max_reflection_streams): close one and retry")
            if not context.add_callback(self._closed):   # the call has already ended
                self._closed()
            return behaviour(request, context)

        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(run, handler.request_deserializer, handler.response_serializer)
