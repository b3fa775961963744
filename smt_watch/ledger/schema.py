"""Table bodies both databases' migrations create alike, written once with their column types as slots.

Each database keeps its own numbered migrations (:mod:`.sqlite`, :mod:`.postgres`): SQLite's are functions
bumping ``user_version``, PostgreSQL's statements recorded in ``schema_version``, and the shared ledger's
tables have the node and lease columns SQLite's lack. What they create alike is here, so a column's
definition is not written twice. ``{big}``: SQLite's INTEGER, PostgreSQL's BIGINT; ``{real}``: REAL or
DOUBLE PRECISION.
"""

from __future__ import annotations

from typing import Final

# `files` as its first migration made it, up to the claim's columns (each database adds its own after them)
FILES_CORE: Final = """
    sha256 TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    path TEXT,
    size {big},
    state TEXT NOT NULL CHECK (state IN ('pending','sending','sent','retrying','failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    last_error TEXT,
    first_seen TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    sent_at TEXT,
    destination TEXT,
    mode TEXT,
    next_attempt_at {real},
    claimed_by TEXT,
    claimed_at {real},"""

REMOTE_FILES: Final = """
    remote_path TEXT PRIMARY KEY,
    size {big} NOT NULL,
    mtime {big} NOT NULL,
    sha256 TEXT NOT NULL,
    local_path TEXT NOT NULL,
    fetched_at TEXT NOT NULL"""
CHUNKS: Final = """
    sha256 TEXT NOT NULL,
    part INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    chunk_sha256 TEXT NOT NULL,
    acked_at TEXT NOT NULL,
    PRIMARY KEY (sha256, part)"""
LABELS: Final = """
    sha256 TEXT PRIMARY KEY,
    declared_esiid TEXT,
    declared_meter TEXT,
    esiid TEXT,
    at {real} NOT NULL"""


def columns(body: str, *, big: str, real: str) -> str:
    """``body`` with its column types filled in for one database."""
    return body.format(big=big, real=real)
