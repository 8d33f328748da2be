"""The Python client and the CLI with credentials: token (argument, --token, $ONNXPLAIN_TOKEN), TLS and mutual
TLS, and `onnxplain admin load|unload|reload`, against one real server with mTLS and tokens."""

from __future__ import annotations

import shutil

import grpc
import pytest

from onnxplain.client import Client
from onnxplain.client.cli import main as cli

from support import default_model_config

EXPLAIN = "client-explain-token-0123456789"
ADMIN = "client-admin-token-abcdefghijkl"


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    from onnxplain.server.config import Limits, ModelConfig, Security, ServerConfig
    from onnxplain.server.main import Server

    directory = tmp_path_factory.mktemp("models")
    shapes = default_model_config()
    shutil.copy(shapes.path, directory / "shapes.onnx")
    shutil.copy(shapes.labels, directory / "shapes.txt")
    tokens = directory.parent / "tokens.txt"
    tokens.write_text(f"{EXPLAIN} explain\n{ADMIN} explain,admin\n")
    security = Security(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, tokens_file=tokens)
    srv = Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(), security=security, model_dirs=(directory,),
                              models=(ModelConfig("shapes", directory / "shapes.onnx", directory / "shapes.txt", "",
                                                  shapes.preprocessing),))).start()
    yield srv
    srv.stop(0)


def tls(pki) -> dict:
    return dict(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)


def test_client_with_token_and_mtls(server, pki):
    with Client(server.address, timeout=30, token=EXPLAIN, **tls(pki)) as client:
        assert [m.name for m in client.models()] == ["shapes"]
        with pytest.raises(grpc.RpcError) as info:
            client.reload_model("shapes")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with Client(server.address, timeout=30, token=ADMIN, **tls(pki)) as client:
        assert client.reload_model("shapes").name == "shapes"
        assert client.load_model("shapes.onnx", name="second").num_classes == 8
        assert client.unload_model("second").name == "second"
        assert [m.name for m in client.models()] == ["shapes"]


def test_client_token_from_the_environment(server, pki, monkeypatch):
    monkeypatch.setenv("ONNXPLAIN_TOKEN", EXPLAIN)
    with Client(server.address, timeout=30, **tls(pki)) as client:
        assert client.predict("shapes", [default_model_config().path.parent / "samples" / "star.png"], 1)[0].top[0].label == "star"
    monkeypatch.delenv("ONNXPLAIN_TOKEN")
    with Client(server.address, timeout=30, **tls(pki)) as client, pytest.raises(grpc.RpcError) as info:
        client.models()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_admin_with_credentials(server, pki, capsys, monkeypatch):
    monkeypatch.delenv("ONNXPLAIN_TOKEN", raising=False)
    common = ["--server", server.address, "--timeout", "60", "--tls-ca", str(pki.ca), "--tls-cert",
              str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli([*common, "--token", ADMIN, "admin", "reload", "shapes"]) == 0
    assert "reloaded shapes" in capsys.readouterr().out
    assert cli([*common, "--token", ADMIN, "admin", "load", "shapes.onnx", "--name", "other"]) == 0
    assert cli([*common, "--token", ADMIN, "admin", "unload", "other"]) == 0
    assert "unloaded other" in capsys.readouterr().out
    assert cli([*common, "--token", EXPLAIN, "admin", "reload", "shapes"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli([*common, "admin", "reload", "shapes"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("ONNXPLAIN_TOKEN", EXPLAIN)
    assert cli([*common, "models"]) == 0
    assert capsys.readouterr().out.startswith("shapes")
    assert cli([*common, "--token", ADMIN, "admin", "load", "../../etc/passwd"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    # without the client certificate the TLS handshake fails: UNAVAILABLE
    assert cli(["--server", server.address, "--timeout", "5", "--tls-ca", str(pki.ca), "models"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
