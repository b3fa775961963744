"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temp dir, on a free loopback port.

Never the system service: the cluster belongs to the test session (one per xdist worker), runs as an
unprivileged user (``postgres`` when the tests run as root, else the current user), listens on 127.0.0.1
and a private socket directory, and is stopped and deleted at the end. ``fsync=off``: the tests stop and
restart the server, they never cut its power. Each test gets a database of its own (:meth:`new_database`).

The tests' cluster (``PgCluster(in_memory=True)``) lives in /dev/shm (tmpfs) where there is one, and each
database is a file copy of a template that already has the schema: a database on disk cost ~0.4 s to create
on a loaded machine (PG 15's default WAL_LOG strategy writes its 7.5 MB through the WAL), and deleting a
worker's ~150 of them (~1 GB, 45,000 files) at the end of the run took 10 s of wall time. Neither is what a
test proves: the server, its protocol, its locks, restarts and outages are the same. The benchmarks keep the
default (on disk, a plain ``CREATE DATABASE``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ports import free_port

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
ADMIN = "smt_admin"
ADMIN_PASSWORD = "admin-pw-Ze3"
USER = "smtwatch"
TEMPLATE = "smt_template"  # what each test's database is copied from (in_memory clusters)
PASSWORD = "pg-pw-7Kq2-secret"
START_TIMEOUT = 60.0
READY_POLL_SECONDS = 0.1  # how often wait_until_ready asks again: a starting server gives no event to wait on


def pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


def available() -> str | None:
    """None when a cluster can be made here, else the reason it cannot."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if pg_bin(tool) is None:
            return f"{tool} not found (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the cluster as"
    return None


def memory_dir(need: int = 4 << 30) -> str | None:
    """/dev/shm when it is a tmpfs anyone may write to with ``need`` bytes free, else None (the temp dir)."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    if not os.access(shm, os.W_OK | os.X_OK) or st.f_bavail * st.f_frsize < need:
        return None
    return str(shm)


class PgCluster:
    def __init__(self, in_memory: bool = False) -> None:
        """``in_memory``: the data directory in /dev/shm (when :func:`memory_dir` finds room) and databases
        copied from a template (:meth:`new_database`); the tests' cluster. The default is the benchmarks'."""
        # Its own directory under /tmp (or /dev/shm), not under pytest's tmp_path: those are private to the
        # test user, and the server runs as another one.
        self.base = Path(tempfile.mkdtemp(prefix="smt-watch-pg-", dir=memory_dir() if in_memory else None))
        self._template = in_memory
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "server.log"
        self.port = free_port()
        self._user: pwd.struct_passwd | None = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._databases = 0
        self._role_made = False
        self._template_made = False

    # --- running the tools as the cluster's owner -------------------------------------------------------

    def _run(self, *argv: str, check: bool = True, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user.pw_name, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if check and done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def init(self) -> None:
        self.sock.mkdir(exist_ok=True)
        pwfile = self.base / "pw"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        if self._user is not None:
            for p in (self.base, self.sock, pwfile):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
            self.base.chmod(0o700)
        initdb = pg_bin("initdb")
        assert initdb
        self._run(initdb, "-D", str(self.data), "-U", ADMIN, "--pwfile", str(pwfile), "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.sock}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
                "shared_buffers = 32MB\nlog_min_messages = warning\n"
            )

    def start(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(START_TIMEOUT)), "start")

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- databases --------------------------------------------------------------------------------------

    def admin_sql(self, sql: str, database: str = "postgres") -> str:
        psql = pg_bin("psql")
        assert psql
        out = self._run(psql, "-h", str(self.sock), "-p", str(self.port), "-U", ADMIN, "-d", database,
                        "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql)
        return out.stdout

    def new_database(self) -> str:
        """A fresh database owned by the admin, where the ``smtwatch`` role owns schema ``smt_watch``
        (the README's set-up SQL); returns the URL the program is given. Over the admin's socket with psycopg,
        not three ``psql`` processes: every PostgreSQL test pays for it."""
        import psycopg

        self._databases += 1
        name = f"iw_{os.getpid()}_{self._databases}"
        with psycopg.connect(**self._admin(), dbname="postgres", autocommit=True) as conn:
            if not self._role_made:  # once per cluster (a restart keeps it)
                conn.execute(
                    f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{USER}') THEN "
                    f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$;"
                )
                self._role_made = True
            if not self._template:
                conn.execute(f"CREATE DATABASE {name}")
            else:  # a copy of the template, the schema in it: one statement, files copied, no WAL
                if not self._template_made:
                    conn.execute(f"CREATE DATABASE {TEMPLATE} STRATEGY FILE_COPY")
                    self._make_schema(TEMPLATE)
                    self._template_made = True
                conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
                return self.url(name)
        self._make_schema(name)
        return self.url(name)

    def _make_schema(self, database: str) -> None:
        import psycopg

        with psycopg.connect(**self._admin(), dbname=database, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA smt_watch AUTHORIZATION {USER}")

    def _admin(self) -> dict[str, str]:
        """The admin over the cluster's private socket (trusted: no password round trips)."""
        return {"host": str(self.sock), "port": str(self.port), "user": ADMIN, "connect_timeout": "10"}

    def url(self, database: str, user: str = USER, password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def wait_until_ready(cluster: PgCluster, deadline: float) -> None:
    """After ``start`` returns the server accepts connections; this is for callers that restart it
    in the background."""
    import psycopg

    while True:
        try:
            psycopg.connect(cluster.url("postgres", ADMIN, ADMIN_PASSWORD), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(READY_POLL_SECONDS)  # the poll interval of this deadline loop, not a pause


# --- pytest fixtures (conftest imports these) --------------------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One cluster per test session (per xdist worker). Skipped with the reason where PostgreSQL is absent;
    under CI (``CI=true``) its absence is an error, so a run can never pass by skipping it."""
    reason = available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests cannot run: {reason}")
        pytest.skip(reason)
    cluster = PgCluster(in_memory=True)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh database for one test, with the ``smt_watch`` schema owned by the ``smtwatch`` role."""
    return pg_cluster.new_database()
