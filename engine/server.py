"""The control endpoint: an engine exposed to dashboards in other processes.

``await engine.serve(address)`` starts a :class:`ControlServer` on a Unix
socket (the default; the file is created with mode 0600 inside a private
directory) or on ``tcp://127.0.0.1:PORT``. It speaks the newline-delimited
JSON protocol of :mod:`taskwatch.engine.wire`.

Nothing a client does can crash or stall the engine, or grow its memory
without bound:

* Before its hello, a connection is in a small pool of its own
  (``max_handshakes``): it has ``hello_timeout`` seconds and ``max_hello``
  bytes to say hello, and it does not count against ``max_connections``. When
  the pool is full, the connection that has waited longest is closed to make
  room, so idle or slow sockets cannot keep a real client out.
* After a valid hello a connection counts against ``max_connections``; one more
  is told so and closed.
* Every connection has its own reader, writer and event-pump tasks. Events
  reach it through a bounded bus subscription, so a slow client loses events
  (and is told so with a ``bus.dropped`` event) rather than slowing the engine.
  What waits for its socket is bounded in lines (``outgoing``) and in bytes
  (``max_outgoing_bytes``): events may fill half the bytes and then wait
  (and are dropped as above); a reply that would go over the bound
  disconnects the client, as does a socket that stays unwritable past
  ``write_timeout``.
* No line sent is longer than the connection's ``max_send``: values too large
  to send are cut down in snapshots, events and replies, and runs are left
  out of a snapshot that is still too long (see
  :mod:`taskwatch.engine.snapshot`); ``get`` returns a run's full record.

Bad input -- malformed JSON, unknown commands, lines over ``max_message`` --
gets an error reply and is counted in :meth:`ControlServer.stats`; after the
hello the connection keeps working (an oversized line is read and discarded up
to its newline, never buffered).
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
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

from .errors import (
    AuthenticationFailed,
    IncompatibleVersion,
    InvalidAddress,
    InvalidConfiguration,
    MessageTooLarge,
    ProtocolError,
    ReplyTooLarge,
    TaskwatchError,
    TooManyConnections,
    TooManyHandshakes,
    UnknownCommand,
    WeakToken,
)
from .events import EventsDropped
from .snapshot import (
    DEFAULT_MAX_VALUE,
    EncodedSnapshot,
    RunJsonCache,
    Snapshot,
    bounded_json,
    encode_snapshot,
    truncate_text,
    truncate_value,
)
from .wire import (
    DEFAULT_MAX_HELLO,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_SEND,
    PROTOCOL_VERSION,
    CancelCommand,
    Command,
    FireTriggerCommand,
    ErrorReply,
    GetCommand,
    Hello,
    MessageId,
    PauseCommand,
    PauseQueueCommand,
    PingCommand,
    PurgeQueueCommand,
    RestartWorkerCommand,
    ResumeCommand,
    ResumeQueueCommand,
    RetryCommand,
    SnapshotCommand,
    StartWorkerCommand,
    StopWorkerCommand,
    SubmitCommand,
    TcpAddress,
    UnixAddress,
    Welcome,
    decode_client_message,
    encode_message,
    event_line,
    ok_line,
    parse_address,
    peek_id,
    read_line,
    snapshot_line,
)

if TYPE_CHECKING:
    from .bus import Subscription
    from .engine import Engine
    from .events import BaseEvent

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

#: shorter tokens are refused: a guessable token protects nothing
MIN_TOKEN_BYTES = 16

#: default bound on the bytes waiting for one connection's socket
DEFAULT_MAX_OUTGOING_BYTES = 32 << 20

#: a bounded run record or event holds about a dozen values of at most max_value
#: bytes each; max_send must be this many values, so that any of them fits a line
_VALUES_PER_LINE = 32

#: what snapshot_line adds around a snapshot's JSON, newline included
_SNAPSHOT_FRAME = len(snapshot_line(b""))


class ServerInfo(BaseModel):
    """Where a control endpoint listens and the token a client must present."""

    model_config = ConfigDict(frozen=True)

    address: str
    token: str | None
    node_id: str

    def __str__(self) -> str:
        # the token stays out of log lines; it is announced once when the server starts
        return self.address


def new_token() -> str:
    """A fresh access token that a command line can carry as ``--token T``.

    ``token_urlsafe`` may start with ``-``, which argument parsers take for
    an option; such a token is drawn again.
    """
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


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


def error_reply(message_id: Any, exc: BaseException, max_value: int = DEFAULT_MAX_VALUE) -> ErrorReply:
    """The reply for a failed command, its message and each detail bounded like any value sent.

    (An error can quote what it was given: ``InvalidParams`` lists the bad input.)
    """
    details = error_details(exc) if isinstance(exc, TaskwatchError) else {}
    return ErrorReply(
        id=message_id,
        error_type=type(exc).__name__,
        message=truncate_text(str(exc), max_value),
        details={key: truncate_value(value, max_value) for key, value in details.items()},
    )


class ControlServer:
    """Serves one engine's snapshot, live events and commands over a socket.

    Parameters
    ----------
    address:
        A Unix socket path (default: :func:`default_socket_path`) or
        ``tcp://HOST:PORT`` (port 0 picks a free port; see :attr:`address`).
    token:
        Secret a client must send in its ``hello``, at least 16 bytes (e.g.
        :func:`secrets.token_urlsafe(32) <secrets.token_urlsafe>`); a shorter
        one raises :class:`~taskwatch.engine.errors.WeakToken`. Optional for
        Unix sockets (the 0600 file mode already limits who can connect);
        always required over TCP, where one is generated if not given.
    allow_remote:
        TCP binds only to loopback unless this is true. The protocol is
        plaintext: the token and every run's params travel unencrypted, and a
        connected client can submit and cancel work. Expose it beyond this host
        only behind something that adds encryption (an SSH tunnel, a VPN).
    max_message:
        Longest accepted client line in bytes, after the hello; longer ones are
        discarded.
    max_hello:
        Longest accepted hello line in bytes (default 4096). It is read before
        the client has proved anything, so a longer one is refused as soon as
        the excess arrives, and the connection closed.
    max_handshakes:
        Connections that have not yet said hello, at once (default 16). When
        one more arrives, the one that has waited longest is closed (counted
        as ``handshakes_evicted``): idle sockets cannot keep a real client out,
        nor count against ``max_connections``.
    hello_timeout:
        Seconds a new connection has for its whole handshake: sending its hello
        and, if refused, reading why (default 5).
    buffer:
        Events buffered per connection before that connection starts losing them.
    outgoing:
        Encoded lines queued per connection for its socket writer.
    max_outgoing_bytes:
        Bytes queued per connection for its socket writer, counting those
        handed to the socket and not yet sent (default 32 MiB; at least twice
        ``max_send``). Events wait once they fill half of it (and are dropped
        for that client if they keep coming); a reply that would go over it
        disconnects the client (counted as ``overflow_disconnects``).
    max_send:
        Longest line sent to a client, in bytes (default 16 MiB), announced in
        ``welcome``; a client's hello may ask for less, down to
        ``32 * max_value``. Snapshots keep within it by cutting values and then
        leaving out runs (counted as ``values_truncated`` and ``runs_omitted``).
    max_value:
        Longest value, in bytes of JSON, in snapshots, events and replies other
        than ``get`` (default 16 KiB); larger ones are cut down as
        :mod:`taskwatch.engine.snapshot` describes.
    write_timeout:
        Seconds a connection's socket may stay unwritable before it is dropped.
    snapshot_runs:
        Runs included in each snapshot (newest first).
    max_inflight:
        Commands one connection may have executing at once; more wait unread.
    max_connections:
        Authenticated clients served at once; one more is told so after its
        hello, counted (``refused``) and closed.
    announce:
        Print the address (and the token, if it was generated here) once started.
    """

    def __init__(
        self,
        engine: Engine,
        address: str | None = None,
        *,
        token: str | None = None,
        allow_remote: bool = False,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_hello: int = DEFAULT_MAX_HELLO,
        max_handshakes: int = 16,
        hello_timeout: float = 5.0,
        buffer: int = 1_000,
        outgoing: int = 256,
        max_outgoing_bytes: int = DEFAULT_MAX_OUTGOING_BYTES,
        max_send: int = DEFAULT_MAX_SEND,
        max_value: int = DEFAULT_MAX_VALUE,
        write_timeout: float = 10.0,
        snapshot_runs: int = 500,
        max_inflight: int = 16,
        max_connections: int = 64,
        announce: bool = True,
    ) -> None:
        problems = []
        if max_message < 64 or max_hello < 256:
            problems.append("max_message must be at least 64 bytes, max_hello at least 256")
        if buffer < 1 or outgoing < 2 or max_inflight < 1 or max_connections < 1 or max_handshakes < 1:
            problems.append(
                "buffer, max_inflight, max_connections and max_handshakes must be at least 1, "
                "outgoing at least 2"
            )
        if not hello_timeout > 0:
            problems.append("hello_timeout must be positive")
        if max_value < 1024:
            problems.append("max_value must be at least 1024 bytes")
        elif max_send < _VALUES_PER_LINE * max_value:
            problems.append(
                f"max_send must be at least {_VALUES_PER_LINE} * max_value "
                f"({_VALUES_PER_LINE * max_value} bytes), so that any bounded run or event fits a line"
            )
        elif max_outgoing_bytes < 2 * max_send:
            problems.append(
                "max_outgoing_bytes must be at least 2 * max_send: a full snapshot reply must fit "
                "beside the events that may be waiting"
            )
        if problems:
            raise InvalidConfiguration("ControlServer", problems)
        self.engine = engine
        #: the token was made here (and may be printed), not given by the caller
        self._generated = False
        self._target = parse_address(address) if address else None
        if isinstance(self._target, TcpAddress):
            if not self._target.is_loopback and not allow_remote:
                raise InvalidAddress(
                    address,
                    f"refusing to serve on non-loopback host {self._target.host!r}: the protocol "
                    "is unencrypted and clients can submit and cancel work",
                    "use 127.0.0.1 (and an SSH tunnel), or pass allow_remote=True if the network is trusted",
                )
            if token is None:
                token = new_token()
                self._generated = True
        if token is not None and len(token.encode()) < MIN_TOKEN_BYTES:
            raise WeakToken(len(token.encode()), MIN_TOKEN_BYTES)
        self.token = token
        self.max_message = max_message
        self.max_hello = max_hello
        self.max_handshakes = max_handshakes
        self.hello_timeout = hello_timeout
        self.buffer = buffer
        self.outgoing = outgoing
        self.max_outgoing_bytes = max_outgoing_bytes
        self.max_send = max_send
        self.max_value = max_value
        #: the least max_send a client's hello can ask for
        self.min_send = _VALUES_PER_LINE * max_value
        self.write_timeout = write_timeout
        self.snapshot_runs = snapshot_runs
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.announce = announce
        self._server: asyncio.Server | None = None
        self._address: str | None = None
        self._socket_path: Path | None = None
        self._socket_inode: int | None = None
        self._conns: dict[asyncio.Task[None], _Connection] = {}
        #: connections that have not said hello yet, oldest first (a dict keeps the order)
        self._handshaking: dict[_Connection, None] = {}
        #: connections past a valid hello: these count against max_connections
        self._served: set[_Connection] = set()
        # finished runs are encoded once for every snapshot of every client, not once each
        self._run_cache = RunJsonCache(max_value, max_bytes=max_send)
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
            # only a token made here: one the caller chose (from a secret store, say) stays out of logs
            extra = f" (token: {self.token})" if self.token and self._generated else ""
            print(f"taskwatch: engine {self.engine.node_id} serving at {self._address}{extra}", flush=True)

    # the readers' limit is the hello's: read_line gathers longer command lines in pieces

    async def _start_tcp(self, target: TcpAddress) -> None:
        # "localhost" may resolve to two families, which with port 0 would get two ports
        host = "127.0.0.1" if target.host == "localhost" else target.host
        self._server = await asyncio.start_server(
            self._on_connect, host, target.port, limit=self.max_hello
        )
        port = self._server.sockets[0].getsockname()[1]
        self._address = str(TcpAddress(host, port))

    async def _start_unix(self, path: Path) -> None:
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise InvalidAddress(str(path), "the socket path is too long for a Unix socket; choose a shorter one")
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
                self._on_connect, sock=sock, limit=self.max_hello
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
        # a connection still in its handshake has nothing to receive: end it now
        for conn in list(self._handshaking):
            conn.dismiss()
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
        if len(self._handshaking) >= self.max_handshakes:
            # make room by closing the connection that has waited longest: refusing the
            # new one instead would let a few idle sockets keep every real client out
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            self._counts["handshakes_evicted"] += 1
            oldest.evict()
        self._counts["connections"] += 1
        conn = _Connection(self, reader, writer)
        self._handshaking[conn] = None
        task = asyncio.get_running_loop().create_task(conn.run(), name="taskwatch-control-conn")
        self._conns[task] = conn
        task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        conn = self._conns.pop(task, None)
        if conn is not None:
            self._closed_dropped += conn.dropped
            self._handshaking.pop(conn, None)
            self._served.discard(conn)
        if not task.cancelled() and task.exception() is not None:
            log.warning("control connection failed", exc_info=task.exception())

    def _admit(self, conn: _Connection) -> bool:
        """Move a connection that said a valid hello into the served pool, if there is room."""
        if len(self._served) >= self.max_connections:
            self._counts["refused"] += 1
            return False
        self._served.add(conn)
        return True

    def _handshake_over(self, conn: _Connection) -> None:
        self._handshaking.pop(conn, None)

    def count(self, what: str, n: int = 1) -> None:
        self._counts[what] += n

    def token_ok(self, token: str | None) -> bool:
        if self.token is None:
            return True
        if token is None:
            return False
        return hmac.compare_digest(token.encode(), self.token.encode())

    #: counters reported by stats(), in this order (gauges are added after them)
    _STATS = (
        "connections",
        "handshakes_evicted",
        "hello_timeouts",
        "refused",
        "auth_failures",
        "malformed",
        "oversized",
        "unknown",
        "commands",
        "errors",
        "slow_disconnects",
        "overflow_disconnects",
        "values_truncated",
        "runs_omitted",
        "events_too_large",
    )

    def stats(self) -> dict[str, int]:
        """Counters and gauges of this endpoint.

        Counters: ``connections`` (accepted sockets), ``handshakes_evicted``
        (closed before their hello to make room in the handshake pool),
        ``hello_timeouts`` (no hello within ``hello_timeout``), ``refused``
        (valid hello beyond ``max_connections``), ``auth_failures``,
        ``malformed``, ``oversized`` (lines over ``max_hello`` or
        ``max_message``), ``unknown``, ``commands``, ``errors`` (commands that
        failed), ``slow_disconnects`` (socket unwritable past
        ``write_timeout``), ``overflow_disconnects`` (a reply would have gone
        over ``max_outgoing_bytes``), ``values_truncated`` and ``runs_omitted``
        (to keep lines within ``max_send``), ``events_too_large`` (sent as a
        ``bus.dropped`` notice instead), ``events_dropped`` (lost by slow
        clients). Gauges: ``handshaking`` and ``active`` (authenticated)
        connections.
        """
        counts = {key: self._counts[key] for key in self._STATS}
        counts["events_dropped"] = self._closed_dropped + sum(c.dropped for c in self._conns.values())
        counts["handshaking"] = len(self._handshaking)
        counts["active"] = len(self._served)
        return counts

    # ------------------------------------------------------------------ commands

    async def execute(self, cmd: Command, limit: int | None = None) -> bytes:
        """Run one command on the engine; returns its result as JSON of at most ``limit`` bytes.

        ``limit`` defaults to ``max_send``. Records are bounded as in snapshots,
        except by ``get``, which returns the full record or raises
        :class:`ReplyTooLarge` -- as does any result that cannot fit.
        """
        engine = self.engine
        room = self.max_send if limit is None else limit
        result: bytes
        match cmd:
            case SubmitCommand(task=task, params=params, key=key):
                result = self._bounded((await engine.submit(task, params, key=key)).record())
            case CancelCommand(run_id=run_id):
                result = self._bounded(await engine.cancel(run_id))
            case RetryCommand(run_id=run_id):
                result = self._bounded((await engine.retry(run_id)).record())
            case GetCommand(run_id=run_id):
                # the whole record: this is how a client reads what listings cut down
                result = engine.get(run_id).model_dump_json().encode()
                if len(result) > room:
                    raise ReplyTooLarge(f"run {run_id}'s full record", len(result), room)
            case PauseCommand(name=name):
                result = self._bounded(engine.pause_periodic(name))
            case ResumeCommand(name=name):
                result = self._bounded(engine.resume_periodic(name))
            case RestartWorkerCommand(name=name):
                result = self._bounded(await engine.restart_worker(name))
            case StopWorkerCommand(name=name):
                result = self._bounded(await engine.stop_worker(name))
            case StartWorkerCommand(name=name):
                result = self._bounded(engine.start_worker(name))
            case PauseQueueCommand(name=name):
                result = self._bounded(engine.pause_queue(name))
            case ResumeQueueCommand(name=name):
                result = self._bounded(engine.resume_queue(name))
            case PurgeQueueCommand(name=name):
                result = self._bounded(await engine.purge_queue(name))
            case FireTriggerCommand(name=name, key=key):
                result = self._bounded(engine.fire_trigger(name, key))
            case SnapshotCommand(runs_limit=runs_limit):
                limit_runs = self.snapshot_runs if runs_limit is None else runs_limit
                return self.encode_snapshot(engine.snapshot(limit_runs), room).json
            case PingCommand():
                result = b"null"
            case _:
                raise UnknownCommand(f"command {getattr(cmd, 'type', '?')!r} is not handled")
        if len(result) > room:
            raise ReplyTooLarge(f"the reply to {getattr(cmd, 'type', '?')!r}", len(result), room)
        return result

    def _bounded(self, model: BaseModel) -> bytes:
        data, cut = bounded_json(model, self.max_value)
        if cut:
            self.count("values_truncated", cut)
        return data

    def encode_snapshot(self, snapshot: Snapshot, limit: int) -> EncodedSnapshot:
        """``snapshot`` as JSON of at most ``limit`` bytes; what was cut is counted."""
        encoded = encode_snapshot(snapshot, limit, self.max_value, self._run_cache)
        if encoded.truncated:
            self.count("values_truncated", encoded.truncated)
        if encoded.omitted:
            self.count("runs_omitted", encoded.omitted)
        return encoded

    def __repr__(self) -> str:
        return (
            f"<ControlServer {self._address or 'unstarted'} active={len(self._served)} "
            f"handshaking={len(self._handshaking)}>"
        )


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


class _Refused(Exception):
    """A handshake ends with this error reply, then the connection closes."""

    def __init__(self, message_id: MessageId | None, error: BaseException) -> None:
        self.message_id = message_id
        self.error = error


class _Overflow(Exception):
    """A reply would take a connection's outgoing bytes over their bound."""


class _Outbox:
    """A connection's encoded lines waiting for its socket writer, bounded in lines and in bytes.

    ``size`` counts the bytes queued plus those taken by the writer and not yet
    drained to the socket, so a client that reads nothing holds at most
    ``max_bytes`` of the server's memory, whatever it asks for.
    """

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.lines: deque[bytes] = deque()
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.size = 0
        self._changed = asyncio.Condition()

    def _fits_event(self, line: bytes) -> bool:
        # events may fill half the bytes: the other half is kept for replies. An
        # empty outbox takes any line, so a large event cannot wait forever
        return len(self.lines) < self.max_lines and (
            self.size == 0 or self.size + len(line) <= self.max_bytes // 2
        )

    async def put_event(self, line: bytes) -> None:
        """Wait for room. Meanwhile the connection's bus subscription fills up and
        drops events for this client alone, with a notice: the engine never waits."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits_event(line))
            self._append(line)

    async def put_reply(self, line: bytes) -> None:
        """Wait for a free line, then queue ``line``; raise :class:`_Overflow` if its
        bytes do not fit (a client asking for more than it reads is cut off, not waited for)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.lines) < self.max_lines)
            if self.size + len(line) > self.max_bytes:
                raise _Overflow
            self._append(line)

    def put_first(self, line: bytes) -> None:
        """Queue a line before the writer and the pump start (the welcome and first snapshot)."""
        self.lines.append(line)
        self.size += len(line)

    def _append(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line)
        self._changed.notify_all()

    async def take(self, chunk: int) -> list[bytes]:
        """Wait for lines; take them up to about ``chunk`` bytes. Call :meth:`written` once sent."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self.lines))
            taken = [self.lines.popleft()]
            size = len(taken[0])
            while size < chunk and self.lines:
                line = self.lines.popleft()
                taken.append(line)
                size += len(line)
            self._changed.notify_all()  # lines are free again
            return taken

    async def written(self, size: int) -> None:
        async with self._changed:
            self.size = max(0, self.size - size)  # (0 after a clear)
            self._changed.notify_all()

    def clear(self) -> None:
        self.lines.clear()
        self.size = 0


class _Connection:
    """One client: handshake, then reader, writer and event-pump tasks until either side ends."""

    def __init__(
        self, server: ControlServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.out = _Outbox(server.outgoing, server.max_outgoing_bytes)
        #: longest line sent to this client: the server's, or less if its hello asked
        self.max_send = server.max_send
        self.sub: Subscription | None = None
        self.commands: set[asyncio.Task[None]] = set()
        self.inflight = asyncio.Semaphore(server.max_inflight)
        #: set once everything queued before the end of the stream is written
        self.flushed = asyncio.Event()
        #: a handshake refusal is being written
        self.refusing = False
        #: closed by the server during its handshake (to make room, or stopping)
        self.dismissed = False
        #: the server ended this connection: what is still buffered for it is thrown away
        self.cut_off = False

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

    def _cut_off(self, counter: str) -> None:
        """Drop this client now, and what is buffered for it: it is not reading."""
        if self.cut_off:
            return
        self.cut_off = True
        self.server.count(counter)
        self.out.clear()
        # abort, not close: close would keep the unsent bytes until the peer reads them;
        # the reader then sees the end of the stream, which ends the other tasks
        self.writer.transport.abort()

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> bool:
        """The hello and its checks, all within ``hello_timeout``; True once served."""
        server = self.server
        try:
            async with asyncio.timeout(server.hello_timeout):
                try:
                    return await self._hello()
                except _Refused as refused:
                    self.refusing = True
                    reply = error_reply(refused.message_id, refused.error, server.max_value)
                    self.writer.write(encode_message(reply))
                    await self.writer.drain()
                    return False
        except TimeoutError:
            if self.refusing:
                self.cut_off = True  # it does not even read why it was refused
            else:
                server.count("hello_timeouts")
                # one short line; the socket takes it without waiting
                exc = ProtocolError(f"no hello within {server.hello_timeout:g} s")
                self.writer.write(encode_message(error_reply(None, exc)))
            return False
        finally:
            server._handshake_over(self)

    async def _hello(self) -> bool:
        """Read and check the hello: True once admitted, False if the peer left; else :class:`_Refused`."""
        server = self.server
        try:
            # left half-read if too long: the connection closes, nothing more is read
            line = await read_line(self.reader, server.max_hello, discard=False)
        except MessageTooLarge as exc:
            server.count(exc.reason)
            raise _Refused(None, exc) from None
        if line is None or self.dismissed:
            return False  # (what a dismissed client had sent is its problem no more)
        try:
            msg = decode_client_message(line, server.max_hello)
        except ProtocolError as exc:
            server.count(getattr(exc, "reason", "malformed"))
            raise _Refused(peek_id(line), exc) from None
        if not isinstance(msg, Hello):
            server.count("unknown")
            raise _Refused(peek_id(line), UnknownCommand("the first message must be hello"))
        if msg.version != PROTOCOL_VERSION:
            raise _Refused(None, IncompatibleVersion(PROTOCOL_VERSION, msg.version))
        if not server.token_ok(msg.token):
            server.count("auth_failures")
            raise _Refused(None, AuthenticationFailed())
        if not server._admit(self):
            raise _Refused(None, TooManyConnections(server.max_connections))
        if msg.max_message is not None:
            # a client may ask for shorter lines, down to the floor every bounded event fits in
            self.max_send = min(server.max_send, max(msg.max_message, server.min_send))
        return True

    def evict(self) -> None:
        """Close this connection, still in its handshake, to make room for a newer one."""
        if not self.refusing:
            reply = error_reply(None, TooManyHandshakes(self.server.max_handshakes))
            self.writer.write(encode_message(reply))
        self.dismiss()

    def dismiss(self) -> None:
        """End the handshake: the reader sees the end of the stream."""
        self.dismissed = True
        self.writer.close()

    # ------------------------------------------------------------------ streaming

    async def _serve(self) -> None:
        server = self.server
        engine = server.engine
        # subscribe before the snapshot, with no await between them: every event
        # is either reflected in the snapshot or delivered after it
        self.sub = engine.bus.subscribe(replay=0, maxsize=server.buffer)
        try:
            first = server.encode_snapshot(
                engine.snapshot(server.snapshot_runs), self.max_send - _SNAPSHOT_FRAME
            )
        except ReplyTooLarge as too_large:
            # nothing a dashboard could draw from: say why, rather than send a line it cannot read
            log.warning("cannot send a control client its first snapshot: %s", too_large)
            self.writer.write(encode_message(error_reply(None, too_large, server.max_value)))
            async with asyncio.timeout(server.write_timeout):
                await self.writer.drain()
            return
        welcome = Welcome(
            version=PROTOCOL_VERSION,
            node_id=engine.node_id,
            max_message=server.max_message,
            max_send=self.max_send,
        )
        # max_outgoing_bytes >= 2 * max_send: these two always fit
        self.out.put_first(encode_message(welcome))
        self.out.put_first(snapshot_line(first.json))
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

    async def _reply(self, line: bytes) -> None:
        """Queue a reply for the writer; a client that is that far behind is cut off."""
        try:
            await self.out.put_reply(line)
        except _Overflow:
            log.warning(
                "dropping a control client with more than %d bytes of replies unread",
                self.server.max_outgoing_bytes,
            )
            self._cut_off("overflow_disconnects")

    def _error_line(self, message_id: MessageId | None, exc: BaseException) -> bytes:
        return encode_message(error_reply(message_id, exc, self.server.max_value))

    async def _read_loop(self) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await read_line(self.reader, server.max_message)
            except MessageTooLarge as exc:
                server.count(exc.reason)
                await self._reply(self._error_line(None, exc))
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
                await self._reply(self._error_line(peek_id(line), exc))
                continue
            if isinstance(msg, Hello):
                server.count("unknown")
                err = UnknownCommand("hello is only valid as the first message")
                await self._reply(self._error_line(None, err))
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
        server = self.server
        # what the reply adds around its result must fit in the line too
        room = self.max_send - (len(ok_line(cmd.id, b"")) - 1)
        try:
            result = await server.execute(cmd, room)
        except Exception as exc:
            server.count("errors")
            if not isinstance(exc, TaskwatchError):
                log.warning("control command %r failed", cmd, exc_info=True)
            line = self._error_line(cmd.id, exc)
        else:
            line = ok_line(cmd.id, result)
        await self._reply(line)

    async def _pump(self, sub: Subscription) -> None:
        # waiting for room in the outbox lets the subscription fill up and drop
        # for this client alone: the engine's publish never waits
        out = self.out
        while await sub.wait():
            for event in sub.get_batch(_PUMP_BATCH):
                await out.put_event(self._event_line(event))
        # the stream ended (the server is stopping): hand the writer an end mark
        # and let it write everything before it, then end this connection
        await out.put_event(_END)
        await self.flushed.wait()

    def _event_line(self, event: BaseEvent) -> bytes:
        server = self.server
        body, cut = bounded_json(event, server.max_value)
        if cut:
            server.count("values_truncated", cut)
        line = event_line(body)
        if len(line) - 1 > self.max_send:
            # only a structure with countless entries gets here (every value in it is
            # bounded); a notice in its place tells the client to fetch a snapshot
            server.count("events_too_large")
            log.warning(
                "a %s event of %d bytes is too large to send; sent a drop notice instead",
                getattr(event, "kind", "?"),
                len(line),
            )
            notice = EventsDropped(seq=event.seq, ts=event.ts, node=event.node, count=1, total=1)
            line = event_line(notice.model_dump_json().encode())
        return line

    async def _write_loop(self) -> None:
        out = self.out
        writer = self.writer
        while True:
            chunks = await out.take(_WRITE_CHUNK)
            size = sum(len(chunk) for chunk in chunks)
            ending = any(chunk is _END for chunk in chunks)
            if ending:
                chunks = [chunk for chunk in chunks if chunk is not _END]
            try:
                writer.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                async with asyncio.timeout(self.server.write_timeout):
                    await writer.drain()
            except TimeoutError:
                log.warning("dropping a control client that read nothing for %s s", self.server.write_timeout)
                self._cut_off("slow_disconnects")
                return
            except (ConnectionError, OSError):
                return
            await out.written(size)
            if ending:
                self.flushed.set()
                return

    async def _teardown(self) -> None:
        for task in list(self.commands):
            task.cancel()
        await asyncio.gather(*self.commands, return_exceptions=True)
        if self.sub is not None:
            self.sub.close()
        self.out.clear()
        transport = self.writer.transport
        if self.cut_off:
            transport.abort()
        else:
            self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except TimeoutError:
            # a peer that reads nothing would keep what is still buffered for it forever
            transport.abort()
        except Exception:
            pass  # the connection is gone either way
