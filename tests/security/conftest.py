"""Certificates made at test time (cryptography): two independent CAs, a server certificate for 127.0.0.1 /
localhost signed by the first, and a client certificate from each CA."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Pki:
    ca: pathlib.Path              # signs the server and the good client
    other_ca: pathlib.Path        # an unrelated CA
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path     # signed by `ca`
    client_key: pathlib.Path
    rogue_cert: pathlib.Path      # signed by `other_ca`
    rogue_key: pathlib.Path


def _write(directory: pathlib.Path, name: str, cert, key) -> tuple[pathlib.Path, pathlib.Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _certificate(subject: str, issuer_name, issuer_key, *, ca: bool, key=None, san=None, server=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    from cryptography import x509

    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _certificate("onnxplain test CA", None, None, ca=True)
    other_cert, other_key = _certificate("some other CA", None, None, ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert, server_key = _certificate("onnxplain server", ca_cert.subject, ca_key, ca=False, san=san, server=True)
    client_cert, client_key = _certificate("onnxplain client", ca_cert.subject, ca_key, ca=False)
    rogue_cert, rogue_key = _certificate("rogue client", other_cert.subject, other_key, ca=False)
    ca, _ = _write(directory, "ca", ca_cert, ca_key)
    other, _ = _write(directory, "other-ca", other_cert, other_key)
    return Pki(ca, other, *_write(directory, "server", server_cert, server_key),
               *_write(directory, "client", client_cert, client_key), *_write(directory, "rogue", rogue_cert, rogue_key))
