"""Outbound TLS as operators need it: a private CA (``SMT_CA_BUNDLE``) and a client certificate
(``SMT_CLIENT_CERT``, ``SMT_CLIENT_KEY``), for every request smt-watch makes to the app or an upload server.

One function builds what httpx's ``verify=`` takes, so deliveries, ``verify`` and ``doctor`` trust exactly the
same certificates; a file that is missing or not a certificate/key is a one-line :class:`ConfigError` naming
the variable, never a traceback from the ssl module. :func:`plain_reason` turns an ssl failure into words.
"""

from __future__ import annotations

import ssl

from smt_watch.config import Settings
from smt_watch.errors import ConfigError


def verify_for(settings: Settings, url: str) -> ssl.SSLContext | bool:
    """``verify=`` for a client talking to ``url``: False for plain http (no CA bundle to load: ~60 ms a
    start), the default trust for https without our settings, else a context with them."""
    if not url.startswith("https://"):
        return False
    if settings.ca_bundle is None and settings.client_cert is None and settings.client_key is None:
        return True
    return context(settings)


def context(settings: Settings) -> ssl.SSLContext:
    import certifi

    if settings.client_key is not None and settings.client_cert is None:
        raise ConfigError("SMT_CLIENT_KEY is set without SMT_CLIENT_CERT (the certificate it is the key of)")
    ca = settings.ca_bundle
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else certifi.where())
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"SMT_CA_BUNDLE {ca}: cannot load it as PEM certificates ({_why(exc)})") from exc
    if settings.client_cert is not None:
        key = settings.client_key
        try:
            ctx.load_cert_chain(str(settings.client_cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            names = "SMT_CLIENT_CERT" + (" / SMT_CLIENT_KEY" if key is not None else "")
            raise ConfigError(f"{names} {settings.client_cert}{f' / {key}' if key else ''}: cannot load the "
                              f"client certificate and its key ({_why(exc)})") from exc
    return ctx


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
