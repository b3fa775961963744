"""Issue 27's speed-ups keep their guarantees: a small multipart body is sent in one piece but still never
unless its bytes are the ones hashed; a small CSV a watch worker reads once is sent as the bytes it hashed;
small writes to the app's connection leave together; the console script skips only the imports nobody uses."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings
from smt_watch.delivery import make_sink
from smt_watch.errors import FileChanged
from smt_watch.hashing import HOLD_MAX, Signature, identify, identify_held
from smt_watch.jobs import Cached, _prepare
from smt_watch.pipeline import deliver_identified
from smt_watch.reference.receiver import running_receiver
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Any]:
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as r:
        yield r


def _settings(make: Make, receiver: Any) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_VALIDATE="0")


@pytest.mark.parametrize("change", ["same size", "grew", "shrank"])
def test_a_small_file_changed_after_hashing_is_never_sent(make_settings: Make, receiver: Any, tmp_path: Path,
                                                          change: str) -> None:
    """The one-piece body of a small file is checked against the hash before a byte of it goes out."""
    settings = _settings(make_settings, receiver)
    f = write_csv(tmp_path / "small.csv", rows=50)
    ident = identify(f)  # what the claim is made for
    data = f.read_bytes()
    f.write_bytes({"same size": data[:-2] + b"9\n", "grew": data + b"x\n", "shrank": data[:-1]}[change])
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        o = deliver_identified(settings, ledger, sink, ident)
        row = ledger.get(ident.sha256)
    assert o.result == "changed"
    assert row is not None and row.state == "pending"
    assert receiver.stored() == []


def test_a_small_file_arrives_whole_with_its_fields(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = _settings(make_settings, receiver)
    f = write_csv(tmp_path / "whole.csv", rows=300)
    ident = identify(f)
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        o = deliver_identified(settings, ledger, sink, ident)
    assert o.result == "sent"
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    assert len(receiver.state.requests) == 1


def test_the_console_script_skips_only_unused_optional_imports() -> None:
    """httpx without its CLI and httpcore without trio; trio itself stays importable for anyone else."""
    code = (
        "import sys\n"
        "from smt_watch.clistart import skip_unused_optional_imports\n"
        "skip_unused_optional_imports()\n"
        "import httpx, httpcore\n"
        "print('trio' in sys.modules, 'httpx._main' in sys.modules)\n"
        "httpx.Client().close()\n"
        "try:\n"
        "    import trio\n"
        "except ImportError:\n"
        "    print('absent')\n"
        "else:\n"
        "    print(hasattr(trio, 'run'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "False"]
    assert out[2] in ("True", "absent")  # installed (test extras: selenium) or not: either way a real answer


def _console(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``smt-watch ARGS`` through the console script's entry point, in a fresh interpreter; its last stderr
    line lists the top-level packages it imported."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr))\n"
        f"sys.argv = ['smt-watch', *{args!r}]\n"
        "from smt_watch.cli import main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)


def test_post_starts_without_the_modules_it_does_not_use(receiver: Any, tmp_path: Path) -> None:
    """A real ``post`` (issue 27: start-up is most of a small post): typer's pydantic coercion, the SFTP,
    PGP and web-server stacks are not imported, and the file still arrives."""
    import os

    f = write_csv(tmp_path / "IntervalData.csv", rows=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "INTELLIWATT_"))}
    env.update(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
               SMT_STATE_DIR=str(tmp_path / "state"), SMT_LOCAL_DIR=str(tmp_path))
    done = _console(["post", str(f)], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent ")
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    loaded = set(done.stderr.splitlines()[-1].split())
    assert {"typer", "httpx", "smt_watch"} <= loaded  # the list is real
    assert not loaded & {"pydantic", "pydantic_core", "paramiko", "gnupg", "starlette", "uvicorn", "rich"}


@pytest.mark.parametrize(("args", "expected"), [
    (["sync", "--workers", "abc"], "smt-watch sync: Invalid value for '--workers': "),
    (["sync", "--workers", "99"], "less than or equal to 16"),
    (["--log-level", "debug", "post", "--bogus"], "smt-watch post: No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
])
def test_values_typer_does_not_take_plainly_get_typers_answer(args: list[str], expected: str, tmp_path: Path) -> None:
    """Numbers and unknown names still go through typer's own checks, with its messages and exit 2."""
    done = _console(args, tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr


def test_one_command_help_is_the_same_as_with_the_whole_app(tmp_path: Path) -> None:
    """``main`` builds only the command it runs; its ``--help`` matches the one the whole app prints."""
    import os

    env = {**os.environ, "COLUMNS": "100"}
    whole = subprocess.run(
        [sys.executable, "-c", "from smt_watch.cli import app\n"
         "app(['ledger', 'list', '--help'], prog_name='smt-watch')"],
        capture_output=True, text=True, env=env, timeout=120)
    done = _console(["ledger", "list", "--help"], tmp_path, env)
    assert done.returncode == 0 and whole.returncode == 0
    assert "--state" in whole.stdout
    assert done.stdout == whole.stdout


def test_post_hashes_the_first_file_while_it_starts_up_and_still_sends_only_hashed_bytes(
        make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """``post`` starts the first file's hash pass before its imports; the pass's result is what the send is
    held to: content changed after that pass is never sent (the row waits as pending), and the next file,
    hashed as always, still goes."""
    from smt_watch.content import hash_pass
    from smt_watch.pipeline import post_files

    settings = _settings(make_settings, receiver)
    first = write_csv(tmp_path / "first.csv", rows=40)
    second = write_csv(tmp_path / "second.csv", rows=41)
    early = hash_pass(first)  # what the early pass saw
    first.write_bytes(first.read_bytes()[:-2] + b"7\n")  # then the file changed, size kept
    calls: list[int] = []

    def hashed() -> Any:
        calls.append(1)
        return early

    changed, sent = post_files(settings, [first, second], first_hashed=hashed)
    assert calls == [1]
    assert (changed.result, sent.result) == ("changed", "sent")
    assert changed.sha256 == early[0].sha256
    assert receiver.read(hashlib.sha256(second.read_bytes()).hexdigest()) == second.read_bytes()
    assert [r["filename"] for r in receiver.stored()] == ["second.csv"]


def test_an_early_hash_error_is_the_files_outcome(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """What the early pass raises (a missing file) is reported for that file as before, exit 1 in the CLI."""
    from typer.testing import CliRunner

    from smt_watch.cli import app

    settings = _settings(make_settings, receiver)
    ok = write_csv(tmp_path / "ok.csv", rows=20)
    result = CliRunner().invoke(app, ["post", str(tmp_path / "missing.csv"), str(ok), "--upload-url",
                                      settings.upload_url or "", "--state-dir", str(settings.state_dir)],
                                env={"SMT_UPLOAD_TOKEN": UPLOAD_TOKEN, "SMT_VALIDATE": "0",
                                     "SMT_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("error") and "missing.csv: no such file" in line for line in lines)
    assert any(line.startswith("sent") and "ok.csv" in line for line in lines)


@pytest.mark.parametrize("change", [None, "same size"])
def test_a_big_inline_body_is_base64_of_exactly_the_hashed_bytes(make_settings: Make, tmp_path: Path,
                                                                  change: str | None) -> None:
    """Past the read-ahead size the inline body is base64-encoded chunk by chunk in the read-ahead thread:
    the app decodes the file byte for byte (a last chunk whose length is no multiple of 3 included), progress
    counts file bytes, and a file changed after hashing is still never sent complete."""
    from smt_watch.delivery.stream import READ_AHEAD_MIN, READ_CHUNK

    with running_receiver(tmp_path / "received", admin_token="inline-admin-token-0123456789", inline=True,
                          max_body_bytes=None) as rx:
        settings = make_settings(SMT_DELIVERY="inline", INTELLIWATT_BASE_URL=rx.url,
                                 ADMIN_TOKEN="inline-admin-token-0123456789", SMT_INLINE_MAX_BYTES=str(1 << 30),
                                 SMT_VALIDATE="0", ESIID_DEFAULT="10443720000000001")
        f = tmp_path / "big_M1.csv"
        row = b"'10443720000000001,01/01/2025,01/02/2025,0:00,0:15,0.208,A,Consumption\n"
        f.write_bytes(b"ESIID,USAGE_DATE\n" + row * ((READ_AHEAD_MIN + 2 * READ_CHUNK) // len(row)) + b"9\n")
        assert f.stat().st_size > READ_AHEAD_MIN and f.stat().st_size % READ_CHUNK % 3 != 0
        ident = identify(f)
        if change:
            data = f.read_bytes()
            f.write_bytes(data[:-2] + b"8\n")
        counted: list[int] = []
        with open_ledger(settings) as ledger, closing(make_sink(settings, "inline", chunks=ledger)) as sink:
            o = deliver_identified(settings, ledger, sink, ident, progress=counted.append)
        if change:
            assert o.result == "changed"
            assert rx.stored() == []
            return
        assert o.result == "sent", o.error
        assert rx.read(ident.sha256) == f.read_bytes()
        assert sum(counted) == f.stat().st_size and len(counted) > 4


def test_a_big_hash_pass_hands_over_small_blocks_and_hashes_every_byte(tmp_path: Path) -> None:
    """Past OVERLAP_MIN the hash runs beside the sniffer in 1 MiB blocks (a few MiB in flight at most, so
    post's peak RSS stays flat in file size); the digest is the file's."""
    from smt_watch.hashing import CHUNK, OVERLAP_MIN

    f = tmp_path / "big.csv"
    block = bytes(range(256)) * 4096
    with f.open("wb") as out:
        for _ in range(OVERLAP_MIN // len(block) + 2):
            out.write(block)
        out.write(b"tail")
    seen: list[int] = []
    ident = identify(f, observe=lambda b: seen.append(len(b)))
    assert ident.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert sum(seen) == f.stat().st_size
    assert max(seen) <= CHUNK and len(seen) > OVERLAP_MIN // CHUNK


def test_post_starts_hashing_its_first_file_before_typer_loads_and_hashes_it_once(receiver: Any,
                                                                                   tmp_path: Path) -> None:
    """The console script's ``post FILE``: the first file's hash pass starts before typer is imported (cli.py
    starts it above its own imports), and post uses that pass: the file is read to hash it once before sending."""
    import os

    f = write_csv(tmp_path / "IntervalData.csv", rows=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "INTELLIWATT_"))}
    env.update(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
               SMT_STATE_DIR=str(tmp_path / "state"), SMT_LOCAL_DIR=str(tmp_path))
    code = (
        "import sys\n"
        f"sys.argv = ['smt-watch', '--log-level', 'info', 'post', {str(f)!r}]\n"
        "import smt_watch.clistart as cs\n"
        "seen = []\n"
        "init, first_pass = cs.EarlyHash.__init__, cs.first_pass\n"
        "def early(self, *a): seen.append('typer' in sys.modules); init(self, *a)\n"
        "def counted(p): seen.append(str(p)); return first_pass(p)\n"
        "cs.EarlyHash.__init__, cs.first_pass = early, counted\n"
        "from smt_watch.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print(seen, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent ")
    assert done.stderr.splitlines()[-1] == repr([False, str(f)])


@pytest.mark.parametrize("args", [
    ["post", "a.csv"], ["post", "a.csv", "b.csv"], ["post", "--force", "a.csv"], ["post", "a.csv", "--force"],
    ["post", "--delivery", "multipart", "a.csv"], ["post", "--delivery=multipart", "a.csv"],
    ["post", "--esiid", "10443720000000001", "--force", "a.csv", "b.csv"], ["post", "--", "-a.csv"],
    ["--log-level", "debug", "post", "a.csv"], ["--log-format=json", "post", "--state-dir", "s", "a.csv"],
    ["post", "--env-file", "e.env", "--upload-url", "http://x/upload", "--base-url", "http://x",
     "--inline-encoding", "base64", "--meter", "M1", "--source", "t", "a.csv"],
])
def test_the_early_guess_of_posts_first_file_is_what_typer_parses(args: list[str]) -> None:
    """cli.py guesses post's first FILE from argv before typer is loaded; for these shapes the guess is the
    path typer then parses (a guess typer does not confirm is never used, see early_hash_for)."""
    import typer.main

    from smt_watch.cli import app
    from smt_watch.clistart import early_post_file

    group = typer.main.get_command(app)
    at = args.index("post")
    ctx = group.make_context("smt-watch", list(args[:at]) or [], resilient_parsing=True)
    with ctx:
        command = group.get_command(ctx, "post")  # type: ignore[attr-defined]
        assert command is not None
        sub = command.make_context("post", list(args[at + 1:]), parent=ctx)
    assert early_post_file(args) == Path(sub.params["files"][0])


def test_post_flags_are_posts_options_without_a_value() -> None:
    """The guess skips one word after each option of post except these: they must be exactly post's flags."""
    import typer.main

    from smt_watch.cli import app
    from smt_watch.clistart import POST_FLAGS

    group = typer.main.get_command(app)
    post = group.get_command(group.make_context("smt-watch", [], resilient_parsing=True), "post")  # type: ignore[attr-defined]
    flags = {o for p in post.params if getattr(p, "is_flag", False) for o in p.opts} - {"--help", "-h"}
    assert flags == set(POST_FLAGS)


@pytest.mark.parametrize("args", [["post", "--help", "a.csv"], ["watch"], ["post"], ["ledger", "list"],
                                  ["--version", "post", "a.csv"], ["post", "--bogus"]])
def test_no_early_guess_where_there_is_no_plain_first_file(args: list[str]) -> None:
    from smt_watch.clistart import early_post_file

    assert early_post_file(args) is None


def test_an_early_pass_of_another_path_is_never_used_for_posts_first_file(tmp_path: Path) -> None:
    """The early pass answers only for the path it hashed: when typer parses another first FILE, that file
    is hashed now (its identity, not the guess's, is what is claimed and sent)."""
    from smt_watch import clistart
    from smt_watch.content import hash_pass

    guessed, parsed = write_csv(tmp_path / "guessed.csv", rows=20), write_csv(tmp_path / "parsed.csv", rows=21)
    clistart._early = clistart.EarlyHash(hash_pass, guessed)
    try:
        ident, _ = clistart.early_hash_for(hash_pass, parsed)()
    finally:
        clistart._early = None
    assert (ident.path, ident.sha256) == (parsed, hashlib.sha256(parsed.read_bytes()).hexdigest())


def test_posts_first_pass_in_big_blocks_sees_what_the_hash_pass_sees(tmp_path: Path) -> None:
    """post's first pass reads a big file in EARLY_BLOCK blocks (two in flight at most): same digest, same
    signature, same sniff as :func:`hash_pass`, which reads it in 1 MiB blocks."""
    from smt_watch.clistart import EARLY_BLOCK, first_pass
    from smt_watch.content import hash_pass
    from smt_watch.hashing import OVERLAP_MIN

    f = tmp_path / "big_M1.csv"
    row = b"10443720000000001,01/01/2025,01/02/2025,0:00,0:15,0.208,A\n"
    f.write_bytes(b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL\n"
                  + row * ((OVERLAP_MIN + 3 * EARLY_BLOCK) // len(row)) + b"tail")
    (ident, sniffer), (ident2, sniffer2) = first_pass(f), hash_pass(f)
    assert ident == ident2 and ident.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert sniffer is not None and sniffer2 is not None and sniffer.result() == sniffer2.result()
    seen: list[int] = []
    identify(f, observe=lambda b: seen.append(len(b)), read_size=EARLY_BLOCK)
    assert max(seen) == EARLY_BLOCK and sum(seen) == f.stat().st_size


@pytest.mark.parametrize("name", ["a.csv", "A.CSV", "b.zip", "c.ZIP", "d.csv.asc", "e.ASC", "f.txt", "noext"])
def test_posts_first_pass_sniffs_what_the_hash_pass_sniffs(name: str, tmp_path: Path) -> None:
    from smt_watch.clistart import first_pass
    from smt_watch.content import sniffing

    f = tmp_path / name
    f.write_bytes(b"ESIID,USAGE_DATE\n10443720000000001,01/01/2025\n")
    assert (first_pass(f)[1] is None) == (sniffing(name) is None)


def test_a_big_multipart_body_hashed_beside_the_send_arrives_byte_for_byte(make_settings: Make, receiver: Any,
                                                                           tmp_path: Path) -> None:
    """Past READ_AHEAD_MIN a multipart body is read in the sending thread and hashed beside it: the app stores
    the file byte for byte (a short last chunk included), and progress counts every file byte, chunk by chunk."""
    from smt_watch.delivery.stream import READ_AHEAD_MIN, READ_CHUNK

    settings = _settings(make_settings, receiver)
    f = tmp_path / "big_M1.csv"
    row = b"10443720000000001,01/01/2025,01/02/2025,0:00,0:15,0.208,A\n"
    f.write_bytes(b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL\n"
                  + row * ((READ_AHEAD_MIN + 2 * READ_CHUNK) // len(row)))
    assert f.stat().st_size > READ_AHEAD_MIN and f.stat().st_size % READ_CHUNK
    counted: list[int] = []
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        o = deliver_identified(settings, ledger, sink, identify(f), progress=counted.append)
    assert o.result == "sent", o.error
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    assert sum(counted) == f.stat().st_size and len(counted) == -(-f.stat().st_size // READ_CHUNK)


def test_a_small_csv_read_once_by_a_worker_is_sent_as_the_bytes_it_hashed(make_settings: Make, receiver: Any,
                                                                         tmp_path: Path) -> None:
    """A watch worker reads a small CSV once (hash, CSV check and body from the same bytes): what goes out is
    what hashed to the Idempotency-Key by construction, even when the file is rewritten after the read."""
    settings = _settings(make_settings, receiver)
    f = write_csv(settings.local_dir / "small.csv", rows=50)
    original = f.read_bytes()
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        got = _prepare(settings, ledger, f, Signature.of(f.lstat()), Cached(None))
        assert isinstance(got, tuple)
        fd, ident, _, sniffer = got
        try:
            assert ident.data == original and ident.sha256 == hashlib.sha256(original).hexdigest()
            f.write_bytes(original[:-2] + b"9\n")  # rewritten in place after the read: not what is sent
            o = deliver_identified(settings, ledger, sink, ident, sniffed=sniffer)
        finally:
            os.close(fd)
    assert o.result == "sent"
    assert receiver.read(ident.sha256) == original


def test_a_file_over_the_bound_is_not_held_in_memory(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """Memory stays bounded: past HOLD_MAX a file keeps the streaming path (re-read and re-hashed as sent)."""
    settings = _settings(make_settings, receiver)
    f = settings.local_dir / "big.csv"
    f.write_bytes(b"ESIID,USAGE_KWH\n" + b"10443720000000001,1.000\n" * (HOLD_MAX // 24 + 1))
    assert f.stat().st_size > HOLD_MAX
    with open_ledger(settings) as ledger:
        got = _prepare(settings, ledger, f, Signature.of(f.lstat()), Cached(None))
    assert isinstance(got, tuple)
    os.close(got[0])
    assert got[1].data is None and got[1].sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.mark.parametrize("change", ["same size", "grew", "shrank"])
def test_a_held_read_of_a_file_that_changed_since_its_stat_is_refused(tmp_path: Path, change: str) -> None:
    f = write_csv(tmp_path / "moving.csv", rows=20)
    sig = Signature.of(f.lstat())
    data = f.read_bytes()
    f.write_bytes({"same size": data[:-2] + b"9\n", "grew": data + b"x\n", "shrank": data[:-1]}[change])
    os.utime(f, ns=(sig.mtime_ns + 1_000_000, sig.mtime_ns + 1_000_000))  # a coarse clock: still a new mtime
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(FileChanged):
            identify_held(f, fd, sig)
    finally:
        os.close(fd)


def test_small_writes_to_the_app_leave_in_one_send_and_big_ones_at_once() -> None:
    """h11 writes a request's headers, then its body: held, they go out as one send; nothing is held past
    the next read, a big write goes at once, and a connection closed mid-request sends nothing held."""
    import socket

    import httpcore

    from smt_watch.delivery.http import HOLD_WRITE_BYTES, _HeldWrites

    a, b = socket.socketpair()
    sent: list[bytes] = []

    class Counting(httpcore.NetworkStream):
        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            sent.append(buffer)
            a.sendall(buffer)

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return a.recv(max_bytes)

        def close(self) -> None:
            a.close()

    try:
        stream = _HeldWrites(Counting())
        stream.write(b"POST / HTTP/1.1\r\n\r\n")
        stream.write(b"body")
        assert sent == []
        b.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        assert stream.read(100).startswith(b"HTTP/1.1 200")
        assert sent == [b"POST / HTTP/1.1\r\n\r\nbody"]
        assert b.recv(100) == sent[0]
        big = b"x" * HOLD_WRITE_BYTES
        stream.write(b"head")
        stream.write(big)
        assert sent[1:] == [b"head" + big]
        stream.write(b"cut short")
        stream.close()
        assert len(sent) == 2
    finally:
        b.close()
