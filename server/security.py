"""Who may call: TLS / mutual TLS credentials and bearer tokens with roles.

Tokens come from a file (`--tokens-file`, `[security] tokens_file`) and/or the environment (`ONNXPLAIN_TOKENS`),
one token a line (`;` also separates entries in the environment), each followed by its roles:

    # token                             roles
    3f6c0a8e9b1d4c27a5e8f0b2c4d6e8fa    explain
    9a8b7c6d5e4f30211f2e3d4c5b6a7988    explain,admin

Roles: `explain` may call the Explainer service, `admin` the Admin service (model management). Health checking and
reflection stay open so that probes and tools work without a token. With no token configured, authentication is
off: the server then listens on loopback by default and anyone who can reach the port may call it.

A call sends `authorization: Bearer <token>` metadata. Missing or unknown token -> UNAUTHENTICATED; a known
token without the method's role -> PERMISSION_DENIED. The token is compared in constant time with every
configured token (SHA-256 digests and hmac.compare_digest, no early exit), and no token, key or header value is
ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pathlib
from dataclasses import dataclass

import grpc

from .config import ConfigError

log = logging.getLogger("onnxplain.server")

ROLES = ("explain", "admin")
MIN_TOKEN_LENGTH = 16
# The role each service needs; services listed in OPEN need none. Any other service needs `admin`.
SERVICE_ROLES = {"onnxplain.v1.Explainer": "explain", "onnxplain.v1.Admin": "admin"}
OPEN = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}


@dataclass(frozen=True)
class Token:
    digest: bytes                  # SHA-256 of the token; the token itself is not kept
    roles: frozenset[str]


def parse_tokens(text: str, origin: str, separators: str = "\n") -> list[Token]:
    """Tokens from `token role[,role]` lines. Errors name the origin and line, never the token."""
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    tokens = []
    for number, line in enumerate(text.split(separators[0]), 1):
        line = line.strip()
        if not line or line.startswith("#"):   # a comment is a whole line: a token may hold a '#'
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{origin}: entry {number} must be `token role[,role]` (token, one space, roles)")
        token, roles = parts[0], {r.strip() for r in parts[1].split(",") if r.strip()}
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{origin}: entry {number}: a token needs at least {MIN_TOKEN_LENGTH} characters")
        unknown = roles - set(ROLES)
        if unknown or not roles:
            raise ConfigError(f"{origin}: entry {number}: roles must be among {list(ROLES)}, got {sorted(roles)}")
        tokens.append(Token(hashlib.sha256(token.encode()).digest(), frozenset(roles)))
    return tokens


def load_tokens(tokens_file: pathlib.Path | None, environ: dict | None = None) -> list[Token]:
    environ = os.environ if environ is None else environ
    tokens = []
    if tokens_file is not None:
        try:
            text = pathlib.Path(tokens_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"tokens file {tokens_file}: {exc.strerror or exc}") from None
        tokens += parse_tokens(text, f"tokens file {tokens_file}")
    if environ.get("ONNXPLAIN_TOKENS"):
        tokens += parse_tokens(environ["ONNXPLAIN_TOKENS"], "ONNXPLAIN_TOKENS", "\n;")
    return tokens


def roles_of(presented: str, tokens: list[Token]) -> frozenset[str] | None:
    """The roles of the presented token, None when it is unknown. Every configured token is compared."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    roles: frozenset[str] | None = None
    for token in tokens:
        if hmac.compare_digest(digest, token.digest):
            roles = token.roles
    return roles


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def unary(request, context):
        context.abort(code, message)

    def streaming(request_iterator, context):
        context.abort(code, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unary, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


class TokenAuth(grpc.ServerInterceptor):
    """Bearer-token authentication and role checks, before the servicer sees the call."""

    def __init__(self, tokens: list[Token]):
        self.tokens = list(tokens)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method            # "/package.Service/Method"
        service = method.lstrip("/").split("/", 1)[0]
        if service in OPEN:
            return handler
        needed = SERVICE_ROLES.get(service, "admin")
        header = next((value for key, value in handler_call_details.invocation_metadata or ()
                       if key == "authorization"), None)
        if not isinstance(header, str) or not header[:7].lower() == "bearer " or not header[7:].strip():
            log.warning("refused %s: no bearer token", method)
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                           "this server needs a bearer token: send `authorization: Bearer <token>` metadata "
                           "(onnxplain --token or ONNXPLAIN_TOKEN)")
        roles = roles_of(header[7:].strip(), self.tokens)
        if roles is None:
            log.warning("refused %s: unknown token", method)
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        if needed not in roles:
            log.warning("refused %s: token lacks role %s", method, needed)
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{service} needs the `{needed}` role; this token has {sorted(roles)}")
        return handler


def _read(path: pathlib.Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def server_credentials(cert: pathlib.Path | None, key: pathlib.Path | None,
                       client_ca: pathlib.Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials (None for a plaintext port); with a client CA, clients must present a certificate
    signed by it (mutual TLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key")
    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
                                       root_certificates=_read(client_ca, "TLS client CA"),
                                       require_client_auth=client_ca is not None)
