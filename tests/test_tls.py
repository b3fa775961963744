"""Outbound TLS as operators need it (issue 23 item 14): a private CA (SMT_CA_BUNDLE) and a client certificate
(SMT_CLIENT_CERT, SMT_CLIENT_KEY) for an https target, checked by doctor, and a TLS failure said plainly.

A real TLS server on 127.0.0.1 (Python's ssl over http.server) whose certificate is signed by a CA made here,
and which requires a client certificate signed by that CA: `post` delivers through it only with both.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import write_csv

Run = Callable[..., subprocess.CompletedProcess[str]]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    signer_name, signer_key = issuer or (subject, key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(signer_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def _write(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    path.write_bytes(out)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("smt-watch test CA", ca_key, None, ca=True)
    d = tmp_path / "pki"
    d.mkdir()
    return {
        "ca": _write(d / "ca.pem", ca),
        "server": _write(d / "server.pem", _cert("127.0.0.1", server_key, ("smt-watch test CA", ca_key),
                                                  ip="127.0.0.1"), server_key),
        "client_cert": _write(d / "client.pem", _cert("droplet", client_key, ("smt-watch test CA", ca_key))),
        "client_key": _write(d / "client.key", client_key),
    }


@pytest.fixture
def tls_server(pki: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """An https upload target that requires a client certificate from the test CA; yields its URL and the
    client subjects of the uploads it took."""
    took: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            took.append(dict(x[0] for x in peer["subject"])["commonName"])
            body = json.dumps({"ok": True, "message": "stored"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(pki["server"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/upload", took
    finally:
        server.shutdown()
        server.server_close()


def test_a_private_ca_and_a_client_certificate_deliver_and_doctor_checks_them(
        run_cli: Run, tmp_path: Path, pki: dict[str, Path], tls_server: tuple[str, list[str]]) -> None:
    url, took = tls_server
    target = {"SMT_UPLOAD_URL": url, "SMT_RETRY_ATTEMPTS": "1", "SMT_PATTERNS": "*.csv"}
    f = write_csv(tmp_path / "tls_M1.csv")
    untrusted = run_cli("post", str(f), env=target)
    assert untrusted.returncode == 1 and "TLS: the server's certificate is not trusted" in untrusted.stdout + \
        untrusted.stderr, untrusted.stdout + untrusted.stderr
    no_client = run_cli("post", str(f), env={**target, "SMT_CA_BUNDLE": str(pki["ca"])})
    assert no_client.returncode == 1 and took == [], no_client.stdout + no_client.stderr
    full = {**target, "SMT_CA_BUNDLE": str(pki["ca"]), "SMT_CLIENT_CERT": str(pki["client_cert"]),
            "SMT_CLIENT_KEY": str(pki["client_key"])}
    sent = run_cli("post", str(f), env=full)
    assert sent.returncode == 0 and took == ["droplet"], sent.stdout + sent.stderr
    doctor = run_cli("doctor", env=full)
    lines = doctor.stdout.splitlines()
    assert any(line.startswith("ok    tls: CA bundle") for line in lines), lines
    assert any(line.startswith("ok    endpoint:") for line in lines), lines
    bad = run_cli("doctor", "--offline", env={**full, "SMT_CLIENT_KEY": str(pki["ca"])})  # not a key
    assert bad.returncode == 1 and any(line.startswith("FAIL  tls: SMT_CLIENT_CERT / SMT_CLIENT_KEY")
                                       for line in bad.stdout.splitlines()), bad.stdout
    lone_key = run_cli("post", str(f), env={**target, "SMT_CLIENT_KEY": str(pki["client_key"])})
    assert lone_key.returncode == 2 and "SMT_CLIENT_KEY is set without SMT_CLIENT_CERT" in lone_key.stderr
    assert "Traceback" not in untrusted.stderr + no_client.stderr + bad.stderr + lone_key.stderr
