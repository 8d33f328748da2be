"""Credentials of the thin client: TLS / mutual TLS channel credentials, and a bearer token sent on every call.

    Client("server:50051", token="...", tls_ca="ca.crt")                          # TLS + token
    Client("server:50051", tls_ca="ca.crt", tls_cert="me.crt", tls_key="me.key")  # mutual TLS

The token goes in `authorization: Bearer <token>` metadata (see server/security.py). Over a plaintext channel it
travels in clear: use TLS whenever the server is not on loopback.
"""

from __future__ import annotations

import collections
import os
import pathlib

import grpc

TOKEN_ENV = "ONNXPLAIN_TOKEN"


def _read(path) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()


def channel_credentials(tls_ca=None, tls_cert=None, tls_key=None) -> grpc.ChannelCredentials:
    """TLS credentials: `tls_ca` (PEM) verifies the server (None: the system's roots); `tls_cert` and `tls_key`
    (PEM) are this client's certificate for mutual TLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:   # never show the token
        return "BearerToken(***)"

    def _details(self, d):
        metadata = [*(d.metadata or ()), self._header]
        return _Details(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                        getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """`channel` sending `token` on every call; the token defaults to $ONNXPLAIN_TOKEN (none: unchanged)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel
