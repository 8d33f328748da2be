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


class WatchStreams(grpc.ServerInterceptor):
    """At most `limit` streams open at once among the services the server hosts but whose calls no job admission
    bounds: health Watch and reflection (onnxplain's own Explain streams are jobs, and capped in time). gRPC's sync
    server gives every open stream a thread of its pool for as long as the client keeps it: client-side health
    checking keeps one Watch per connection, for the connection's life. Unbounded, a few dozen such streams took
    every thread, and the server answered nothing else, health Check included. Past the limit a stream is refused
    at once with RESOURCE_EXHAUSTED; the pool has `limit` threads for them beyond the jobs' and the short calls'."""

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

        def run(request, context):
            with self._lock:
                admitted = self.open < self.limit
                self.open += admitted
            if not admitted:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.limit} health Watch and reflection streams are open, the server's limit "
                              f"(limits.max_watch_streams): close one, or poll health with Check")
            if not context.add_callback(self._closed):   # the call has already ended
                self._closed()
            return behaviour(request, context)

        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(run, handler.request_deserializer, handler.response_serializer)
