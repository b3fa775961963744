"""Which chunk carries postIngest (issue 26 item 4), and the app queuing its work because of it."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from conftest import ADMIN_TOKEN, LOOPBACK
from smt_watch.delivery.rawupload import iter_chunks
from smt_watch.postingest import plan_post_ingest, post_ingest_chunks
from smt_watch.reference.app_routes import wrap
from smt_watch.reference.receiver import app_in_thread, create_app
from smt_watch.reference.sample import interval_csv
from smt_watch.window import coverage_window

NOW = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)  # Chicago 2026-12-07: the window ends 2026-12-05


def test_one_esiid_the_last_chunk_with_kept_days() -> None:
    assert post_ingest_chunks([{"A"}, {"A"}, set()]) == {1}
    assert post_ingest_chunks([{"A"}, {"A"}, {"A"}]) == {2}


def test_every_esiid_gets_a_chunk() -> None:
    assert post_ingest_chunks([{"A"}, {"A", "B"}, {"B"}, set()]) == {1, 2}
    assert post_ingest_chunks([{"A"}, {"B"}]) == {0, 1}


def test_nothing_kept_marks_the_last_chunk_and_no_chunks_none() -> None:
    assert post_ingest_chunks([set(), set()]) == {1}
    assert post_ingest_chunks([]) == set()


def test_a_last_chunk_of_only_newer_days_is_not_the_one(tmp_path: Path) -> None:
    """Ten days to yesterday in chunks of one day: the last two chunks hold days newer than the window."""
    path = tmp_path / "recent_M1.csv"
    path.write_bytes(interval_csv(10, start=date(2026, 11, 27)))  # to 12/06
    chunks = list(iter_chunks(path, 96))
    assert len(chunks) == 10
    # 11/27 .. 12/06: 12/05, the window's end, is chunk 9; chunk 10 (12/06) holds only a newer day
    assert plan_post_ingest(chunks, esiid=None, meter="M1", now=NOW) == {9}


def test_the_app_queues_post_ingest_only_when_the_marked_chunk_keeps_intervals(tmp_path: Path) -> None:
    """Against the reference app: the Node server's choice (the last chunk) queues nothing for such a file;
    the planned chunk queues the ESIID's work."""
    today = coverage_window(datetime.now(UTC)).end + timedelta(days=2)
    path = tmp_path / "recent_M1.csv"
    path.write_bytes(interval_csv(4, start=today - timedelta(days=4)))  # to yesterday
    chunks = list(iter_chunks(path, 96))

    def send(data: Path, marked: set[int]) -> list[str]:
        routes = wrap(create_app(data, admin_token=ADMIN_TOKEN), data, ADMIN_TOKEN)
        try:
            with app_in_thread(routes) as port:
                for n, content in enumerate(chunks, start=1):
                    sha = hashlib.sha256(content).hexdigest()
                    body = {"filename": f"recent_M1.csv.part{n}-of-{len(chunks)}", "sizeBytes": len(content),
                            "sha256": sha, "contentBase64": base64.b64encode(content).decode(), "esiid":
                            "10443720000000001", "meter": "M1", "source": "adhocusage", "postIngest": n in marked}
                    r = LOOPBACK.post(f"http://127.0.0.1:{port}/api/admin/smt/raw-upload", content=json.dumps(body),
                                      headers={"x-admin-token": ADMIN_TOKEN, "content-type": "application/json",
                                            "idempotency-key": sha})
                    assert r.status_code == 200, r.text
            return routes.store.post_ingest_tasks()
        finally:
            routes.store.close()

    assert send(tmp_path / "node", {len(chunks)}) == []
    planned = plan_post_ingest(chunks, esiid=None, meter="M1", now=datetime.now(UTC))
    assert planned == {3}  # today-2, the window's end; chunk 4 (yesterday) is dropped
    assert send(tmp_path / "planned", planned) == ["10443720000000001"]
