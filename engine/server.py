"""The control endpoint: an engine exposed to dashboards in other processes.

``await engine.serve(address)`` starts a :class:`ControlServer` on a Unix
socket (the default; the file is created with mode 0600 inside a private
directory) or on ``tcp://127.0.0.1:PORT``. It speaks the newline-delimited
JSON protocol of :mod:`taskwatch.engine.wire`.

Nothing a client does can crash or stall the engine: every connection has its
own reader, writer and event-pump tasks; events reach a connection through a
bounded bus subscription, so a slow client loses events (and is told so with a
``bus.dropped`` event) rather than slowing the engine; a client whose socket
stays unwritable past ``write_timeout`` is disconnected. Bad input -- malformed
JSON, unknown commands, lines over ``max_message`` -- gets an error reply and
is counted in :meth:`ControlServer.stats`; the connection keeps working (an
oversized line is read and discarded up to its newline, never buffered).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from .errors import (
    AuthenticationFailed,
    IncompatibleVersion,
    MessageTooLarge,
    ProtocolError,
    TaskwatchError,
    TooManyConnections,
    UnknownCommand,
)
from .wire import (
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    CancelCommand,
    Command,
    ErrorReply,
    Hello,
    OkReply,
    PauseCommand,
    PingCommand,
    ResumeCommand,
    RetryCommand,
    SnapshotCommand,
    SnapshotMessage,
    SubmitCommand,
    TcpAddress,
    UnixAddress,
    Welcome,
    decode_client_message,
    encode_event,
    encode_message,
    parse_address,
    peek_id,
    read_line,
)

if TYPE_CHECKING:
    from .bus import Subscription
    from .engine import Engine

log = logging.getLogger("taskwatch.server")

#: Linux allows 108 bytes for a socket path, macOS 104; stay under both
_MAX_SOCKET_PATH = 103

#: events moved from a connection's bus subscription to its outgoing buffer at once
_PUMP_BATCH = 256

#: bytes coalesced into one socket write
_WRITE_CHUNK = 256 * 1024

#: put on a connection's outgoing queue when its event stream ends (no real line is empty)
_END = b""

#: how long a stopping server keeps writing what its clients have not received yet
_FLUSH_TIMEOUT = 1.0


class ServerInfo(BaseModel):
    """Where a control endpoint listens and the token a client must present."""

    model_config = ConfigDict(frozen=True)

    address: str
    token: str | None
    node_id: str

    def __str__(self) -> str:
        # the token stays out of log lines; it is announced once when the server starts
        return self.address


def default_socket_path(node_id: str) -> Path:
    """``$XDG_RUNTIME_DIR/taskwatch/<node>.sock``, else a private dir under the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        base = Path(runtime) / "taskwatch"
    else:
        base = Path(tempfile.gettempdir()) / f"taskwatch-{os.getuid()}"
    _ensure_private_dir(base)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", node_id)[:60] or "engine"
    return base / f"{safe}.sock"


def _ensure_private_dir(path: Path) -> None:
    # the directory is the first line of defence: in a shared /tmp another user
    # could otherwise pre-create it and watch or replace our socket
    path.mkdir(mode=0o700, parents=False, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} is not a directory owned by you; remove it, or pass an explicit socket path"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def error_details(exc: BaseException) -> dict[str, Any]:
    """An exception's public attributes as JSON (e.g. InvalidParams' ``task`` and ``errors``)."""
    attrs = {k: v for k, v in vars(exc).items() if not k.startswith("_")}
    try:
        details = to_jsonable_python(attrs, fallback=repr)
    except (ValueError, TypeError):
        return {}
    return details if isinstance(details, dict) else {}


def error_reply(message_id: Any, exc: BaseException) -> ErrorReply:
    return ErrorReply(
        id=message_id,
        error_type=type(exc).__name__,
        message=str(exc),
        details=error_details(exc) if isinstance(exc, TaskwatchError) else {},
    )


def _jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return to_jsonable_python(result)


class ControlServer:
    """Serves one engine's snapshot, live events and commands over a socket.

    Parameters
    ----------
    address:
        A Unix socket path (default: :func:`default_socket_path`) or
        ``tcp://HOST:PORT`` (port 0 picks a free port; see :attr:`address`).
    token:
        Secret a client must send in its ``hello``. Optional for Unix sockets
        (the 0600 file mode already limits who can connect); always required
        over TCP, where one is generated with :func:`secrets.token_urlsafe` if
        not given.
    allow_remote:
        TCP binds only to loopback unless this is true. The protocol is
        plaintext: the token and every run's params travel unencrypted, and a
        connected client can submit and cancel work. Expose it beyond this host
        only behind something that adds encryption (an SSH tunnel, a VPN).
    max_message:
        Longest accepted client line in bytes; longer ones are discarded.
    buffer:
        Events buffered per connection before that connection starts losing them.
    outgoing:
        Encoded lines queued per connection for its socket writer.
    write_timeout:
        Seconds a connection's socket may stay unwritable before it is dropped.
    hello_timeout:
        Seconds a new connection has to authenticate.
    snapshot_runs:
        Runs included in each snapshot (newest first).
    max_inflight:
        Commands one connection may have executing at once; more wait unread.
    max_connections:
        Clients served at once; one more is told so, counted (``refused``) and closed.
    announce:
        Print the address (and a generated token) once started.
    """

    def __init__(
        self,
        engine: Engine,
        address: str | None = None,
        *,
        token: str | None = None,
        allow_remote: bool = False,
        max_message: int = DEFAULT_MAX_MESSAGE,
        buffer: int = 1_000,
        outgoing: int = 256,
        write_timeout: float = 10.0,
        hello_timeout: float = 10.0,
        snapshot_runs: int = 500,
        max_inflight: int = 16,
        max_connections: int = 64,
        announce: bool = True,
    ) -> None:
        if max_message < 64:
            raise ValueError("max_message must be at least 64 bytes")
        if buffer < 1 or outgoing < 2 or max_inflight < 1 or max_connections < 1:
            raise ValueError("buffer, max_inflight and max_connections must be at least 1, outgoing at least 2")
        self.engine = engine
        self._target = parse_address(address) if address else None
        if isinstance(self._target, TcpAddress):
            if not self._target.is_loopback and not allow_remote:
                raise ValueError(
                    f"refusing to serve on non-loopback host {self._target.host!r}: the protocol "
                    "is unencrypted and clients can submit and cancel work. Use 127.0.0.1 (and an "
                    "SSH tunnel), or pass allow_remote=True if the network is trusted"
                )
            if token is None:
                token = secrets.token_urlsafe(32)
        if token is not None and not token:
            raise ValueError("token must not be empty")
        self.token = token
        self.max_message = max_message
        self.buffer = buffer
        self.outgoing = outgoing
        self.write_timeout = write_timeout
        self.hello_timeout = hello_timeout
        self.snapshot_runs = snapshot_runs
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.announce = announce
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._socket_path: Path | None = None
        self._socket_inode: int | None = None
        self._conns: dict[asyncio.Task[None], _Connection] = {}
        self._counts: Counter[str] = Counter()
        self._closed_dropped = 0
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """The real address: the socket path, or ``tcp://host:port`` with the chosen port."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        return self._address

    def info(self) -> ServerInfo:
        return ServerInfo(address=self.address, token=self.token, node_id=self.engine.node_id)

    async def start(self) -> None:
        if self._server is not None:
            return
        target = self._target or UnixAddress(str(default_socket_path(self.engine.node_id)))
        if isinstance(target, TcpAddress):
            await self._start_tcp(target)
        else:
            await self._start_unix(Path(target.path))
        if self.announce:
            extra = f" (token: {self.token})" if self.token else ""
            print(f"taskwatch: engine {self.engine.node_id} serving at {self._address}{extra}", flush=True)

    async def _start_tcp(self, target: TcpAddress) -> None:
        # "localhost" may resolve to two families, which with port 0 would get two ports
        host = "127.0.0.1" if target.host == "localhost" else target.host
        self._server = await asyncio.start_server(
            self._on_connect, host, target.port, limit=self.max_message
        )
        port = self._server.sockets[0].getsockname()[1]
        self._address = str(TcpAddress(host, port))

    async def _start_unix(self, path: Path) -> None:
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"socket path {path} is too long for a Unix socket; choose a shorter one")
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            # chmod before listen(): until listen nobody can connect, so no
            # client ever reaches a socket with the umask's looser mode
            os.chmod(path, 0o600)
            self._socket_inode = path.stat().st_ino
            self._socket_path = path
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, limit=self.max_message
            )
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
        self._address = str(path)

    async def stop(self) -> None:
        """Close the listener and every connection, await their tasks, remove the socket file."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._conns)
        # end each event stream where it is: what is buffered for a client (the
        # engine's last events among it) is still written, for a short while
        for conn in self._conns.values():
            if conn.sub is not None:
                conn.sub.close()
        if tasks:
            await asyncio.wait(tasks, timeout=_FLUSH_TIMEOUT)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        path = self._socket_path
        if path is None:
            return
        # only our own socket: another server may have replaced it since
        with contextlib.suppress(OSError):
            if path.stat().st_ino == self._socket_inode:
                path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ connections

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a plain callback (not a coroutine) so every connection task is ours to track
        if self._stopped:
            writer.close()
            return
        if len(self._conns) >= self.max_connections:
            # each connection holds a buffer and three tasks: bound them, and say why
            self._counts["refused"] += 1
            writer.write(encode_message(error_reply(None, TooManyConnections(self.max_connections))))
            writer.close()
            return
        self._counts["connections"] += 1
        conn = _Connection(self, reader, writer)
        task = asyncio.get_running_loop().create_task(conn.run(), name="taskwatch-control-conn")
        self._conns[task] = conn
        task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        conn = self._conns.pop(task, None)
        if conn is not None:
            self._closed_dropped += conn.dropped
        if not task.cancelled() and task.exception() is not None:
            log.warning("control connection failed", exc_info=task.exception())

    def count(self, what: str) -> None:
        self._counts[what] += 1

    def token_ok(self, token: str | None) -> bool:
        if self.token is None:
            return True
        if token is None:
            return False
        return hmac.compare_digest(token.encode(), self.token.encode())

    def stats(self) -> dict[str, int]:
        """Counters: connections, refused, active, auth_failures, malformed, oversized,
        unknown, commands, errors, events_dropped, slow_disconnects."""
        counts = {
            key: self._counts[key]
            for key in (
                "connections",
                "refused",
                "auth_failures",
                "malformed",
                "oversized",
                "unknown",
                "commands",
                "errors",
                "slow_disconnects",
            )
        }
        counts["active"] = len(self._conns)
        counts["events_dropped"] = self._closed_dropped + sum(c.dropped for c in self._conns.values())
        return counts

    # ------------------------------------------------------------------ commands

    async def execute(self, cmd: Command) -> Any:
        """Run one command on the engine; returns its JSON result."""
        engine = self.engine
        match cmd:
            case SubmitCommand(task=task, params=params, key=key):
                return _jsonable((await engine.submit(task, params, key=key)).record())
            case CancelCommand(run_id=run_id):
                return _jsonable(await engine.cancel(run_id))
            case RetryCommand(run_id=run_id):
                return _jsonable((await engine.retry(run_id)).record())
            case PauseCommand(name=name):
                return _jsonable(engine.pause_periodic(name))
            case ResumeCommand(name=name):
                return _jsonable(engine.resume_periodic(name))
            case SnapshotCommand(runs_limit=limit):
                return _jsonable(engine.snapshot(self.snapshot_runs if limit is None else limit))
            case PingCommand():
                return None
        raise UnknownCommand(f"command {getattr(cmd, 'type', '?')!r} is not handled")

    def __repr__(self) -> str:
        return f"<ControlServer {self._address or 'unstarted'} active={len(self._conns)}>"


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file left by a dead server; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise OSError(errno.EADDRINUSE, f"another server is already listening at {path}")
    finally:
        probe.close()


class _Connection:
    """One client: handshake, then reader, writer and event-pump tasks until either side ends."""

    def __init__(
        self, server: ControlServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.out: asyncio.Queue[bytes] = asyncio.Queue(server.outgoing)
        self.sub: Subscription | None = None
        self.commands: set[asyncio.Task[None]] = set()
        self.inflight = asyncio.Semaphore(server.max_inflight)
        #: set once everything queued before the end of the stream is written
        self.flushed = asyncio.Event()

    @property
    def dropped(self) -> int:
        return self.sub.dropped if self.sub is not None else 0

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except (ConnectionError, OSError):
            pass  # the peer went away; nothing to tell it
        finally:
            await self._teardown()

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> bool:
        server = self.server
        try:
            async with asyncio.timeout(server.hello_timeout):
                line = await read_line(self.reader, server.max_message)
        except TimeoutError:
            await self._refuse(None, ProtocolError(f"no hello within {server.hello_timeout:g} s"))
            return False
        except MessageTooLarge as exc:
            server.count(exc.reason)
            await self._refuse(None, exc)
            return False
        if line is None:
            return False
        try:
            msg = decode_client_message(line, server.max_message)
        except ProtocolError as exc:
            server.count(getattr(exc, "reason", "malformed"))
            await self._refuse(peek_id(line), exc)
            return False
        if not isinstance(msg, Hello):
            server.count("unknown")
            await self._refuse(peek_id(line), UnknownCommand("the first message must be hello"))
            return False
        if msg.version != PROTOCOL_VERSION:
            await self._refuse(None, IncompatibleVersion(PROTOCOL_VERSION, msg.version))
            return False
        if not server.token_ok(msg.token):
            server.count("auth_failures")
            await self._refuse(None, AuthenticationFailed())
            return False
        return True

    async def _refuse(self, message_id: Any, exc: BaseException) -> None:
        """Send one error line directly (the writer task is not running yet)."""
        self.writer.write(encode_message(error_reply(message_id, exc)))
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(self.server.write_timeout):
                await self.writer.drain()

    # ------------------------------------------------------------------ streaming

    async def _serve(self) -> None:
        engine = self.server.engine
        # subscribe before the snapshot, with no await between them: every event
        # is either reflected in the snapshot or delivered after it
        self.sub = engine.bus.subscribe(replay=0, maxsize=self.server.buffer)
        snapshot = engine.snapshot(self.server.snapshot_runs)
        self.out.put_nowait(
            encode_message(
                Welcome(
                    version=PROTOCOL_VERSION,
                    node_id=engine.node_id,
                    max_message=self.server.max_message,
                )
            )
        )
        self.out.put_nowait(encode_message(SnapshotMessage(snapshot=snapshot)))
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._read_loop(), name="taskwatch-control-read"),
            loop.create_task(self._pump(self.sub), name="taskwatch-control-pump"),
            loop.create_task(self._write_loop(), name="taskwatch-control-write"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, ConnectionError | OSError):
                # a bug here must be visible; it still only costs this one connection
                log.warning("control connection %s failed", task.get_name(), exc_info=exc)

    async def _read_loop(self) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await read_line(self.reader, server.max_message)
            except MessageTooLarge as exc:
                server.count(exc.reason)
                await self.out.put(encode_message(error_reply(None, exc)))
                continue
            except ConnectionError:
                return
            if line is None:
                return
            if not line.strip():
                continue  # blank lines are harmless (e.g. typed by hand into nc)
            try:
                msg = decode_client_message(line, server.max_message)
            except ProtocolError as exc:
                server.count(getattr(exc, "reason", "malformed"))
                await self.out.put(encode_message(error_reply(peek_id(line), exc)))
                continue
            if isinstance(msg, Hello):
                server.count("unknown")
                err = UnknownCommand("hello is only valid as the first message")
                await self.out.put(encode_message(error_reply(None, err)))
                continue
            server.count("commands")
            # commands run as tasks so a slow one (cancel waits for its run) does
            # not hold up the next; the semaphore bounds how many at once
            await self.inflight.acquire()
            task = loop.create_task(self._command(msg), name=f"taskwatch-control-{msg.type}")
            self.commands.add(task)
            task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self.commands.discard(task)
        self.inflight.release()

    async def _command(self, cmd: Command) -> None:
        try:
            result = await self.server.execute(cmd)
        except Exception as exc:
            self.server.count("errors")
            if not isinstance(exc, TaskwatchError):
                log.warning("control command %r failed", cmd, exc_info=True)
            line = encode_message(error_reply(cmd.id, exc))
        else:
            line = encode_message(OkReply(id=cmd.id, result=result))
        await self.out.put(line)

    async def _pump(self, sub: Subscription) -> None:
        # waiting on a full outgoing buffer lets the subscription fill up and drop
        # for this client alone: the engine's publish never waits
        out = self.out
        while await sub.wait():
            for event in sub.get_batch(_PUMP_BATCH):
                await out.put(encode_event(event))
        # the stream ended (the server is stopping): hand the writer an end mark
        # and let it write everything before it, then end this connection
        await out.put(_END)
        await self.flushed.wait()

    async def _write_loop(self) -> None:
        out = self.out
        writer = self.writer
        while True:
            chunks = [await out.get()]
            size = len(chunks[0])
            while size < _WRITE_CHUNK and not out.empty():
                chunk = out.get_nowait()
                chunks.append(chunk)
                size += len(chunk)
            ending = any(chunk is _END for chunk in chunks)
            if ending:
                chunks = [chunk for chunk in chunks if chunk is not _END]
            try:
                writer.write(b"".join(chunks))
                async with asyncio.timeout(self.server.write_timeout):
                    await writer.drain()
            except TimeoutError:
                self.server.count("slow_disconnects")
                log.warning("dropping a control client that read nothing for %s s", self.server.write_timeout)
                return
            except (ConnectionError, OSError):
                return
            if ending:
                self.flushed.set()
                return

    async def _teardown(self) -> None:
        for task in list(self.commands):
            task.cancel()
        await asyncio.gather(*self.commands, return_exceptions=True)
        if self.sub is not None:
            self.sub.close()
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
