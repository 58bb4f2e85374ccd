"""What ``taskwatch web`` writes on its stderr when clients misbehave: never the secret URL, no
local variables of its frames, and no traceback for a browser that went away.

A real server (``python -m taskwatch.tui web``, the demo engine) and raw sockets as clients;
its stderr is read once it has exited.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_web_security import REPO, free_port

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc")

START_TIMEOUT = 20.0


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.secret = secrets.token_urlsafe(32)
        self.err_path = tmp_path / "web.err"
        with self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskwatch.tui", "web", "--port", str(self.port)],
                cwd=REPO,
                env={**os.environ, "TASKWATCH_WEB_SECRET": self.secret},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"nothing listened on {self.port} within {START_TIMEOUT} s"
                time.sleep(0.05)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def stop(self) -> str:
        """SIGTERM, wait for the exit, and what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.stderr()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    web = Server(tmp_path)
    try:
        yield web
    finally:
        web.stop()


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a browser tab killed or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def unsent(server_port: int, client_port: int) -> int:
    """Bytes the server's socket to ``client_port`` holds that the client has not taken (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if (local, remote) == (server_port, client_port):
            return int(fields[4].split(":")[0], 16)
    return 0


def test_a_malformed_request_on_the_secret_path_does_not_log_the_secret(server: Server) -> None:
    sock = server.connect()
    # HTTP/1.1 without a Host header: aiohttp refuses it and logs the error with its traceback
    sock.sendall(f"GET /{server.secret}/ HTTP/1.1\r\nUser-Agent: probe\r\n\r\n".encode())
    sock.settimeout(10)
    assert sock.recv(200).startswith(b"HTTP/1.0 400")
    sock.close()
    err = server.stop()
    assert "Missing 'Host' header" in err  # the error itself is still reported
    assert server.secret not in err and server.secret[:20] not in err
    assert "locals" not in err


def test_a_client_that_stops_reading_and_drops_leaves_no_traceback(server: Server) -> None:
    sock = server.connect(rcvbuf=4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /{server.secret}/ws?width=800&height=300 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    client_port = sock.getsockname()[1]
    # never read: the server's socket buffer fills until it stops growing, and the session's
    # writes then wait on the websocket
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while not (len(seen) > 10 and seen[-1] > 0 and len(set(seen[-10:])) == 1):
        assert time.monotonic() < deadline, f"the server's send buffer never filled: {seen[-10:]}"
        seen.append(unsent(server.port, client_port))
        time.sleep(0.1)
    reset(sock)
    err = server.stop()
    assert server.proc.returncode == 128 + signal.SIGTERM, err  # ended by the SIGTERM, as a shell reports it
    for noise in ("Task exception was never retrieved", "ConnectionError", "Event loop is closed", "Traceback"):
        assert noise not in err, err
