"""TLS and mutual TLS on a real server on loopback, with certificates made at test time (conftest.py)."""

from __future__ import annotations

import grpc
import pytest

from onnxplain.v1 import service_pb2, service_pb2_grpc

from support import default_model_config


def start(security):
    from onnxplain.server.config import Limits, ServerConfig
    from onnxplain.server.main import Server

    return Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(), models=(default_model_config(),),
                               security=security)).start()


def list_models(address: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = service_pb2_grpc.ExplainerStub(channel)
        return [m.name for m in stub.ListModels(service_pb2.ListModelsRequest(), timeout=5).models]


def creds(ca=None, cert=None, key=None) -> grpc.ChannelCredentials:
    read = lambda p: None if p is None else p.read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


@pytest.fixture(scope="module")
def tls_server(pki):
    from onnxplain.server.config import Security

    server = start(Security(tls_cert=pki.server_cert, tls_key=pki.server_key))
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def mtls_server(pki):
    from onnxplain.server.config import Security

    server = start(Security(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca))
    yield server
    server.stop(0)


def test_tls_serves_a_client_that_trusts_the_ca(tls_server, pki):
    assert tls_server.tls
    assert list_models(tls_server.address, creds(pki.ca)) == ["shapes"]
    assert list_models(f"localhost:{tls_server.port}", creds(pki.ca)) == ["shapes"]


def test_tls_client_with_the_wrong_ca_is_refused(tls_server, pki):
    with pytest.raises(grpc.RpcError) as info:
        list_models(tls_server.address, creds(pki.other_ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_port(tls_server):
    with pytest.raises(grpc.RpcError) as info:
        list_models(tls_server.address, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_with_a_certificate_from_the_client_ca(mtls_server, pki):
    assert list_models(mtls_server.address, creds(pki.ca, pki.client_cert, pki.client_key)) == ["shapes"]


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_a_client_without_a_good_certificate(mtls_server, pki, who):
    cert, key = (None, None) if who == "no certificate" else (pki.rogue_cert, pki.rogue_key)
    with pytest.raises(grpc.RpcError) as info:
        list_models(mtls_server.address, creds(pki.ca, cert, key))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # and the server still serves a good client afterwards
    assert list_models(mtls_server.address, creds(pki.ca, pki.client_cert, pki.client_key)) == ["shapes"]


def test_tls_configuration_errors_are_clear(pki, tmp_path):
    from onnxplain.server.config import ConfigError, Security

    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        start(Security(tls_cert=pki.server_cert))
    with pytest.raises(ConfigError, match="needs tls_cert and tls_key"):
        start(Security(tls_client_ca=pki.ca))
    with pytest.raises(ConfigError, match="TLS key .*missing.key"):
        start(Security(tls_cert=pki.server_cert, tls_key=tmp_path / "missing.key"))
