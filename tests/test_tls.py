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
import os
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import write_csv
from smt_watch import tls
from smt_watch.config import Settings
from smt_watch.doctor import run_checks
from smt_watch.errors import ConfigError

Run = Callable[..., subprocess.CompletedProcess[str]]
Make = Callable[..., Settings]


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


@pytest.fixture
def ca_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every CA bundle loaded into an SSL context from now on (the ~30 ms of CPU each), the caches emptied."""
    loads: list[str] = []
    real = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, cafile: Any = None, capath: Any = None, cadata: Any = None) -> None:
        loads.append(str(cafile or capath or "cadata"))
        real(self, cafile, capath, cadata)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    tls._default_trust.cache_clear()
    tls._context_once.cache_clear()
    return loads


def test_one_context_per_trust_in_a_process(make_settings: Make, pki: dict[str, Path], ca_loads: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    plain = make_settings()
    assert tls.verify_for(plain, "http://127.0.0.1:1/upload") is False and ca_loads == []  # plain http: none
    first = tls.verify_for(plain, "https://a.example/upload")
    assert isinstance(first, ssl.SSLContext) and first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    assert tls.verify_for(plain, "https://b.example/x") is first and tls.default_trust(trust_env=False) is first
    assert len(ca_loads) == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca"]))  # httpx's verify=True reads it; so does the default
    assert tls.default_trust() is not first and tls.default_trust(trust_env=False) is first
    assert ca_loads[-1] == str(pki["ca"])
    ours = make_settings(SMT_CA_BUNDLE=str(pki["ca"]), SMT_CLIENT_CERT=str(pki["client_cert"]),
                         SMT_CLIENT_KEY=str(pki["client_key"]))
    mine = tls.verify_for(ours, "https://a.example/upload")
    assert tls.context(ours) is mine and len(ca_loads) == 3
    pki["ca"].write_bytes(pki["ca"].read_bytes() + b"\n")  # the bundle rewritten (a CA added, say): loaded again
    assert tls.context(ours) is not mine and len(ca_loads) == 4
    pki["ca"].write_bytes(b"not a certificate\n")
    for _ in range(2):  # a failure is never remembered as a context
        with pytest.raises(ConfigError, match="SMT_CA_BUNDLE"):
            tls.context(ours)


def test_doctor_loads_the_ca_bundle_once(make_settings: Make, unused_port: int, ca_loads: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An https target on this host: the own-serve probe (once per check that resolves the mode), the
    endpoint's HEAD and the token check each made a client, and each loaded the bundle (five loads in all);
    they share one context now, so the bundle is loaded once."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    settings = make_settings(INTELLIWATT_BASE_URL=f"https://127.0.0.1:{unused_port}", ADMIN_TOKEN="t0ken-" * 4,
                             SMT_UPLOAD_PORT=str(unused_port + 1 if unused_port < 65535 else unused_port - 1))
    checks = {c.name: c for c in run_checks(settings, env_file=None, offline=False)}
    assert checks["endpoint"].status == "FAIL" and "cannot connect" in checks["endpoint"].detail  # it was asked
    assert len(ca_loads) == 1, ca_loads


def test_the_default_trust_follows_ssl_cert_file_and_names_it_when_it_cannot_load(
        pki: dict[str, Path], ca_loads: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        run_cli: Run) -> None:
    """``SSL_CERT_FILE`` was cached by its path alone (a bundle rewritten kept the old trust), and a missing
    one was a bare FileNotFoundError: an internal error, not a line naming the variable."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki["ca"].read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = tls.default_trust()
    assert tls.default_trust() is first and ca_loads == [str(bundle)]
    bundle.write_bytes(pki["ca"].read_bytes() + b"\n")
    assert tls.default_trust() is not first and len(ca_loads) == 2
    for missing in (tmp_path / "gone.pem", pki["client_key"]):  # missing; not a certificate
        monkeypatch.setenv("SSL_CERT_FILE", str(missing))
        with pytest.raises(ConfigError, match=f"^SSL_CERT_FILE {re.escape(str(missing))}: cannot load certificates"):
            tls.default_trust()
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-dir"))
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(ConfigError, match=r"^SSL_CERT_DIR "):
        tls.default_trust()
    f = write_csv(tmp_path / "tls_M1.csv")
    done = run_cli("post", str(f), env={"SMT_UPLOAD_URL": "https://127.0.0.1:1/upload", "SMT_PATTERNS": "*.csv",
                                        "SSL_CERT_FILE": str(tmp_path / "gone.pem")})
    assert done.returncode != 0 and "SSL_CERT_FILE" in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "internal error" not in done.stdout + done.stderr


def test_a_key_rewritten_with_its_mtime_put_back_is_loaded_again(
        make_settings: Make, pki: dict[str, Path], ca_loads: list[str], tmp_path: Path) -> None:
    """``cp -p`` or ``touch -r`` over a key keeps its size and mtime (and a rewrite in place its inode): only
    the ctime tells, so it is in the key of the cached context."""
    key = tmp_path / "client.key"
    key.write_bytes(pki["client_key"].read_bytes())
    ours = make_settings(SMT_CA_BUNDLE=str(pki["ca"]), SMT_CLIENT_CERT=str(pki["client_cert"]),
                         SMT_CLIENT_KEY=str(key))
    mine = tls.context(ours)
    before, data = key.stat(), key.read_bytes()
    deadline = time.monotonic() + 10
    while True:  # the same bytes written again in place, the mtime put back, until the (coarse) ctime moves
        with key.open("r+b") as fh:
            fh.write(data)
        os.utime(key, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = key.stat()
        if after.st_ctime_ns != before.st_ctime_ns or time.monotonic() > deadline:
            break
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    assert tls.context(ours) is not mine
