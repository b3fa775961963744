"""Outbound TLS as operators need it: a private CA (``SMT_CA_BUNDLE``) and a client certificate
(``SMT_CLIENT_CERT``, ``SMT_CLIENT_KEY``), for every request smt-watch makes to the app or an upload server.

One function builds what httpx's ``verify=`` takes, so deliveries, ``verify`` and ``doctor`` trust exactly the
same certificates; a file that is missing or not a certificate/key is a one-line :class:`ConfigError` naming
the variable, never a traceback from the ssl module. :func:`plain_reason` turns an ssl failure into words.

A context is built once per process for the same trust and shared by every client given it: loading a CA
bundle costs ~30 ms of CPU, and httpx given ``verify=True`` loads one for each client it makes (``doctor``
makes two, and ``watch``'s start-up probe of a local https target one per look). httpcore sets the same ALPN
list (``http/1.1``: no client here speaks HTTP/2) on it for each connection, so sharing changes nothing else.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path

from smt_watch.config import Settings
from smt_watch.errors import ConfigError

Stamp = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


def verify_for(settings: Settings, url: str) -> ssl.SSLContext | bool:
    """``verify=`` for a client talking to ``url``: False for plain http (no CA bundle to load), the default
    trust for https without our settings (:func:`default_trust`), else a context with them (:func:`context`)."""
    if not url.startswith("https://"):
        return False
    if settings.ca_bundle is None and settings.client_cert is None and settings.client_key is None:
        return default_trust()
    return context(settings)


def default_trust(trust_env: bool = True) -> ssl.SSLContext:
    """What httpx's ``verify=True`` builds (certifi's bundle; with ``trust_env``, ``SSL_CERT_FILE`` or else
    ``SSL_CERT_DIR`` when set), built once per process for each of those sources as they are now (a file
    rewritten is loaded again, as :func:`context` does). One that cannot be loaded is a :class:`ConfigError`
    naming the variable."""
    for name, as_dir in (("SSL_CERT_FILE", False), ("SSL_CERT_DIR", True)):
        where = os.environ.get(name) if trust_env else None
        if where:
            try:
                return _default_trust(None if as_dir else where, where if as_dir else None, _stamp(Path(where)))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{name} {where}: cannot load certificates from it ({_why(exc)})") from exc
    return _default_trust(None, None, None)


@functools.lru_cache(maxsize=4)
def _default_trust(cafile: str | None, capath: str | None, _stamp: Stamp | None) -> ssl.SSLContext:
    import certifi

    if cafile is None and capath is None:
        cafile = certifi.where()
    return _http11(ssl.create_default_context(cafile=cafile, capath=capath))


def _http11(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """ALPN offers HTTP/1.1, the only protocol every client here speaks (as httpcore offers it without HTTP/2),
    set where the (cached, shared) context is built, not by each user of it."""
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def context(settings: Settings) -> ssl.SSLContext:
    """A context with ``SMT_CA_BUNDLE`` and ``SMT_CLIENT_CERT``/``SMT_CLIENT_KEY``: built once for the same
    files as they are now (a file replaced or rewritten, a certificate renewed, is loaded again)."""
    if settings.client_key is not None and settings.client_cert is None:
        raise ConfigError("SMT_CLIENT_KEY is set without SMT_CLIENT_CERT (the certificate it is the key of)")
    paths = (settings.ca_bundle, settings.client_cert, settings.client_key)
    try:
        stamps = tuple(_stamp(p) for p in paths)
    except OSError:
        return _context(settings.ca_bundle, settings.client_cert, settings.client_key)  # says which, and why
    return _context_once(*paths, stamps)


def _stamp(path: Path | None) -> Stamp | None:
    """What tells a file as it is now: the ctime too, as a key rewritten in place with its mtime put back
    (``cp -p``, ``touch -r``, a config tool) keeps the others."""
    if path is None:
        return None
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=4)
def _context_once(ca: Path | None, cert: Path | None, key: Path | None,
                  stamps: tuple[Stamp | None, ...]) -> ssl.SSLContext:
    return _context(ca, cert, key)  # an error is raised, never cached: the next call tries again


def _context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    import certifi

    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else certifi.where())
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"SMT_CA_BUNDLE {ca}: cannot load it as PEM certificates ({_why(exc)})") from exc
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            names = "SMT_CLIENT_CERT" + (" / SMT_CLIENT_KEY" if key is not None else "")
            raise ConfigError(f"{names} {cert}{f' / {key}' if key else ''}: cannot load the "
                              f"client certificate and its key ({_why(exc)})") from exc
    return _http11(ctx)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def plain_reason(text: str) -> str | None:
    """What an ssl failure inside a library's error text means, in words (None: not a TLS failure)."""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ("TLS: the server's certificate is not trusted (a private CA? set SMT_CA_BUNDLE; an expired or "
                "wrong-host certificate?)")
    if "TLSV13_ALERT_CERTIFICATE_REQUIRED" in text or "CERTIFICATE_REQUIRED" in text or "BAD_CERTIFICATE" in text:
        return "TLS: the server wants a client certificate it accepts (SMT_CLIENT_CERT, SMT_CLIENT_KEY)"
    if "WRONG_VERSION_NUMBER" in text:
        return "TLS: the server does not speak TLS on that port (http:// instead of https://?)"
    return None
