"""``serve``'s ``/status`` page: :class:`smt_watch.status.Status` as HTML with inline SVG charts, and its login.

The page needs no external asset and no JavaScript (a ``<meta http-equiv=refresh>`` redraws it every
:data:`REFRESH_SECONDS`); it fits a phone (one column, tables scroll sideways). Everything from the ledger
is HTML-escaped: file names and errors are client data.

Sessions (:mod:`smt_watch.sessions`): ``SMT_STATUS_TOKEN`` posted to the login form (never in a URL) buys
a cookie that is an HMAC under the token, HttpOnly, SameSite=Strict, ended by sign-out or a change of the
token. Each form carries a CSRF token, the HMAC of the session cookie under another label; every comparison
is :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from html import escape
from typing import Final

from smt_watch.config import Secret
from smt_watch.names import shown
from smt_watch.status import Hour, Status, age, human_size, seconds_text, sync_line, watch_line

COOKIE: Final = "smt_status"
REFRESH_SECONDS: Final = 15
CSP: Final = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
              "frame-ancestors 'none'; base-uri 'none'")


def _mac(token: Secret, label: str, value: str) -> str:
    return hmac.new(token.reveal().encode(), f"{label}\0{value}".encode(), hashlib.sha256).hexdigest()


def csrf_token(token: Secret, session: str) -> str:
    return _mac(token, "csrf", session)


def csrf_valid(token: Secret, session: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), csrf_token(token, session).encode())


def token_matches(token: Secret, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), token.reveal().encode())


_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;color:#222;background:#fafafa;max-width:1100px}
h1{font-size:20px;margin:4px 0 10px}h2{font-size:16px;margin:18px 0 6px}
.ok{color:#176117}.bad{color:#b00020;font-weight:600}.dim{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:8px 10px;min-width:120px}.card b{display:block;font-size:22px}
.scroll{overflow-x:auto;background:#fff;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eee;
vertical-align:top}th{background:#f0f0f0;font-weight:600;font-size:13px}td.num{text-align:right}
code{font-size:12px;word-break:break-all}button{font:inherit;padding:4px 12px;cursor:pointer}
.notice{background:#fff8d6;border:1px solid #e6d27a;padding:6px 10px;border-radius:6px}
svg{max-width:100%;height:auto;background:#fff;border:1px solid #ddd;border-radius:6px}
form.login{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;max-width:360px}
input[type=password]{font:inherit;width:100%;box-sizing:border-box;padding:6px;margin:6px 0 10px}
"""


def _page(title: str, body: str, *, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">{meta}'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def login_page(message: str | None = None) -> str:
    note = f'<p class="bad" id="login-error">{escape(message)}</p>' if message else ""
    return _page("smt-watch status: sign in", f"""<h1>smt-watch status</h1>{note}
<form class="login" method="post" action="/status/login">
<label for="token">Status token (SMT_STATUS_TOKEN)</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit" id="login">Sign in</button></form>""")


def disabled_page() -> str:
    return _page("smt-watch status", "<h1>smt-watch status</h1><p>The status page is off: set SMT_STATUS_TOKEN "
                 "for serve to show it.</p>")


def _t(text: str) -> str:
    """Ledger text (client-chosen names, errors) made printable and escaped."""
    return escape(shown(text))


def _bar_chart(hours: list[Hour]) -> str:
    """Deliveries per hour: one bar per hour, the count above it."""
    w, h, left, bottom, top = 720, 150, 34, 28, 16
    peak = max([x.deliveries for x in hours] + [1])
    step = (w - left - 8) / len(hours)
    parts = [f'<svg id="chart-deliveries" viewBox="0 0 {w} {h}" role="img" aria-label="Deliveries per hour, '
             f'last 24 hours"><title>Deliveries per hour</title>',
             f'<text x="{left}" y="12" font-size="12" fill="#333">deliveries per hour (UTC), last 24 h</text>',
             f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end" fill="#666">{peak}</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 8}" y2="{h - bottom}" stroke="#999"/>']
    for i, x in enumerate(hours):
        bar_h = (h - bottom - top) * x.deliveries / peak
        xpos = left + i * step
        parts.append(f'<rect x="{xpos + 1:.1f}" y="{h - bottom - bar_h:.1f}" width="{step - 2:.1f}" '
                     f'height="{bar_h:.1f}" fill="#4c72b0"><title>{escape(x.start)}: {x.deliveries}</title></rect>')
        if i % 3 == 0:
            parts.append(f'<text x="{xpos + step / 2:.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="middle"'
                         f' fill="#666">{escape(x.start[11:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _latency_chart(hours: list[Hour]) -> str:
    """Median and maximum latency per hour (first sight to sent), as two lines of points."""
    w, h, left, bottom, top = 720, 150, 46, 28, 16
    values = [v for x in hours for v in (x.median_seconds, x.max_seconds) if v is not None]
    peak = max([*values, 1.0])
    step = (w - left - 8) / len(hours)
    parts = [f'<svg id="chart-latency" viewBox="0 0 {w} {h}" role="img" aria-label="Delivery latency per hour, '
             f'last 24 hours"><title>Delivery latency</title>',
             f'<text x="{left}" y="12" font-size="12" fill="#333">latency, first seen → sent: '
             f'<tspan fill="#4c72b0">median</tspan> and <tspan fill="#dd8452">max</tspan> per hour</text>',
             f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end" fill="#666">'
             f'{escape(seconds_text(peak))}</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 8}" y2="{h - bottom}" stroke="#999"/>']
    for attr, colour in (("max_seconds", "#dd8452"), ("median_seconds", "#4c72b0")):
        points = []
        for i, x in enumerate(hours):
            v = getattr(x, attr)
            if v is not None:
                cx, cy = left + (i + 0.5) * step, h - bottom - (h - bottom - top) * v / peak
                points.append((cx, cy))
                parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}">'
                             f'<title>{escape(x.start)}: {escape(seconds_text(v))}</title></circle>')
        if len(points) > 1:
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    for i, x in enumerate(hours):
        if i % 3 == 0:
            parts.append(f'<text x="{left + (i + 0.5) * step:.1f}" y="{h - bottom + 14}" font-size="10" '
                         f'text-anchor="middle" fill="#666">{escape(x.start[11:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def status_page(status: Status, csrf: str, *, notice: str | None = None, now: float | None = None) -> str:
    now = time.time() if now is None else now
    state_class = "ok" if status.watching else "bad"
    cards = "".join(f'<div class="card" id="count-{s}">{escape(s)}<b>{n}</b></div>' for s, n in status.counts.items())
    held = "".join(f'<div class="card" id="verdict-{escape(v.replace(" ", "-"))}">{escape(v)}<b>{n}</b></div>'
                   for v, n in sorted(status.verdicts.items()))
    held = f'<h2>In the app (verify)</h2><div class="cards" id="verdicts">{held}</div>' if held else ""
    recent = "".join(
        f'<tr class="delivery"><td>{escape(age(d.sent_at, now))}</td><td>{_t(d.filename)}</td>'
        f'<td class="num">{escape(human_size(d.size))}</td><td class="num">{escape(seconds_text(d.seconds))}</td>'
        f'<td class="num">{d.http_status or "-"}</td></tr>' for d in status.recent
    ) or '<tr><td colspan="5" class="dim">no deliveries yet</td></tr>'
    failures = "".join(
        f'<tr class="failure" id="failure-{f.sha256}"><td>{escape(f.state)}</td><td>{_t(f.filename)}<br>'
        f'<code>{f.sha256[:16]}</code></td><td class="num">{f.attempts}</td><td class="num">{f.http_status or "-"}'
        f"</td><td>{_t(f.error[:300])}"
        + (f'<br><span class="dim">next attempt {escape(f.next_attempt_at)}</span>' if f.next_attempt_at else "")
        + f'<br><code>{escape(f.retry_command)}</code></td><td><form method="post" action="/status/retry">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}"><input type="hidden" name="sha256" '
        f'value="{f.sha256}"><button type="submit" class="retry">retry</button></form></td></tr>'
        for f in status.failures
    ) or '<tr><td colspan="6" class="dim">none</td></tr>'
    quotas = "".join(
        f'<tr><td>{escape(q.role)}</td><td class="num">{q.limit} per {escape(seconds_text(q.window_seconds))}</td>'
        f'<td class="num">{q.uploads}</td><td class="num">{q.accounts}</td><td class="num">{q.at_limit}</td>'
        f'<td>{", ".join(f"{_t(a)} ({n})" for a, n in q.busiest) or "-"}</td></tr>' for q in status.quotas)
    sync_bad = any(a.startswith(("sync ", "sync's")) for a in status.alerts)
    note = f'<p class="notice" id="notice">{escape(notice)}</p>' if notice else ""
    alerts = ('<ul id="alerts" class="bad">' + "".join(f"<li>{_t(a)}</li>" for a in status.alerts) + "</ul>"
              if status.alerts else "")
    body = f"""<h1>smt-watch status</h1>{note}{alerts}
<p id="watch" class="{state_class}">{_t(watch_line(status, now))}</p>
<p id="sync" class="{'bad' if sync_bad else ''}">{_t(sync_line(status, now))}</p>
<div class="cards"><div class="card" id="queue">queue<b>{status.queue}</b></div>{cards}</div>{held}
<h2>Failures</h2><div class="scroll"><table id="failures"><tr><th>state</th><th>file</th><th>att.</th><th>HTTP</th>
<th>reason, and the command that retries it</th><th></th></tr>{failures}</table></div>
<h2>Last deliveries</h2><div class="scroll"><table id="recent"><tr><th>sent</th><th>file</th>
<th>size</th><th>latency</th><th>HTTP</th></tr>{recent}</table></div>
<h2>Last 24 hours</h2>{_bar_chart(status.hours)}<br>{_latency_chart(status.hours)}
<h2>Upload quotas</h2><div class="scroll"><table id="quotas"><tr><th>role</th><th>limit</th><th>uploads</th>
<th>accounts</th><th>at limit</th><th>busiest</th></tr>{quotas}</table></div>
<p class="dim">as of {escape(status.generated_at)} · redraws every {REFRESH_SECONDS} s · ledger {_t(status.ledger)}</p>
<form method="post" action="/status/logout"><input type="hidden" name="csrf" value="{escape(csrf)}">
<button type="submit" id="logout">Sign out</button></form>"""
    return _page("smt-watch status", body, refresh=True)
