"""An asyncio client of the control protocol: a remote engine's snapshot, events and commands.

::

    remote = RemoteEngine("tcp://127.0.0.1:8765", token="...")
    snapshot = await remote.connect()
    async for event in remote.events():      # ends when the connection drops
        if event.kind == "bus.dropped":
            snapshot = await remote.snapshot()
        ...
    record = await remote.submit("embed_batch", {"user_id": "u1"})
    full = await remote.get(record.id)      # values the snapshot and events cut down, whole

One :class:`RemoteEngine` is one connection, bound to the event loop it
connected on; used from another loop it raises
:class:`~taskwatch.engine.errors.LoopThreadError` at once (connect one per
loop). Reconnecting is the caller's decision: after :attr:`disconnected` is set
(or ``events()`` ended), call :meth:`connect` again -- it starts from a clean
state, on the loop it is called from -- or make a new instance. Error replies
raise the matching :class:`~taskwatch.engine.errors.TaskwatchError` subclass
(``InvalidParams`` with its ``errors`` list, ``RunNotFound``...), or
:class:`RemoteError` for error types this side does not know.

Unlike an in-process call, a command that fails with ``TimeoutError`` (no
reply within ``timeout``: a :class:`~taskwatch.engine.errors.CommandTimeout`) or
:class:`~taskwatch.engine.errors.ConnectionClosed` may still have been carried
out: the exception's ``sent`` attribute (and its message) says whether the
command had been written to the connection. One that was not sent did nothing;
one that was may still run on the engine, so before submitting again look for
it, or submit with ``key=`` (a repeat then returns the first run while it is
pending).

Snapshots, events and the records in command replies carry values over the
server's ``max_value`` cut down (a params dict becomes
``{"__truncated__": true, "bytes": N, "preview": "..."}``; see
:mod:`taskwatch.engine.snapshot` and its :func:`~taskwatch.engine.snapshot.is_truncated`);
:meth:`RemoteEngine.get` returns a run's full record.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from . import errors as _errors
from .hop import spawn
from .bus import EventBuffer, after_seq
from .errors import (
    CommandTimeout,
    ConnectionClosed,
    EngineUnreachable,
    IncompatibleVersion,
    InvalidAddress,
    InvalidParams,
    LoopThreadError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    TaskwatchError,
)
from .events import Event, EventsDropped
from .execution import checked_grace
from .index import check_query, runs_limit_problem
from .jsonsafe import check_key, check_run_key, safe_str
from .operations import OPERATIONS
from .options import RemoteOptions, check_options
from .queues import QueueInfo, QueuePurge
from .runs import RunRecord
from .scheduler import PeriodicInfo
from .server import check_token
from .snapshot import Snapshot
from .supervisor import WorkerInfo
from .tasks import json_params, recorded_params
from .triggers import TriggerFire
from .wire import (
    DEFAULT_CLIENT_MAX_MESSAGE,
    DEFAULT_MAX_MESSAGE,
    PROTOCOL_VERSION,
    Command,
    ErrorReply,
    EventMessage,
    Hello,
    OkReply,
    PingCommand,
    ServerMessage,
    SnapshotMessage,
    TcpAddress,
    UnixAddress,
    Welcome,
    decode_server_message,
    encode_message,
    parse_connect_address,
    read_line,
)

W = TypeVar("W", Welcome, SnapshotMessage)

#: pauses between attempts to connect to a Unix socket whose backlog is full (seconds)
_BACKLOG_FIRST_PAUSE = 0.005
_BACKLOG_MAX_PAUSE = 0.1

_error_classes: dict[str, type[TaskwatchError]] | None = None


def _known_errors() -> dict[str, type[TaskwatchError]]:
    # only classes defined in engine.errors: a reply must never name an arbitrary class
    global _error_classes
    if _error_classes is None:
        found: dict[str, type[TaskwatchError]] = {}
        stack: list[type[TaskwatchError]] = [TaskwatchError]
        while stack:
            cls = stack.pop()
            if cls.__module__ == _errors.__name__:
                found[cls.__name__] = cls
            stack.extend(cls.__subclasses__())
        _error_classes = found
    return _error_classes


def error_from_reply(reply: ErrorReply) -> TaskwatchError:
    """Rebuild the server's exception: same class, message and public attributes."""
    cls = _known_errors().get(reply.error_type)
    if cls is None:
        return RemoteError(reply.error_type, reply.message, reply.details)
    # constructors differ per class; set what they would have set instead of calling them
    exc = cls.__new__(cls)
    exc.args = (reply.message,)
    for name, value in reply.details.items():
        if name.isidentifier() and not name.startswith("_") and not hasattr(cls, name):
            setattr(exc, name, _as_raised(name, value))
    return exc


def _as_raised(name: str, value: Any) -> Any:
    """An attribute as the error held it before JSON: pydantic's ``errors`` name a field by a
    ``loc`` tuple, which JSON made a list."""
    if name == "errors" and isinstance(value, list):
        return [
            {**e, "loc": tuple(e["loc"])} if isinstance(e, dict) and isinstance(e.get("loc"), list) else e
            for e in value
        ]
    return value


def params_for_wire(task: str, params: object) -> dict[str, Any] | None:
    """``params`` as the JSON data a ``submit`` command carries; raises :class:`InvalidParams`.

    Refused before anything is sent, with the checks and words of an in-process
    submit: values UTF-8 JSON cannot carry; a model instance whose JSON dump reads
    back as other values (a ``SecretStr`` dumps masked); a dict whose keys become one
    JSON key, or holding a value that reads back from JSON as another one (a set, a
    date: see :func:`~.tasks.json_params`). A model instance travels as its JSON dump;
    the server validates the data against the task's model. NaN and infinity travel
    as the ``NaN``/``Infinity`` constants the server reads, so the engine gives
    the verdict it gives in-process (JSON ``null`` would be another value).
    """
    if params is None:
        return None
    if isinstance(params, BaseModel):
        return recorded_params(task, params)[1]
    if not isinstance(params, Mapping):
        raise InvalidParams(
            task,
            [{
                "loc": ("params",),
                "msg": f"params must be a dict or a pydantic model, not {type(params).__qualname__}",
                "type": "dict_type",
            }],
        )
    return json_params(task, params)


def _not_a_socket(path: str) -> str | None:
    """What is at ``path`` ("a directory", "a regular file"...) if it is there and no socket, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # gone, or not ours to look at: the error connecting says enough
    if stat.S_ISSOCK(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a device or other special file"


def _says_welcome(line: bytes) -> bool:
    """Whether ``line`` is a JSON object of type ``welcome`` (another taskwatch's, if not one we read)."""
    try:
        data = pydantic_core.from_json(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "welcome"


class RemoteEngine:
    """A connection to an engine's control endpoint (see :mod:`taskwatch.engine.server`).

    Parameters
    ----------
    address:
        A Unix socket path or ``tcp://HOST:PORT``, as printed by ``engine.serve``.
        A TCP host that is not loopback raises
        :class:`~taskwatch.engine.errors.InvalidAddress` unless ``allow_remote``.
    token:
        The server's token, if it has one.
    allow_remote:
        Connect to a TCP host that is not loopback. The protocol is plaintext:
        the token and every command travel unencrypted, so only over a network
        you trust; otherwise forward a loopback port over SSH and connect to that.
    max_message:
        Longest server line accepted, in bytes (snapshots can be large), at
        least 32 KiB. Sent in the hello: the server keeps its lines within it,
        down to a floor of its own, 32 times its ``max_value`` (512 KiB by
        default). ``connect()`` raises
        :class:`~taskwatch.engine.errors.MessageTooLarge` naming that floor
        when ``max_message`` is below it, so every line it may send can be read.
    buffer:
        Events buffered locally; beyond it new events are dropped, counted in
        :attr:`dropped`, and announced by a ``bus.dropped`` event.
    timeout:
        Seconds to wait for the connection and handshake, and the most any
        command takes: waiting its turn to be sent, sending, and the reply.
        At least 0.1. A Unix socket whose backlog is full (the engine's loop
        busy for a moment) is tried again until then.

    Options out of range, and a token that is not a str, raise
    :class:`~taskwatch.engine.errors.InvalidConfiguration`.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        max_message: int = DEFAULT_CLIENT_MAX_MESSAGE,
        buffer: int = 10_000,
        timeout: float = 30.0,
        allow_remote: bool = False,
    ) -> None:
        check_options(
            RemoteOptions, "RemoteEngine", max_message=max_message, buffer=buffer, timeout=timeout,
            allow_remote=allow_remote,
        )  # fmt: skip
        # apart from the options above: their errors quote the value given, and this one is a secret
        token = check_token("RemoteEngine", token)
        self._target = parse_connect_address(address)
        if isinstance(self._target, TcpAddress) and not self._target.is_loopback and not allow_remote:
            # refused before any byte, the token above all, goes out in plaintext
            raise InvalidAddress(
                address,
                f"refusing to connect to non-loopback host {self._target.host!r}: the protocol is "
                "unencrypted, and the token and every command would cross the network readable",
                "forward a loopback port to it over SSH (ssh -L 7070:127.0.0.1:PORT HOST) and connect "
                "to tcp://127.0.0.1:7070, or pass allow_remote=True if the network is trusted",
            )
        self.address = address
        self.token = token
        self.max_message = max_message
        self.buffer = buffer
        self.timeout = timeout
        #: set once the connection is gone (closed by either side, or never opened)
        self.disconnected = asyncio.Event()
        self.disconnected.set()
        #: why the connection ended, if it ended on an error
        self.close_reason: BaseException | None = None
        self.node_id: str | None = None
        self.server_version: str | None = None
        #: the connect() in progress: a second call made meanwhile shares its outcome
        self._connecting: asyncio.Future[Snapshot] | None = None
        self._closes = 0  # close() calls: one made while a connect() is under way ends that connect
        self._reset()

    def _reset(self) -> None:
        #: the loop the connection was made on: its streams, tasks and futures belong to it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._events = EventBuffer(self.buffer, self.node_id or "")
        #: events the engine dropped for this connection, as its notices kept here announced
        #: (a notice dropped here is counted by the buffer, with the events it stood for)
        self._announced = 0
        #: a ConnectionClosed error line with no id: the engine saying why it ends the connection
        self._parting: TaskwatchError | None = None
        self._ready = asyncio.Event()
        self._watermark = 0
        self._last_seq = 0
        self._server_max = DEFAULT_MAX_MESSAGE
        self._connected = False
        #: the last attempt to connect to the Unix socket found its backlog full
        self._backlog_full = False

    @property
    def connected(self) -> bool:
        return self._connected

    # ------------------------------------------------------------------ connection

    async def connect(self) -> Snapshot:
        """Connect, authenticate and return the server's snapshot; events follow it.

        Raises :class:`~taskwatch.engine.errors.EngineUnreachable` (a
        ``ConnectionError``) when no engine answers at the address: no socket
        file, nothing listening, no welcome within ``timeout``, or what answers
        is not a taskwatch control endpoint. A call made while another is
        connecting shares that one's outcome: the same snapshot, or the same error.
        """
        while (pending := self._connecting) is not None and not pending.done():
            if pending.get_loop() is not asyncio.get_running_loop():
                raise self._wrong_loop("connect")
            # a second connection would replace the first one's streams under its reader, and
            # each call would end the other's; waited for (not shielded) so cancelling this
            # call leaves the other alone
            await asyncio.wait({pending})
            if not pending.cancelled():
                return pending.result()
            # the call it waited for was cancelled: this one connects for itself
        fut: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
        self._connecting = fut
        try:
            snapshot = await self._connect()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # raised to this caller: no "never retrieved" report if nobody else waits
            raise
        finally:
            self._connecting = None
        fut.set_result(snapshot)
        return snapshot

    async def _connect(self) -> Snapshot:
        if self._connected:
            if self._foreign_loop():
                raise self._wrong_loop("connect")
            raise RuntimeError("already connected; close() first to reconnect")
        await self.close()
        self._reset()
        self.close_reason = None
        closes = self._closes
        target = self._target
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        opened = False
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    if isinstance(target, TcpAddress):
                        reader, writer = await asyncio.open_connection(
                            target.host, target.port, limit=self.max_message
                        )
                    else:
                        reader, writer = await self._open_unix(target.path)
                    opened = True
                    hello = Hello(version=PROTOCOL_VERSION, token=self.token, max_message=self.max_message)
                    writer.write(encode_message(hello))
                    await writer.drain()
                    welcome = await self._expect(reader, Welcome)
                    if welcome.version != PROTOCOL_VERSION:
                        raise IncompatibleVersion(PROTOCOL_VERSION, welcome.version)
                    try:
                        first = await self._expect(reader, SnapshotMessage)
                    except MessageTooLarge as exc:
                        raise self._first_too_large(exc, welcome.max_send) from None
                    if welcome.max_send > self.max_message:
                        # the engine's floor is above what this client asked for: a longer reply
                        # or event would come one day and end the connection, get() included
                        raise self._below_floor(welcome.max_send)
            except TaskwatchError:
                raise
            except OSError as exc:  # TimeoutError too
                raise self._unreachable(exc, opened) from exc
            if self._closes != closes:
                # close() was called meanwhile: its caller is done with this connection, which
                # would otherwise stay open, holding a place on the engine and reading events
                raise ConnectionClosed(
                    f"close() was called while connecting to {self.address}: the connection was closed again"
                )
        except BaseException:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
            raise
        self.node_id = welcome.node_id
        self._events.node = welcome.node_id
        self.server_version = welcome.server
        self._server_max = welcome.max_message
        self._reader, self._writer = reader, writer
        self._watermark = self._last_seq = first.snapshot.last_seq
        self._loop = loop
        self._connected = True
        # a new Event, not the old one cleared: that one may be bound to a loop now gone
        self.disconnected = asyncio.Event()
        self._read_task = spawn(self._read_loop(reader, writer), name="taskwatch-remote-read")
        return first.snapshot

    async def _open_unix(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams on a connection to the Unix socket at ``path``, once its backlog has room.

        A full backlog (the engine's loop busy for a moment, or many clients
        connecting) makes a non-blocking connect fail with EAGAIN; asyncio takes
        that for "in progress" and hands over a socket that was never connected.
        So the connect is retried here, with growing pauses, until ``connect``'s
        timeout.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            pause = _BACKLOG_FIRST_PAUSE
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    self._backlog_full = True
                # polled: a Unix socket signals nothing when a place in the backlog frees up
                await asyncio.sleep(pause)
                pause = min(pause * 2, _BACKLOG_MAX_PAUSE)
            self._backlog_full = False
            return await asyncio.open_unix_connection(sock=sock, limit=self.max_message)
        except BaseException:
            sock.close()
            raise

    def _first_too_large(self, exc: MessageTooLarge, max_send: int) -> MessageTooLarge:
        """The first snapshot did not fit this client's ``max_message``: say which value would."""
        exc.args = (
            f"the engine at {self.address} sent its first snapshot in a line of {exc.size} bytes, over "
            f"this RemoteEngine's max_message of {self.max_message}, so it cannot be read. That engine "
            f"keeps its lines within {max_send} bytes on this connection (a client may ask it for "
            f"shorter ones only down to a floor of its own): pass max_message={max_send} or more",
        )
        return exc

    def _below_floor(self, max_send: int) -> MessageTooLarge:
        """The engine's lines may be longer than this client's ``max_message``: say which value would do."""
        exc = MessageTooLarge(max_send, self.max_message)
        exc.args = (
            f"the engine at {self.address} sends lines of up to {max_send} bytes, over this "
            f"RemoteEngine's max_message of {self.max_message}: an engine keeps to shorter lines "
            "only down to 32 times its max_value (512 KiB by default), and a reply or event longer "
            "than max_message could not be read and would end the connection. Pass "
            f"max_message={max_send} or more (or serve the engine with a smaller max_value)",
        )
        return exc

    def _unreachable(self, exc: OSError, opened: bool) -> EngineUnreachable:
        """``connect``'s error for ``exc``: what failed, in words, and what to check."""
        target = self._target
        if isinstance(exc, TimeoutError) and self._backlog_full and isinstance(target, UnixAddress):
            return EngineUnreachable(
                self.address,
                f"its socket file {target.path} accepts no more connections now: its backlog of "
                f"connections waiting to be accepted stayed full for {self.timeout:g} s (the engine's "
                "event loop is busy or blocked, or many clients are connecting at once)",
                "Try again in a moment, or with a longer timeout; if it lasts, check that nothing "
                "blocks the engine's event loop (a task calling blocking code) and how many clients "
                "connect to it",
            )
        if isinstance(exc, TimeoutError):
            if opened:
                return EngineUnreachable(
                    self.address,
                    f"it accepted the connection but sent no welcome within {self.timeout:g} s",
                    "Check that the engine's process is running (not stopped, paused or overloaded) "
                    "and that this address is a taskwatch endpoint",
                )
            return EngineUnreachable(
                self.address,
                f"no connection within {self.timeout:g} s",
                "Check the host and port, and that nothing on the way drops the connection",
            )
        # asyncio's own strerror for a refused TCP connection is "Connect call failed (...)";
        # a name lookup's error numbers (negative) are not the system's
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc) or type(exc).__name__
        if isinstance(target, UnixAddress):
            other = None if isinstance(exc, FileNotFoundError) else _not_a_socket(target.path)
            if other is not None:
                # connecting to a file that is no socket is refused too: not an engine that stopped
                return EngineUnreachable(
                    self.address,
                    f"{target.path} is {other}, not a socket ({why})",
                    "Give the path of the engine's socket: the engine prints the address it serves at "
                    "(by default a socket file under the user's runtime directory)",
                )
            if isinstance(exc, FileNotFoundError):
                reason = f"there is no socket file at {target.path} ({why})"
            elif isinstance(exc, ConnectionRefusedError):
                reason = f"nothing listens on the socket file {target.path} ({why}): the engine that made it has stopped"
            else:
                reason = f"connecting to the socket file {target.path} failed ({why})"
            return EngineUnreachable(
                self.address,
                reason,
                "Check the socket path: the engine prints the address it serves at, and a socket "
                "file is removed when its engine stops",
            )
        if isinstance(exc, ConnectionRefusedError):
            reason = f"nothing listens on port {target.port} of {target.host} ({why})"
        else:
            reason = f"connecting to port {target.port} of {target.host} failed ({why})"
        return EngineUnreachable(
            self.address, reason, "Check the port: the engine prints the address it serves at"
        )

    async def _expect(self, reader: asyncio.StreamReader, kind: type[W]) -> W:
        line = await read_line(reader, self.max_message)
        if line is None:
            raise ConnectionClosed(
                f"{self.address} closed the connection during the handshake; check that it is a "
                "taskwatch engine's address"
            )
        try:
            msg = decode_server_message(line, self.max_message)
        except ProtocolError as exc:
            if kind is Welcome and not _says_welcome(line):
                raise self._not_taskwatch(line) from exc
            raise  # a taskwatch welcome this side cannot read: the error says what is wrong in it
        if isinstance(msg, ErrorReply):
            raise error_from_reply(msg)
        if not isinstance(msg, kind):
            if kind is Welcome:
                raise self._not_taskwatch(line)
            raise MalformedMessage(f"expected a {kind.__name__} message, got {msg.type!r}")
        return msg

    def _not_taskwatch(self, first: bytes) -> EngineUnreachable:
        """What answers at the address does not speak the control protocol (a web server, SSH...)."""
        shown = first[:80].decode("utf-8", "replace").strip()
        return EngineUnreachable(
            self.address,
            f"what answers there is not a taskwatch control endpoint: its first line, {shown!r}, is no "
            "welcome of the taskwatch protocol",
            "Check the port (or socket path): the engine prints the address it serves at, and another "
            "service may have that port",
        )

    async def close(self) -> None:
        """Close the connection and wait for its reader task. Safe to call repeatedly.

        A connection already ended on a loop that has finished (a previous
        ``asyncio.run``) is only forgotten; one still open on another loop
        raises :class:`~taskwatch.engine.errors.LoopThreadError`. A ``connect()``
        under way then raises :class:`~taskwatch.engine.errors.ConnectionClosed`
        rather than leave a connection open.
        """
        self._closes += 1
        if self._foreign_loop():
            loop, task = self._loop, self._read_task
            assert loop is not None
            if not loop.is_closed() and (self._connected or (task is not None and not task.done())):
                raise self._wrong_loop("close")
            # its reader has ended, and closed the writer on its way out: nothing is left to
            # wait for, and that loop's futures cannot be awaited from this one
            if task is not None and task.done() and not task.cancelled():
                task.exception()  # retrieved, so it is not reported as never retrieved
            self._read_task, self._writer, self._loop = None, None, None
            self._connected = False
            return
        task, self._read_task = self._read_task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except TimeoutError:
                # bytes the engine is not reading keep a closing transport open; drop them,
                # which also wakes a command waiting for room to send (it was not sent)
                writer.transport.abort()
            except Exception:
                pass
        self._mark_disconnected(None)

    async def __aenter__(self) -> RemoteEngine:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _foreign_loop(self) -> bool:
        """Whether this instance's connection belongs to a loop other than the running one."""
        return self._loop is not None and self._loop is not asyncio.get_running_loop()

    def _wrong_loop(self, method: str) -> LoopThreadError:
        return LoopThreadError(
            method,
            f"RemoteEngine.{method}() was called from an event loop other than the one it connected "
            f"on; its connection to {self.address} (streams, reader task, replies) is bound to that "
            "loop. Connect one RemoteEngine per event loop, or run the call on its own loop "
            "(asyncio.run_coroutine_threadsafe(coro, that_loop))",
        )

    def _mark_disconnected(self, reason: BaseException | None) -> None:
        if reason is not None and self.close_reason is None:
            self.close_reason = reason
        self._connected = False
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                # every pending command was sent: _request says so, naming the command
                fut.set_exception(ConnectionClosed(f"the connection to {self.address} closed before the reply"))
        self._ready.set()
        self.disconnected.set()

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason: BaseException | None = None
        try:
            while True:
                line = await read_line(reader, self.max_message)
                if line is None:
                    break
                self._dispatch(decode_server_message(line, self.max_message))
        except ProtocolError as exc:
            # a server we cannot understand is a server we cannot trust to stay in sync
            reason = exc
        except (ConnectionError, OSError) as exc:
            reason = exc
        finally:
            # its own connection only: a newer one may have replaced it meanwhile
            if self._writer is writer:
                self._mark_disconnected(self._parting or reason)
            writer.close()

    def _dispatch(self, msg: ServerMessage) -> None:
        if isinstance(msg, EventMessage):
            self._offer(msg.event)
        elif isinstance(msg, ErrorReply) and msg.id is None:
            # answers no command. The engine's parting words are a ConnectionClosed (its last
            # line); any other is about a line it could not tell the id of (too long, say),
            # and the connection goes on: taken for parting words, it would be named as the
            # reason whenever the connection ended later, for whatever reason
            if msg.error_type == ConnectionClosed.__name__:
                self._parting = error_from_reply(msg)
        elif isinstance(msg, OkReply | ErrorReply):
            fut = self._pending.pop(msg.id, None) if isinstance(msg.id, int) else None
            if fut is not None and not fut.done():
                if isinstance(msg, OkReply):
                    fut.set_result(msg.result)
                else:
                    fut.set_exception(error_from_reply(msg))
        elif isinstance(msg, SnapshotMessage):
            self._resynced(msg.snapshot)

    # ------------------------------------------------------------------ events

    @property
    def dropped(self) -> int:
        """Events this connection lost: dropped for it by the engine (each run of them
        announced by a ``bus.dropped`` notice) or here, because the local buffer was full.

        The ``count`` of the ``bus.dropped`` notices read add up to it, once all are read,
        with the losses a snapshot taken meanwhile covered (no notice announces those).
        """
        return self._events.dropped + self._announced

    def pending(self) -> int:
        """Events buffered locally and not yet read."""
        return self._events.pending

    def _offer(self, event: Event) -> None:
        if event.seq <= self._watermark:
            if type(event) is not EventsDropped:
                return  # already reflected in the last snapshot
            # a notice of a gap the snapshot was taken in: the events lost after it are not
            # in the snapshot, and are still announced
            after = after_seq(event, self._watermark)
            # lost all the same, so counted in dropped; only what is past the snapshot is announced
            self._announced += event.count - (0 if after is None else after.count)
            if after is None:
                return
            event = after
        self._last_seq = max(self._last_seq, event.seq)
        if self._events.offer(event) and event.kind == "bus.dropped":
            self._announced += event.count
        self._ready.set()

    def _resynced(self, snapshot: Snapshot) -> None:
        self._watermark = max(self._watermark, snapshot.last_seq)
        # buffered events and losses before the snapshot are covered by it
        self._events.discard_through(self._watermark)

    def get_batch(self, limit: int | None = None) -> list[Event]:
        """Take up to ``limit`` buffered items (events and drop notices) without waiting."""
        return self._events.take(limit)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until events are buffered, the connection ends or ``timeout`` passes. True if
        events are ready; False without a timeout means the connection is gone."""
        if self._events:
            return True
        if not self._connected:
            return False
        if self._foreign_loop():
            raise self._wrong_loop("wait")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # a wake whose events a snapshot reply took back before this ran (they are in
                # that snapshot: a snapshot() called meanwhile) is no end: wait on
                while not self._events and self._connected:
                    self._ready.clear()
                    await self._ready.wait()
        return bool(self._events)

    async def events(self) -> AsyncIterator[Event]:
        """Every event as it arrives; ends once the connection is gone and the buffer is empty."""
        while True:
            if self._events:
                yield self._events.take_one()
            elif not await self.wait():
                return

    # ------------------------------------------------------------------ commands

    def _encode(self, make: type[Command], msg_id: int, fields: dict[str, Any]) -> bytes:
        """The command's line; arguments it cannot carry raise :class:`MalformedMessage`, nothing sent."""
        kind = make.model_fields["type"].default
        try:
            # strict: bytes would otherwise pass as a str (b"x" sent as "x")
            cmd = make.model_validate({"id": msg_id, **fields}, strict=True)
            # NaN and infinity as JSON's customary constants, which the server reads:
            # encode_message would turn them into null, another value
            return pydantic_core.to_json(cmd.model_dump(), inf_nan_mode="constants") + b"\n"
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or '(arguments)'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError, RecursionError) as exc:
            problems = f"not encodable as UTF-8 JSON: {safe_str(exc)}"
        raise MalformedMessage(
            f"cannot send {kind!r} to {self.address}: {safe_str(problems)[:300]}; nothing was sent. "
            "Pass arguments of the documented types"
        )

    def _too_large(self, kind: str, size: int) -> MessageTooLarge:
        exc = MessageTooLarge(size, self._server_max)
        # the limit is the engine's: this client's own max_message bounds only what it receives
        exc.args = (
            f"the {kind!r} command is {size} bytes, over the {self._server_max}-byte limit the engine "
            f"at {self.address} accepts (its max_message, announced when connecting), so it was not "
            "sent. Send less (a large input is better passed by reference: a path, a URL, a key), or "
            "raise the limit where the engine is served: engine.serve(..., max_message=N)",
        )
        exc.sent = False
        return exc

    def _failed(
        self, cls: type[CommandTimeout | ConnectionClosed], kind: str, what: str, sent: bool
    ) -> CommandTimeout | ConnectionClosed:
        """A command's ``CommandTimeout`` or ``ConnectionClosed``, saying whether it was sent.

        ``sent``: the command's line was handed to the connection, so the engine may
        receive it and carry it out whatever this side hears back.
        """
        if sent:
            outcome = f"{kind!r} was sent, so the engine may still carry it out"
            if kind == "submit":
                outcome += (
                    " (submitting again may queue a second run: pass key= so that a repeat returns "
                    "the first run while it is pending)"
                )
        else:
            outcome = f"{kind!r} was not sent, so the engine will not carry it out"
        exc = cls(f"{what}; {outcome}")
        exc.sent = sent
        return exc

    async def _request(self, make: type[Command], **fields: Any) -> Any:
        kind = make.model_fields["type"].default
        msg_id = next(self._ids)
        line = self._encode(make, msg_id, fields)  # bad arguments raise, connected or not
        if not self._connected or self._writer is None:
            raise self._failed(
                ConnectionClosed, kind, f"not connected to {self.address}; call connect() first", False
            )
        if self._foreign_loop():
            raise self._wrong_loop(kind)
        if len(line) - 1 > self._server_max:
            raise self._too_large(kind, len(line) - 1)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sent = False
        try:
            # the whole call is bounded: its turn to send, room to send, the reply
            async with asyncio.timeout(self.timeout):
                async with self._write_lock:
                    writer = self._writer
                    # room first, then the line: a call that gives up while waiting has written
                    # nothing, and a line once written is queued whole in the transport, which
                    # sends it in order, so a call giving up never leaves half a line behind
                    if writer is not None and self._connected:
                        await writer.drain()
                    if writer is None or writer is not self._writer or not self._connected or writer.is_closing():
                        raise ConnectionClosed(f"the connection to {self.address} closed")
                    self._pending[msg_id] = fut
                    writer.write(line)
                    sent = True
                return await fut
        except TimeoutError:
            if sent:
                what = f"no reply from {self.address} to {kind!r} within {self.timeout:g} s"
            else:
                what = (
                    f"could not send {kind!r} to {self.address} within {self.timeout:g} s: the engine is "
                    "not reading this connection (its process paused or overloaded, or the network stalled)"
                )
            raise self._failed(CommandTimeout, kind, what, sent) from None
        except ConnectionClosed:
            when = "before the reply" if sent else "before it could be sent"
            what = f"the connection to {self.address} closed {when}"
            if self.close_reason is not None:
                what += f" ({self.close_reason})"
            raise self._failed(ConnectionClosed, kind, what, sent) from self.close_reason
        except TaskwatchError:
            raise  # the engine's own answer
        except OSError as exc:  # ConnectionResetError, BrokenPipeError...
            raise self._failed(
                ConnectionClosed, kind, f"the connection to {self.address} is gone: {exc}", sent
            ) from exc
        finally:
            self._pending.pop(msg_id, None)

    async def _op(self, operation: str, /, **args: Any) -> Any:
        """Run one of the declared :data:`~taskwatch.engine.operations.OPERATIONS` remotely."""
        op = OPERATIONS[operation]
        return op.result.model_validate(await self._request(op.command, **args))

    async def submit(
        self, task: str, params: BaseModel | dict[str, Any] | None = None, key: str | None = None
    ) -> RunRecord:
        """Submit a run on the remote engine; returns its record (pending, usually).

        ``params`` is a dict or a pydantic model (sent as its JSON dump). What the
        in-process call refuses raises here the same way, before anything is sent:
        :class:`InvalidParams` for params JSON cannot carry, or holding a value that
        reads back from JSON as another one (a set, a date: the in-process call
        refuses it where the model keeps it as given, and the model cannot be
        consulted from here, so pass the model itself, or the value as JSON carries
        it), :class:`InvalidKey` for a key that is not a UTF-8-encodable str,
        :class:`MalformedMessage` for other arguments of the wrong type.
        """
        data = params_for_wire(task, params)
        if key is not None:
            check_run_key(f"task {task!r}", key)
        return await self._op("submit", task=task, params=data, key=key)  # type: ignore[no-any-return]

    async def cancel(self, run_id: str, grace: float | None = None) -> RunRecord:
        """Cancel the run; ``grace``: seconds to wait for a running one to end before the engine
        answers (checked as ``Engine.cancel``'s; None: the engine's ``cancel_grace``)."""
        grace = checked_grace("RemoteEngine.cancel()", grace)
        return await self._op("cancel", run_id=run_id, grace=grace)  # type: ignore[no-any-return]

    async def retry(self, run_id: str) -> RunRecord:
        return await self._op("retry", run_id=run_id)  # type: ignore[no-any-return]

    async def get(self, run_id: str) -> RunRecord:
        """A run's full record, with the values snapshots and events show cut down.

        Raises :class:`~taskwatch.engine.errors.RunNotFound` for an unknown run, and
        :class:`~taskwatch.engine.errors.ReplyTooLarge` if even that one record is
        longer than a line the server sends or this client accepts.
        """
        return await self._op("get", run_id=run_id)  # type: ignore[no-any-return]

    async def pause_periodic(self, name: str) -> PeriodicInfo:
        return await self._op("pause_periodic", name=name)  # type: ignore[no-any-return]

    async def resume_periodic(self, name: str) -> PeriodicInfo:
        return await self._op("resume_periodic", name=name)  # type: ignore[no-any-return]

    async def run_periodic(self, name: str) -> RunRecord:
        """Queue one run of a periodic task now; its record (``PeriodicNotRunnable`` while one goes)."""
        return await self._op("run_periodic", name=name)  # type: ignore[no-any-return]

    async def restart_worker(self, name: str) -> WorkerInfo:
        """Restart a supervised worker now; ``WorkerNotLeading`` for a leader-only one on a follower."""
        return await self._op("restart_worker", name=name)  # type: ignore[no-any-return]

    async def stop_worker(self, name: str) -> WorkerInfo:
        return await self._op("stop_worker", name=name)  # type: ignore[no-any-return]

    async def start_worker(self, name: str) -> WorkerInfo:
        return await self._op("start_worker", name=name)  # type: ignore[no-any-return]

    async def pause_queue(self, name: str) -> QueueInfo:
        return await self._op("pause_queue", name=name)  # type: ignore[no-any-return]

    async def resume_queue(self, name: str) -> QueueInfo:
        return await self._op("resume_queue", name=name)  # type: ignore[no-any-return]

    async def purge_queue(self, name: str) -> QueuePurge:
        """Drop the jobs waiting in a queue (and their rows in a durable store); says how many."""
        return await self._op("purge_queue", name=name)  # type: ignore[no-any-return]

    async def fire_trigger(self, name: str, key: str) -> TriggerFire:
        """Queue a run for a trigger's key now (``fired=False``: it had one queued or running).

        Raises :class:`InvalidKey` for a key that is not a UTF-8-encodable str, before sending.
        """
        check_key(f"trigger {name!r}", key)
        return await self._op("fire_trigger", name=name, key=key)  # type: ignore[no-any-return]

    async def snapshot(self, runs_limit: int | None = None) -> Snapshot:
        """A fresh snapshot (e.g. after a ``bus.dropped`` event).

        A full snapshot (``runs_limit=None``) replaces what buffered events
        described, so those are dropped; a partial one (e.g. ``runs_limit=0``
        for the schedule and stats only) leaves the event buffer alone.
        A ``runs_limit`` that is neither None nor an int of 0 or more raises
        :class:`InvalidQuery`, as ``Engine.snapshot()`` does, and nothing is sent.
        """
        if runs_limit is not None:
            # refused as Engine.snapshot() refuses it, not as a wire-level MalformedMessage
            check_query(runs_limit_problem(runs_limit), what="snapshot query")
        snapshot: Snapshot = await self._op("snapshot", runs_limit=runs_limit)
        if runs_limit is None:
            self._resynced(snapshot)
        return snapshot

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._request(PingCommand)
        return time.perf_counter() - start

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<RemoteEngine {self.address} {state}>"
