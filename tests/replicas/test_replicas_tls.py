"""Replicas serving TLS: `onnxplain health` and `onnxplain audit` over two of them speak TLS with the CLI's
--tls-ca, as every other command does, and plaintext health checks are refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import pathlib

import pytest

from support import ROOT, default_model_config

from onnxplain.client import cli

SAMPLES = ROOT / "onnxplain" / "default_model" / "samples"


def certificates(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "onnxplain test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    server = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                   server_key.public_key(), ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_replicas(tmp_path_factory):
    from onnxplain.server.config import Limits, Security, ServerConfig
    from onnxplain.server.main import Server

    ca, cert, key = certificates(tmp_path_factory.mktemp("pki"))
    servers = [Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(max_concurrent_jobs=2),
                                   models=(default_model_config(),),
                                   security=Security(tls_cert=cert, tls_key=key))).start() for _ in range(2)]
    yield ca, servers
    for s in servers:
        s.stop(0)


def test_health_and_audit_over_tls_replicas(tls_replicas, tmp_path, capsys):
    ca, servers = tls_replicas
    addresses = [arg for s in servers for arg in ("--server", s.address)]
    assert cli.main([*addresses, "--tls-ca", str(ca), "--timeout", "10", "health"]) == 0
    assert capsys.readouterr().out.count(": SERVING") == 2
    assert cli.main(["--server", servers[0].address, "--timeout", "3", "health"]) == 1   # plaintext: refused
    out = tmp_path / "audit"
    assert cli.main([*addresses, "--tls-ca", str(ca), "audit", str(SAMPLES), "--model", "shapes", "--methods",
                     "gradcam", "--metrics", "ad,del", "--steps", "4", "--out", str(out), "--quiet"]) == 0
    records = [json.loads(p.read_text()) for p in (out / "items").glob("*.json")]
    assert len(records) == len(list(SAMPLES.glob("*.png"))) == 4
    assert [sum(j.rpc == "Evaluate" for j in s.explainer.jobs) >= 1 for s in servers] == [True, True]
