"""The small port the ledger is written over, and where the two databases really differ (the dialect).

:class:`~smt_watch.ledger.store.SqlLedger` holds every query, the state machine and the claim decision once;
it talks to a database only through :class:`Port` (query, execute, transaction, lock, clock). One adapter per
database keeps the port: :mod:`.sqlite` (one connection, ``BEGIN IMMEDIATE``, the file lock) and
:mod:`.postgres` (the psycopg pool, its reconnect and lease policy, advisory locks). This is how
procrastinate separates its job manager from its connectors.

Statements are written once in SQLite's placeholder style (``?`` positional, ``:name`` named); the
PostgreSQL adapter turns them into psycopg's (:func:`pyformat`). What a placeholder cannot hide is a
:class:`Dialect` entry: the columns only the shared PostgreSQL ledger has (each node's stat cache, leases),
the lock a transaction takes, and how a list is passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]
Record = Mapping[str, Any]  # a row by column name (``sqlite3.Row`` or psycopg's ``dict_row``)

_NAMED: re.Pattern[str] = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def pyformat(sql: str) -> str:
    """A statement in SQLite's placeholder style (``?``, ``:name``) in psycopg's (``%s``, ``%(name)s``)."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%").replace("?", "%s"))


class Tx(Protocol):
    """What a statement runs on: a transaction (:meth:`Port.transaction`) or, on the port itself, one
    statement committed on its own."""

    def query(self, sql: str, params: Params = ()) -> list[Record]: ...
    def tuples(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...
    def execute(self, sql: str, params: Params = ()) -> int: ...
    def lock(self, *key: str) -> None:
        """Hold a lock named by ``key`` until the transaction ends (across nodes, on PostgreSQL)."""


class Port(Tx, Protocol):
    """One database as the ledger needs it. Errors come out as :class:`~smt_watch.errors.LedgerError`
    (:class:`~smt_watch.errors.LedgerUnavailable` when a shared database cannot be reached)."""

    path: Any  # what messages call it: the SQLite file, or the PostgreSQL URL without its password
    dialect: Dialect

    def transaction(self, work: Callable[[Tx], T], *, retry: bool = True) -> T:
        """Run ``work`` in one transaction; ``retry``: run it again on a fresh connection when the database
        was lost (PostgreSQL; a retried ``work`` must be idempotent or guarded)."""
        ...

    def close(self) -> None: ...
    def schema_version(self) -> int: ...
    def quick_check(self) -> str: ...
    def clock_offset(self) -> float: ...
    def sync_lock(self, wait: bool) -> AbstractContextManager[bool]: ...


@dataclass(frozen=True)
class Dialect:
    """Where the SQL of the two databases really differs; everything else is one statement for both.

    The PostgreSQL ledger is shared by several nodes: its stat cache (``seen``) is per node, a ``files`` row
    carries the node that last claimed it (``due`` rows are that node's to retry) and a lease judged by the
    database's clock. SQLite serves one node and has neither column."""

    name: str
    # a data-modifying WITH: two writes in one statement (one round trip and one commit)
    write_with: bool
    # `seen` rows carry `node`: a stat cache per node
    seen_node: bool
    # a `sending` row carries `node` and `lease_until` (the database's clock decides a lease's end)
    leases: bool
    # the conflict target of a `seen` row
    seen_key: tuple[str, ...]
    # rows taken by another transaction are skipped (`recover_stale` on several nodes)
    skip_locked: str
    # a list as one parameter (PostgreSQL's arrays) rather than one placeholder per item
    arrays: bool
    # how many items one statement takes at a time (SQLite allows 32,766 placeholders; an array, any number,
    # but a batch is also one round trip's worth of rows)
    batch: int
    # a group's rows as one JSON parameter (PostgreSQL's jsonb_populate_recordset): a worker's group of claims,
    # or of outcomes, is one statement (one round trip, one commit) instead of one per file; such a statement
    # also names the group's hashes as one array (``= ANY(:hashes)``), so the planner looks them up by key
    json_rows: bool = False

    def rows(self, table: str, name: str) -> str:
        """The rows of the JSON array parameter ``:name`` (objects keyed by column), typed as ``table``'s
        columns (a key left out is NULL): a row source for one statement that writes a whole group."""
        if not self.json_rows:
            raise NotImplementedError(f"{self.name}: no JSON row parameters")
        return f"jsonb_populate_recordset(NULL::{table}, CAST(:{name} AS jsonb))"

    def among(self, column: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
        """``column`` is one of ``values``: the clause and its (named) parameters."""
        if self.arrays:
            return f"{column} = ANY(:among)", {"among": list(values)}
        names = [f"among{i}" for i in range(len(values))]
        return f"{column} IN ({', '.join(':' + n for n in names)})", dict(zip(names, values, strict=True))

    def scope(self, table: str) -> str:
        """The condition that keeps a ``seen``/``files`` look-up to this node's rows (``:node``), or TRUE."""
        if table == "seen":
            return "seen.node = :node" if self.seen_node else "TRUE"
        return "(files.node = :node OR files.node IS NULL)" if self.leases else "TRUE"

    @property
    def unlease(self) -> str:
        """The assignment that ends a lease when a row leaves ``sending``."""
        return ", lease_until = NULL" if self.leases else ""


SQLITE: Dialect = Dialect(name="sqlite", write_with=False, seen_node=False, leases=False, seen_key=("path",),
                          skip_locked="", arrays=False, batch=500)
POSTGRES: Dialect = Dialect(name="postgres", write_with=True, seen_node=True, leases=True,
                            seen_key=("node", "path"), skip_locked=" FOR UPDATE SKIP LOCKED", arrays=True,
                            batch=1000, json_rows=True)


def batches(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``values`` in slices of ``size`` (a dialect's :attr:`Dialect.batch`)."""
    for i in range(0, len(values), size):
        yield values[i : i + size]
