"""The stat cache as ``watch`` uses it: asked once for each new file (issue 25), on both databases.

The main loop asks the cache when the file's event arrives; the job it hands a worker carries that answer,
so the worker does not ask again. The spy below wraps the real look-up (every read of the stat cache goes
through ``seen_many``) and only records which paths were asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.config import Settings
from smt_watch.ledger import Seen
from smt_watch.ledger.store import SqlLedger

Make = Callable[..., Settings]


@pytest.mark.both_ledgers
def test_a_new_file_is_looked_up_in_the_stat_cache_once(make_settings: Make, receiver: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real = SqlLedger.seen_many

    def seen_many(self: SqlLedger, paths: list[str]) -> dict[str, Seen]:
        asked.extend(paths)
        return real(self, paths)

    monkeypatch.setattr(SqlLedger, "seen_many", seen_many)
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1")
    with watching(settings) as service:
        new = write_csv(settings.local_dir / "new.csv")
        wait_for(lambda: service.counts.sent == 1, 20, "new.csv delivered")
        again = Path(settings.local_dir / "again.csv")
        again.write_bytes(new.read_bytes())  # the same bytes under another name: a duplicate, asked once too
        wait_for(lambda: service.counts.duplicate == 1, 20, "again.csv found a duplicate")
    assert asked.count(str(new)) == 1, asked
    assert asked.count(str(again)) == 1, asked
    assert service.counts.hashed == 2  # neither was known: each read once to hash it
