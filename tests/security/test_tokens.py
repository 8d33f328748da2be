"""Bearer tokens with roles on a real server on loopback: missing, wrong, wrong role and right role, for the
Explainer (role `explain`) and the Admin service (role `admin`); health and reflection stay open; no token ever
reaches the logs."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxplain.v1 import admin_pb2, admin_pb2_grpc, service_pb2, service_pb2_grpc

from support import default_model_config

EXPLAIN = "explain-token-3f6c0a8e9b1d4c27"
ADMIN = "admin-token-9a8b7c6d5e4f3021"
ENV_EXPLAIN = "env-token-5d2e1f0a9b8c7d6e"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from onnxplain.server.config import Limits, Security, ServerConfig
    from onnxplain.server.main import Server

    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"# token  roles\n{EXPLAIN} explain\n\n{ADMIN}   explain,admin\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("ONNXPLAIN_TOKENS", f"{ENV_EXPLAIN} explain")
    try:
        srv = Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(), models=(default_model_config(),),
                                  security=Security(tokens_file=tokens))).start()
    finally:
        mp.undo()
    yield srv
    srv.stop(0)


def call(address: str, rpc: str, token: str | None, header: str | None = None):
    metadata = [("authorization", header if header is not None else f"Bearer {token}")] if (token or header) else None
    with grpc.insecure_channel(address) as channel:
        if rpc == "explainer":
            return service_pb2_grpc.ExplainerStub(channel).ListModels(service_pb2.ListModelsRequest(),
                                                                      metadata=metadata, timeout=10)
        if rpc == "explain-stream":
            return list(service_pb2_grpc.ExplainerStub(channel).Explain(service_pb2.ExplainRequest(model="nope"),
                                                                         metadata=metadata, timeout=10))
        return admin_pb2_grpc.AdminStub(channel).ReloadModel(admin_pb2.ReloadModelRequest(name="shapes"),
                                                             metadata=metadata, timeout=30)


def code_of(address, rpc, token, header=None):
    try:
        call(address, rpc, token, header)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("rpc, token, header, expected", [
    ("explainer", None, None, "UNAUTHENTICATED"),
    ("explainer", "not-a-token-at-all-0000", None, "UNAUTHENTICATED"),
    ("explainer", EXPLAIN[:-1], None, "UNAUTHENTICATED"),              # a prefix of a real token
    ("explainer", None, f"Basic {EXPLAIN}", "UNAUTHENTICATED"),        # not a bearer token
    ("explainer", None, "Bearer ", "UNAUTHENTICATED"),
    ("explainer", EXPLAIN, None, "OK"),
    ("explainer", None, f"bearer {EXPLAIN}", "OK"),                    # the scheme is case-insensitive
    ("explainer", ENV_EXPLAIN, None, "OK"),                            # from ONNXPLAIN_TOKENS
    ("explainer", ADMIN, None, "OK"),
    ("explain-stream", None, None, "UNAUTHENTICATED"),
    ("explain-stream", EXPLAIN, None, "NOT_FOUND"),                    # past auth: the model "nope" is unknown
    ("admin", None, None, "UNAUTHENTICATED"),
    ("admin", "not-a-token-at-all-0000", None, "UNAUTHENTICATED"),
    ("admin", EXPLAIN, None, "PERMISSION_DENIED"),
    ("admin", ENV_EXPLAIN, None, "PERMISSION_DENIED"),
    ("admin", ADMIN, None, "OK"),
])
def test_token_and_role(server, rpc, token, header, expected):
    assert code_of(server.address, rpc, token, header).name == expected


def test_health_and_reflection_need_no_token(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answers = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        services = {s.name for s in answers[0].list_services_response.service}
        assert {"onnxplain.v1.Explainer", "onnxplain.v1.Admin"} <= services


def test_denied_messages_tell_what_is_needed(server):
    with pytest.raises(grpc.RpcError) as info:
        call(server.address, "admin", EXPLAIN)
    assert "admin" in info.value.details() and EXPLAIN not in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        call(server.address, "explainer", None)
    assert "Bearer" in info.value.details()


def test_no_secret_reaches_the_logs(tmp_path, caplog, pki):
    """Start a server with tokens and TLS, make good and bad calls, fail a tokens file: logs name no secret."""
    from onnxplain.server.config import ConfigError, Limits, Security, ServerConfig
    from onnxplain.server.main import Server
    from onnxplain.server.security import load_tokens

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{EXPLAIN} explain\n{ADMIN} admin,explain\n")
    caplog.set_level(logging.DEBUG)
    srv = Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(), models=(default_model_config(),),
                              security=Security(tokens_file=tokens))).start()
    try:
        for token in (EXPLAIN, ADMIN, "wrong-token-wrong-token-1", None):
            for rpc in ("explainer", "admin"):
                code_of(srv.address, rpc, token)
    finally:
        srv.stop(0)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{ADMIN} root\n")
    with pytest.raises(ConfigError) as info:
        load_tokens(bad, environ={})
    assert ADMIN not in str(info.value) and "root" in str(info.value)
    with pytest.raises(ConfigError, match="at least 16") as info:
        load_tokens(None, environ={"ONNXPLAIN_TOKENS": "short explain"})
    assert "short" not in str(info.value)
    logs = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "refused /onnxplain.v1.Admin/ReloadModel" in logs          # the refusals are logged ...
    for secret in (EXPLAIN, ADMIN, "wrong-token-wrong-token-1", pki.server_key.read_text().splitlines()[1]):
        assert secret not in logs                                      # ... without any secret
    from onnxplain.client.auth import BearerToken
    assert EXPLAIN not in repr(BearerToken(EXPLAIN))


def test_tokens_file_format_errors(tmp_path):
    from onnxplain.server.config import ConfigError
    from onnxplain.server.security import load_tokens

    for text, message in [("abcdefghijklmnopqrstu\n", "token role"), ("abcdefghijklmnopqrstu admin extra\n", "token role"),
                          ("abcdefghijklmnopqrstu explain,superuser\n", "roles must be among")]:
        path = tmp_path / "t.txt"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_tokens(path, environ={})
    with pytest.raises(ConfigError, match="tokens file .*nothing.txt"):
        load_tokens(tmp_path / "nothing.txt", environ={})
    assert load_tokens(None, environ={}) == []
    two = load_tokens(None, environ={"ONNXPLAIN_TOKENS": "abcdefghijklmnopqrstu explain; vwxyzabcdefghijklmno admin"})
    assert [sorted(t.roles) for t in two] == [["explain"], ["admin"]]
