"""A real PostgreSQL server for the tests, started from the system's binaries.

One server per test session (``initdb`` into a temp dir, a free loopback
port, the socket in that dir), and a fresh database per test, copied from a
template, so a test costs milliseconds, not a server start. PostgreSQL
refuses to run as root: when the tests run as root the server runs as the
``postgres`` user. Without the binaries a test is skipped with the install
command, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import signal
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from .helpers import server_missing

INSTALL = "sudo apt-get install -y postgresql  (or: make test, which installs it)"
SUPERUSER = "postgres"


def find_bin(program: str) -> str | None:
    """``program`` in the newest /usr/lib/postgresql/*/bin (Debian keeps the server there), else on PATH."""
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{program}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else shutil.which(program)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: its binaries' dir, data dir, port, and the user it runs as."""

    bindir: str
    root: str
    port: int
    run_as: str | None

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _popen_kw(self) -> dict[str, Any]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        kw: dict[str, Any] = {"env": env, "cwd": self.root}
        if self.run_as is not None:
            kw.update(user=self.run_as, group=pwd.getpwnam(self.run_as).pw_gid, extra_groups=[])
        return kw

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (as the server's user); raise with its output on failure."""
        cmd = [find_bin(args[0]) or os.path.join(self.bindir, args[0]), *args[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **self._popen_kw())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql as the superuser; its output."""
        out = self.run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", statement,
        )  # fmt: skip
        return out.stdout.strip()

    def pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            # a test server: durability off (the tests kill nodes, never the machine)
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        log = os.path.join(self.root, "server.log")
        self.run("pg_ctl", action, "-D", self.data, "-l", log, "-w", "-t", "60", "-o", options, *extra, timeout=90)

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "60", timeout=90)

    def _processes(self) -> list[int]:
        """The postmaster and its children, read from /proc (no ``ps``: a slim image has none)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the parent's pid is the second field after the command, which is in parentheses
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            if ppid == postmaster:
                children.append(int(entry))
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP the server and every process of it: a database that answers nothing and
        refuses nothing (a paused VM, a network that drops packets)."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def restart(self) -> None:
        """``pg_ctl restart``: every connection is cut, the data stays."""
        self.pg_ctl("restart", "-m", "fast")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(os.path.join(self.root, "server.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def schema_script(versions: int) -> list[str]:
    """SQL that builds the schema as the first ``versions`` migrations left it (an older taskwatch's)."""
    from taskwatch.engine.store import queries as Q

    script = [Q.CREATE_MIGRATIONS]
    for version, name, statements in Q.MIGRATIONS[:versions]:
        script += [Q.postgres_ddl(sql) for sql in statements]
        quoted = name.replace("'", "''")  # (the names are text: "the server's time of ...")
        script.append(f"INSERT INTO schema_migrations VALUES ({version}, '{quoted}', 0)")
    return script


def _missing(what: str) -> NoReturn:
    server_missing(f"PostgreSQL is not installed ({what} not found); install it with: {INSTALL}")


def start_server() -> PostgresServer:
    initdb = find_bin("initdb")
    if initdb is None or find_bin("pg_ctl") is None or find_bin("psql") is None:
        _missing("initdb, pg_ctl or psql")
        raise AssertionError("unreachable")
    bindir = os.path.dirname(initdb)
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no 'postgres' user to run the server as", pytrace=False)
        run_as = "postgres"
    root = tempfile.mkdtemp(prefix="taskwatch-pg-")
    if run_as is not None:
        shutil.chown(root, user=run_as, group=pwd.getpwnam(run_as).pw_gid)
    os.chmod(root, 0o755)
    server = PostgresServer(bindir=bindir, root=root, port=0, run_as=run_as)
    try:
        server.run(
            "initdb", "-D", server.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        last: Exception | None = None
        for _ in range(5):  # another process may take the free port between the probe and the bind
            server.port = _free_port()
            try:
                server.start()
                break
            except RuntimeError as exc:
                last = exc
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{server.log_tail()}") from last
        # the per-test databases are copies of this one (FILE_COPY: fastest for a small template)
        server.sql("CREATE DATABASE tw_template")
    except BaseException:
        try:
            server.stop("immediate")
        except Exception:  # noqa: BLE001 - it may never have started
            pass
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; stopped and its data removed afterwards."""
    server = start_server()
    try:
        yield server
    finally:
        try:
            server.stop("fast")
        except Exception:  # noqa: BLE001 - a test may have stopped it; remove it anyway
            try:
                server.stop("immediate")
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(server.root, ignore_errors=True)


_numbers = itertools.count(1)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """``postgresql://...`` of a fresh, empty database, dropped after the test."""
    name = f"tw_{os.getpid()}_{next(_numbers)}"
    postgres_server.sql(f"CREATE DATABASE {name} TEMPLATE tw_template STRATEGY FILE_COPY")
    try:
        yield postgres_server.url(name)
    finally:
        deadline = time.monotonic() + 30
        while True:
            try:
                postgres_server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
