"""A real ``redis-server`` on a free loopback port, for the Redis lease tests.

Registered as a pytest plugin from ``conftest.py``. The ``redis_server``
fixture starts one in the test's temp dir (no persistence: nothing outlives
the test) and stops it afterwards; ``persistent_redis_server`` keeps an
append-only file synced on every write, so a test can kill and restart it
and find its data (the lease's term counter) again, as a production Redis
configured for leases would.

Without ``redis-server`` on PATH the tests that need it skip, naming the
install command; under ``CI=true`` they fail instead, so CI never passes by
skipping them.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import server_missing

INSTALL = "sudo apt-get install -y redis-server"
#: generous: a loaded 2-core machine starts it in well under a second
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """The ``redis-server`` path; skips the test (fails it under CI) when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        server_missing(f"redis-server is not installed; install it with: {INSTALL}")
    return path


def _with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so the kernel stops it if the test process dies without its fixtures'
    teardown (util-linux ``setpriv --pdeathsig``; as is where that is missing)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process in ``directory``, on ``port`` (kept across restarts)."""

    def __init__(self, binary: str, directory: Path, *, persistent: bool = False, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.persistent = persistent
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(_with_parent(self.command()), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {START_TIMEOUT} s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGKILL for a crash); returns once the process is gone."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence)."""
    server = RedisServer(redis_binary(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def persistent_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` whose data survives ``restart()`` (append-only file, fsync always)."""
    server = RedisServer(redis_binary(), tmp_path / "redis", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
