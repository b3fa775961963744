"""``smt-watch sample``: realistic SMT interval CSVs (and ``.zip``, ``.asc``) for demos, tests and benchmarks.

Rows follow what SMT sends (docs/contract.md §6): the 8-column header, ESIID with a leading apostrophe, ``MM/DD/YYYY``
dates, ``H:MM`` local start/end labels with the day's last interval ending ``0:00``, 96 rows a day, 100 on
the fall-back day (1:00–1:45 twice), and 96 on the spring-forward day with blank kWh where the wall time
does not exist. Readings are seeded, so the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import random
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from smt_watch.config import Settings
from smt_watch.errors import ConfigError
from smt_watch.smtcsv import CHICAGO, INTERVAL_HEADER, SLOT

DEFAULT_ESIID = "10443720000000001"


def _label(dt: datetime) -> str:
    return f"{dt.hour}:{dt.minute:02d}"


def day_rows(day: date, esiid: str, rng: random.Random, revision: date) -> Iterator[str]:
    """One day's rows in SMT's order; DST days come out with 100 or 96 (blank-gap) rows."""
    start = datetime(day.year, day.month, day.day, tzinfo=CHICAGO)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=CHICAGO)
    prefix = f"'{esiid},{day:%m/%d/%Y},{revision:%m/%d/%Y}"
    if end.utcoffset() != start.utcoffset() and (end.timestamp() - start.timestamp()) < 86400:
        # Spring forward: 96 labels of a normal day; those that do not exist carry no reading.
        for i in range(96):
            label = datetime(day.year, day.month, day.day, i // 4, (i % 4) * 15)
            begin = f"{label.hour}:{label.minute:02d}"
            finish_dt = label + timedelta(minutes=15)
            finish = f"{finish_dt.hour}:{finish_dt.minute:02d}"
            local = label.replace(tzinfo=CHICAGO)
            exists = datetime.fromtimestamp(local.timestamp(), CHICAGO).hour == label.hour
            kwh = f"{_reading(label.hour, rng):.3f}" if exists else ""
            yield f"{prefix},{begin},{finish},{kwh},{'A' if exists else ''},Consumption"
        return
    t = int(start.timestamp())
    while t < int(end.timestamp()):
        local = datetime.fromtimestamp(t, UTC).astimezone(CHICAGO)
        after = datetime.fromtimestamp(t + SLOT, UTC).astimezone(CHICAGO)
        kind = "E" if rng.random() < 0.01 else "A"
        yield f"{prefix},{_label(local)},{_label(after)},{_reading(local.hour, rng):.3f},{kind},Consumption"
        t += SLOT


def _reading(hour: int, rng: random.Random) -> float:
    base = 0.25 + (0.6 if 17 <= hour <= 21 else 0.35 if 7 <= hour <= 16 else 0.0)
    return round(base * (0.6 + rng.random() * 0.8), 3)


def interval_csv(days: int, esiid: str = DEFAULT_ESIID, start: date | None = None, seed: int = 0) -> bytes:
    start = start or date(2025, 1, 1)
    rng = random.Random(f"{esiid}-{start}-{days}-{seed}")
    out = io.StringIO()
    out.write(",".join(INTERVAL_HEADER) + "\n")
    for n in range(days):
        day = start + timedelta(days=n)
        for row in day_rows(day, esiid, rng, day + timedelta(days=1)):
            out.write(row + "\n")
    return out.getvalue().encode()


def billing_csv(esiid: str, start: date, days: int) -> bytes:
    """A daily-reads CSV: another SMT CSV kind (``smt-other``), delivered as it is."""
    lines = ["ESIID,USAGE_DATE,REVISION_DATE,ACTUAL_KWH,ESTIMATED_KWH,METER_START,METER_END"]
    for n in range(days):
        day = start + timedelta(days=n)
        lines.append(f"'{esiid},{day:%m/%d/%Y},{day:%m/%d/%Y},{20 + n % 7}.5,0,{1000 + n * 20},{1020 + n * 20}")
    return ("\n".join(lines) + "\n").encode()


def smt_zip(name: str, interval: bytes, billing: bytes | None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, interval)
        if billing is not None:
            zf.writestr(name.replace("Interval", "Daily", 1) if "Interval" in name else f"daily_{name}", billing)
    return buf.getvalue()


def encrypt(settings: Settings, data: bytes, recipient: str) -> bytes:
    """Armoured PGP encryption to ``recipient`` (GNUPGHOME), as SMT encrypts what it sends.

    A recipient gpg cannot encrypt to is a usage error (exit 2): nothing is written.
    """
    import gnupg

    gpg = gnupg.GPG(gnupghome=str(settings.gnupghome) if settings.gnupghome else None)
    result = gpg.encrypt(data, recipient, armor=True, always_trust=True)
    if not result.ok:
        raise ConfigError(f"cannot encrypt to {recipient}: {result.status or 'gpg failed'}")
    return bytes(result.data)


def write_sample(
    output: Path,
    *,
    days: int,
    esiid: str,
    start: date,
    encrypt_to: str | None = None,
    settings: Settings | None = None,
) -> int:
    """Write what ``smt-watch sample`` makes to ``output``; return its size in bytes.

    An interval CSV; a ZIP of it and a daily-reads CSV when ``output`` ends in ``.zip`` or ``encrypt_to``
    is given; that ZIP PGP-encrypted to ``encrypt_to`` (an SMT-style ``.asc``, needs ``settings`` for
    GNUPGHOME).
    """
    data = interval_csv(days, esiid, start)
    inner = f"IntervalMeterUsage_{esiid}_{start:%Y%m%d}.csv"
    if encrypt_to or output.name.lower().endswith(".zip"):
        data = smt_zip(inner, data, billing_csv(esiid, start, days))
    if encrypt_to:
        if settings is None:
            raise ConfigError("--encrypt-to needs settings (GNUPGHOME)")
        data = encrypt(settings, data, encrypt_to)
    output.write_bytes(data)
    return len(data)
