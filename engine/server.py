"""The control endpoint: an engine exposed to dashboards in other processes.

``await engine.serve(address)`` starts a :class:`ControlServer` on a Unix
socket (the default; the file is created with mode 0600 inside a private
directory) or on ``tcp://127.0.0.1:PORT``. It speaks the newline-delimited
JSON protocol of :mod:`taskwatch.engine.wire`.

Nothing a client does can crash or stall the engine, or grow its memory
without bound:

* Before its hello, a connection is in a pool of its own (``max_handshakes``):
  it has ``hello_timeout`` seconds and ``max_hello`` bytes to say hello, and
  it does not count against ``max_connections``. Until its whole hello line
  has arrived it is only a socket the loop's selector watches and the bytes
  it sent -- no task, no timer, no stream -- so a flood of connections that
  never speak, or send a byte and stall, costs the engine a few system calls
  each. When the pool is full, the connection that has waited longest without
  a whole hello is closed to make room, once it has waited
  ``_EVICTABLE_AFTER`` (0.1 s); one whose bytes are waiting is read first (its
  socket is peeked), and one whose whole hello is here is never closed: a real
  client sends its hello at once, and it is read within a few turns of the
  loop. Until the oldest may be closed accepting pauses, the connections
  waiting in the kernel's queue meanwhile: so a burst of real clients whose
  hellos are on their way all get in, and during a flood the server still
  takes ``max_handshakes`` connections per 0.1 s at the least (a listener that
  paused for long would let the kernel's queue overflow, dropping a real
  client's connection with the flood's): idle or slow sockets cannot keep a
  real client out.
* After a valid hello a connection counts against ``max_connections``; one more
  is told so and closed.
* Every connection has its own reader and writer tasks. Events reach it
  through a bounded bus subscription, so a slow client loses events (and is
  told so with a ``bus.dropped`` event) rather than slowing the engine. The
  server moves them to every connection's outgoing buffer in batches, at most
  once per ``_FAN_OUT_INTERVAL``, each event encoded once for all clients:
  a reading dashboard costs the engine a few list appends per event, not an
  encoding, a wake-up and a send.
  What waits for its socket is bounded in lines (``outgoing``) and in bytes
  (``max_outgoing_bytes``): events may fill half the bytes and then wait
  (and are dropped as above); a reply that would go over the bound waits
  for the client to read what is before it, and no further command of that
  client is executed meanwhile. A client is disconnected once it has taken
  no bytes for ``write_timeout`` -- for ``_REPLY_PATIENCE`` if a reply of
  its own is waiting for room -- and told why in a last error line, after
  what its socket holds; it has ``write_timeout`` more to read it (no longer
  counted against ``max_connections`` meanwhile).
* A snapshot, and a run's full record, is made without an await: one of them
  per turn of the loop, whoever asked (:meth:`ControlServer.heavy_turn`), so
  that a client asking for many at once holds the loop for one at a time.
* A client that half-closes its connection (``nc -N``) still gets the
  replies to the commands it sent, then the end of the stream.
* No line sent is longer than the connection's ``max_send``: values too large
  to send are cut down in snapshots, events and replies, and runs are left
  out of a snapshot that is still too long (see
  :mod:`taskwatch.engine.snapshot`); ``get`` returns a run's full record.

Bad input -- malformed JSON, unknown commands, lines over ``max_message`` --
gets an error reply and is counted in :meth:`ControlServer.stats`; after the
hello the connection keeps working (an oversized line is read and discarded up
to its newline, never buffered). The reply carries the line's ``id`` where one
can be found, even in a line the JSON reader refuses (nested too deep, an
integer too long: see :func:`~taskwatch.engine.wire.peek_id`), so that the
client learns at once which of its commands failed.
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
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python

from .hop import call_on, current_loop, spawn
from .options import ServerOptions, check_options
from .errors import (
    AuthenticationFailed,
    ConnectionClosed,
    EngineNotRunning,
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
    RunPeriodicCommand,
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

#: a busy engine's events reach each client in batches at most this often (seconds):
#: one wake-up and one write per client per batch, rather than per event
_FAN_OUT_INTERVAL = 0.002
#: blank lines a connection's reader skips between two turns of the loop: a buffer full of
#: them comes without a pause (a quarter MiB read at once is a quarter million lines)
_BLANK_RUN = 512

#: bytes of encoded event lines kept for clients that have not taken them yet
_ENCODED_BYTES = 8 << 20

#: bytes coalesced into one socket write
_WRITE_CHUNK = 256 * 1024

#: the most one send to a Unix socket client holds. The kernel keeps each send's bytes (up to
#: about 36 KiB of them) as one buffer and frees it once the client has read all of it, and
#: those frees are the only sign of its reading the engine gets (see _kernel_unsent): in
#: smaller sends, a client reading slowly but steadily shows its progress at a finer grain
_UNIX_SEND = 8 * 1024

#: put on a connection's outgoing queue when its event stream ends (no real line is empty)
_END = b""

#: how long a stopping server keeps writing what its clients have not received yet, and
#: how long a closed connection has to take the rest of its stream (a client cut off for not
#: reading has write_timeout, if longer, to read the line saying why)
_FLUSH_TIMEOUT = 1.0

#: a client whose reply waits for room (it asked for more than max_outgoing_bytes at once)
#: is cut off once it has taken no bytes for this long (write_timeout if shorter): it holds
#: its whole bound and one reply more, and reading nothing it never will free them. One
#: that reads, however slowly, keeps getting its replies
_REPLY_PATIENCE = 2.0

#: how often, at most, a writer waiting for its socket looks whether the client took bytes
_PROGRESS_CHECK = 0.25

#: after a client's last line (a half-close, as ``nc -N`` sends), how long its commands still
#: executing have to finish: their replies are written before the connection ends
_EOF_GRACE = 10.0
#: after a piece of work that holds the loop (a snapshot), the loop is left to everything else
#: for this many times as long before the next: such work takes at most a quarter of it
_HEAVY_REST = 3.0

#: the kernel's queues of connections not accepted yet (capped by the system's
#: somaxconn). What one wake of the loop takes from them is bounded by
#: _ACCEPTS_PER_WAKE, not by this (asyncio's own accept loop takes up to the
#: backlog per wake). Over TCP with TCP_DEFER_ACCEPT it also bounds the
#: connections the kernel holds until their first bytes arrive: sockets that
#: never speak wait there, never reaching the loop. Long enough that a flood of
#: connections arriving faster than one turn of the loop takes them does not
#: overflow it: an overflowing queue drops every new connection alike, a real
#: client's with the rest (its connect is retried only after a second, then
#: three). The server never stops taking from it for long (see _make_room), so
#: a real client waits for those ahead of it only a moment
_LISTEN_BACKLOG = 1024

#: how long serving at a socket path waits for whatever listens there to answer, before
#: taking it for a live server (stopped or busy): only a refused connection shows a stale file
_STALE_PROBE_TIMEOUT = 2.0

#: connections accepted per wake of the listener: bounds what one wake costs the loop
_ACCEPTS_PER_WAKE = 16

#: seconds a connection that has not sent its whole hello is safe from being closed to make
#: room. Over a Unix socket a client's connect() returns as soon as it is queued, and its hello
#: follows a turn or two of its loop later: dashboards (re)connecting in a burst of more than
#: max_handshakes were accepted ahead of their hellos, and the oldest of them closed for
#: newer ones while their hellos were on the way. Sockets still silent after this are closed
#: as before; until one is, accepting pauses (the rest wait in the kernel's queue), so an idle
#: flood is still churned, max_handshakes sockets per this long at the least
_EVICTABLE_AFTER = 0.1

#: what a peek at a silent connection's socket found
_SILENT, _SPOKE, _GONE = range(3)

#: shorter tokens are refused: a guessable token protects nothing
MIN_TOKEN_BYTES = 16

#: a refused token is logged (WARNING) at most once per this many seconds; the refusals in
#: between are counted, and the next line says how many: a flood of guesses cannot flood the log
AUTH_WARNING_INTERVAL = 60.0

#: default bound on the bytes waiting for one connection's socket
DEFAULT_MAX_OUTGOING_BYTES = 32 << 20

#: a bounded run record or event holds about a dozen values of at most max_value
#: bytes each; max_send must be this many values, so that any of them fits a line
_VALUES_PER_LINE = 32

#: what snapshot_line adds around a snapshot's JSON, newline included
_SNAPSHOT_FRAME = len(snapshot_line(b""))

if sys.platform.startswith("linux"):
    import fcntl
    import termios

    def _kernel_unsent(fd: int) -> int:
        """Bytes the kernel still holds for a socket's peer: not acknowledged yet over TCP;
        not read yet from a Unix socket, counted with the kernel's overhead and freed a whole
        send (at most _UNIX_SEND bytes, as the writer makes them) at a time.

        Over TCP the peer acknowledges what it has received, not what it has read: once its
        receive buffer is full, what it reads shows only when its kernel reopens the window,
        which may wait until it has read most of that buffer (on loopback, 128 KiB by default),
        and a sender probing the shut window may hear of it seconds later still. No way of
        writing changes that: it is the floor of a slow reader over TCP."""
        if fd < 0:
            return 0
        try:
            buf = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(buf, sys.byteorder, signed=True)

else:

    def _kernel_unsent(fd: int) -> int:
        # elsewhere only the transport's own buffer shows progress: the kernel's queue is
        # taken for progress as soon as the transport hands it bytes
        return 0


class ServerInfo(BaseModel):
    """Where a control endpoint listens and the token a client must present."""

    model_config = ConfigDict(frozen=True)

    address: str
    #: kept out of the repr too: a notebook cell ending in ``bg.serve()`` shows it, and the
    #: saved notebook keeps what it showed
    token: str | None = Field(repr=False)
    node_id: str

    def __str__(self) -> str:
        # the token stays out of log lines; it is announced once when the server starts
        return self.address


def check_token(where: str, token: object) -> str | None:
    """``token`` if it is None or a str UTF-8 can carry; else :class:`InvalidConfiguration`.

    The token itself is never quoted: the error may be logged.
    """
    if token is None or (isinstance(token, str) and _utf8_encodable(token)):
        return token
    if isinstance(token, str):
        why = (
            "token: it is not UTF-8 encodable (it holds a lone surrogate, as text decoded with "
            "errors='surrogateescape' may); pass the token as the plain text it was issued as"
        )
    elif isinstance(token, bytes | bytearray):
        why = "token: a str is needed, not bytes; decode it first (token.decode())"
    else:
        why = f"token: a str is needed, not {type(token).__name__}"
    raise InvalidConfiguration(where, [why])


#: the longest ``max_message`` a client's hello is taken to carry, for the room a token has in it
_HELLO_MAX_MESSAGE = 2**63 - 1


def _check_token_fits(token: str | None, max_hello: int) -> None:
    """Raise :class:`InvalidConfiguration` for a token no hello within ``max_hello`` bytes can
    carry: every client would be refused before its token was even read (the token itself is
    never quoted)."""
    if token is None:
        return
    # the hello as a client writes it (the token JSON-escaped), with the longest max_message
    size = len(encode_message(Hello(version=PROTOCOL_VERSION, token=token, max_message=_HELLO_MAX_MESSAGE))) - 1
    if size <= max_hello:
        return
    room = max_hello - (size - len(token.encode()))
    why = (
        f"token: a hello carrying it is {size} bytes, over max_hello={max_hello}, so no client "
        f"could ever say hello (a hello within that limit has room for about {max(room, 0)} bytes "
        "of token); pass a shorter token (secrets.token_urlsafe(32) makes one of 43), or raise "
        f"max_hello to {size} or more"
    )
    raise InvalidConfiguration("ControlServer", [why])


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


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


def for_client(exc: BaseException) -> BaseException:
    """``exc`` as a client of the control endpoint is told it: with advice it can follow.

    A plain :class:`EngineNotRunning` tells the engine's owner to start the engine
    (``async with engine:``), which a client cannot do; what it can do is wait,
    and reconnect once the engine runs again. (Its subclasses say something
    else -- a run the stop left unfinished, a crash -- and are told as they are.)
    """
    if type(exc) is not EngineNotRunning:
        return exc
    state = exc.state
    if state in ("stopping", "stopped"):
        advice = (
            f"the engine is {state} and accepts no work; it ends this connection once it has stopped. "
            "Reconnect once it runs again (taskwatch attach reconnects by itself)"
        )
    else:
        advice = f"the engine is {state} and accepts no work yet; try again once it runs"
    return EngineNotRunning(state, advice)


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


class ServeKwargs(TypedDict, total=False):
    """The options of ``engine.serve(address, **options)`` and ``bg.serve(address, **options)``:
    :class:`ControlServer`'s keyword-only parameters, so a type checker catches a misspelt option
    or a wrong type where it is written.

    Values are still checked when the server is made (a type does not say a limit is too small).
    """

    token: str | None
    allow_remote: bool
    max_message: int
    max_hello: int
    max_handshakes: int
    hello_timeout: float
    buffer: int
    outgoing: int
    max_outgoing_bytes: int
    max_send: int
    max_value: int
    write_timeout: float
    snapshot_runs: int
    max_inflight: int
    max_connections: int
    announce: bool


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
        Connections that have not yet said hello, at once (default 64, room for
        every dashboard reconnecting at once after a restart). When one more
        arrives, the one that has waited longest without sending a whole hello
        line is closed (counted as ``handshakes_evicted``), once it has waited
        0.1 s: a client's hello may still be on its way until then, and
        accepting pauses meanwhile (more clients wait in the kernel's queue). A
        connection whose whole hello has arrived is never closed to make room;
        while every place is held by such a hello accepting pauses too, until
        the first of them is read (a few turns of the loop). Idle or trickling
        sockets cannot keep a real client out, nor count against
        ``max_connections``.
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
        waits while the client reads, and no further command of that client
        is executed meanwhile. A client whose reply waits and that reads
        nothing for 2 s (``write_timeout`` if shorter) is disconnected
        (counted as ``overflow_disconnects``).
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
        Seconds a client may take no bytes at all of what is written to it
        before it is dropped; one that reads slowly is not, as long as its
        reading shows within that time: the system shows it in steps, over a
        Unix socket every 8 KiB read, over TCP as the client's receive window
        reopens (on loopback that may take reading most of its 128 KiB receive
        buffer, and seconds more), so a client reading less than one step per
        ``write_timeout`` is taken for stalled. A client dropped (for this or
        the above) gets a last ``error`` line (``ConnectionClosed``, no id)
        saying why.
    snapshot_runs:
        Runs included in each snapshot (newest first).
    max_inflight:
        Commands one connection may have executing at once; more wait unread.
    max_connections:
        Authenticated clients served at once; one more is told so after its
        hello, counted (``refused``) and closed.
    announce:
        Print the address on standard output once started (never the token: a
        generated one is ``.token``). Pass False where standard output is a log
        (a service's JSON lines, say): the address is logged at INFO on the
        ``taskwatch.server`` logger whether or not it is printed.
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
        max_handshakes: int = 64,
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
        options = check_options(
            ServerOptions, "ControlServer", allow_remote=allow_remote, announce=announce, max_message=max_message,
            max_hello=max_hello, max_handshakes=max_handshakes, hello_timeout=hello_timeout, buffer=buffer,
            outgoing=outgoing, max_outgoing_bytes=max_outgoing_bytes, max_send=max_send, max_value=max_value,
            write_timeout=write_timeout, snapshot_runs=snapshot_runs, max_inflight=max_inflight,
            max_connections=max_connections,
        )  # fmt: skip
        problems = []
        if options.max_send < _VALUES_PER_LINE * options.max_value:
            problems.append(
                f"max_send must be at least {_VALUES_PER_LINE} * max_value "
                f"({_VALUES_PER_LINE * options.max_value} bytes), so that any bounded run or event fits a line"
            )
        elif options.max_outgoing_bytes < 2 * options.max_send:
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
        token = check_token("ControlServer", token)
        if token is not None and len(token.encode()) < MIN_TOKEN_BYTES:
            raise WeakToken(len(token.encode()), MIN_TOKEN_BYTES)
        _check_token_fits(token, max_hello)
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
        #: the listening socket, accepted from by _on_listener_ready (no asyncio.Server: see _accept)
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the listener is watched by the selector (False while the handshake pool is full)
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self._address: str | None = None
        self._socket_path: Path | None = None
        self._socket_inode: int | None = None
        self._conns: dict[asyncio.Task[None], _Connection] = {}
        #: accepted sockets that have sent nothing yet, by file descriptor, oldest first
        #: (a dict keeps the order): watched by the selector, nothing more
        self._silent: dict[int, _Silent] = {}
        #: when the oldest silent socket's hello_timeout is up
        self._silent_timer: asyncio.TimerHandle | None = None
        #: connections reading their hello, oldest first
        self._handshaking: dict[_Connection, None] = {}
        #: connections past their welcome (while more than one, encoded events are shared)
        self._streaming: dict[_Connection, None] = {}
        #: event lines by seq (with the event, to tell it from a notice of the same seq) and
        #: cut count, kept while more than one client streams; oldest first in _encoded_order
        self._encoded: dict[int, tuple[BaseEvent, bytes, int]] = {}
        self._encoded_order: deque[int] = deque()
        self._encoded_bytes = 0
        self._encoded_max = buffer + outgoing
        # the handshake refusals, encoded once: a flood is answered without pydantic
        self._evicted_line = encode_message(error_reply(None, TooManyHandshakes(max_handshakes)))
        self._hello_timeout_line = encode_message(
            error_reply(None, ProtocolError(f"no hello within {hello_timeout:g} s"))
        )
        #: connections past a valid hello: these count against max_connections
        self._served: set[_Connection] = set()
        # finished runs are encoded once for every snapshot of every client, not once each
        self._run_cache = RunJsonCache(max_value, max_bytes=max_send)
        self._counts: Counter[str] = Counter()
        #: refused tokens: loop time and wall-clock time of the last WARNING, and how many
        #: were refused since it without a line of their own
        self._auth_warned_at: float | None = None
        self._auth_warned_wall = 0.0
        self._auth_unlogged = 0
        self._closed_dropped = 0
        self._stopped = False
        #: taken by each command that holds the loop for long without an await (a snapshot, a
        #: full record) and by each first snapshot: one of them per turn of the loop
        self._heavy = asyncio.Lock()
        #: when (loop time) the next heavy piece of work may begin (see heavy_turn)
        self._heavy_free_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """The real address: the socket path, or ``tcp://host:port`` with the chosen port."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        if self._stopped:
            # nothing listens there any more (and over TCP another process may have the port now)
            raise RuntimeError(
                f"the server that served at {self._address} is stopped; start() serves again "
                "(at a new port if it was given port 0)"
            )
        return self._address

    def info(self) -> ServerInfo:
        return ServerInfo(address=self.address, token=self.token, node_id=self.engine.node_id)

    async def start(self) -> None:
        """Listen at the address; again after :meth:`stop` (over TCP with port 0, at a new port).

        Does nothing while already listening. The engine must be running
        (:class:`~taskwatch.engine.errors.EngineNotRunning` otherwise): its next stop stops
        this server, whether :meth:`Engine.serve` started it or this did (after a restart of
        the engine, say). Awaited on another loop than the engine's, it listens on the
        engine's, as :meth:`Engine.serve` does.
        """
        if self._listener is not None:
            return
        loop = self.engine.loop
        if loop is not None and loop is not current_loop() and loop.is_running():
            # its connections read the engine's bus and call the engine: on the engine's loop
            await call_on(loop, self.start)
            return
        if self.engine.state != "running":
            # refused before binding anything: nothing would stop it with the engine
            raise EngineNotRunning(self.engine.state)
        self._stopped = False
        self._address = None
        # a lock is bound to the loop it was first waited on: this start's loop may be another
        self._heavy = asyncio.Lock()
        #: when (loop time) the next heavy piece of work may begin (see heavy_turn)
        self._heavy_free_at = 0.0
        target = self._target or UnixAddress(str(default_socket_path(self.engine.node_id)))
        if isinstance(target, TcpAddress):
            await self._start_tcp(target)
        else:
            # made absolute now: it is the address given to clients in other directories, and the
            # file is removed at the stop, after a chdir (a notebook's %cd) maybe. Unless that is
            # too long for a socket, where the path given (short, relative) still is not
            absolute = Path(os.path.abspath(target.path))
            fits = len(os.fsencode(absolute)) <= _MAX_SOCKET_PATH
            await self._start_unix(absolute if fits else Path(target.path))
        try:
            # at once, with no await since listen(): the engine's stop, if one began while the
            # socket was bound, must not miss a server that listens after it
            self.engine.keep_server(self)
        except BaseException:
            self._close_listener()
            self._remove_socket_file()
            self._address = None
            raise
        # never the token itself, in the log or on standard output (often a log too): a log is
        # read by more people than may drive the engine
        extra = " (with a token made here: the returned server's .token)" if self.token and self._generated else ""
        log.info("engine %s serving at %s%s", self.engine.node_id, self._address, extra)
        if self.announce:
            print(f"taskwatch: engine {self.engine.node_id} serving at {self._address}{extra}", flush=True)

    async def _start_tcp(self, target: TcpAddress) -> None:
        # "localhost" may resolve to two families, which with port 0 would get two ports
        host = "127.0.0.1" if target.host == "localhost" else target.host
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise InvalidAddress(str(target), f"{host!r} resolves to no address")
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # an OSError still (callers test its errno), saying where, as the Unix socket's does
                raise OSError(
                    errno.EADDRINUSE,
                    f"another server is already listening at {TcpAddress(host, target.port)} (address "
                    "already in use); stop it, or serve at another port (port 0 picks a free one)",
                ) from None
            if hasattr(socket, "TCP_DEFER_ACCEPT"):
                # Linux: a connection reaches accept() only once its first bytes (the
                # hello) arrive, or after about this many seconds: a connect flood that
                # never speaks stays in the kernel, off the engine's loop
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, round(self.hello_timeout)))
            self._listen(sock)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        self._address = str(TcpAddress(host, port))

    async def _start_unix(self, path: Path) -> None:
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise InvalidAddress(str(path), "the socket path is too long for a Unix socket; choose a shorter one")
        try:
            await _remove_stale_socket(path)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise _unusable_folder(path, exc) from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(os.fspath(path))
            except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                raise _unusable_folder(path, exc) from exc
            # chmod before listen(): until listen nobody can connect, so no
            # client ever reaches a socket with the umask's looser mode
            os.chmod(path, 0o600)
            self._socket_inode = path.stat().st_ino
            self._socket_path = path
            self._listen(sock)
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
        self._address = str(path)

    def _listen(self, sock: socket.socket) -> None:
        # our own accept loop rather than asyncio.start_server: that one makes a
        # transport, a reader and a writer for every socket it accepts (up to 100
        # per wake), before we could tell a client from a socket that never speaks
        sock.setblocking(False)
        sock.listen(_LISTEN_BACKLOG)
        self._listener = sock
        self._loop = asyncio.get_running_loop()
        self._resume_accepting()

    async def stop(self) -> None:
        """Close the listener and every connection, await their tasks, remove the socket file.

        :meth:`start` serves again afterwards.
        """
        if self._stopped or self._listener is None:
            return
        loop = self._loop
        if loop is not None and loop is not current_loop() and loop.is_running():
            # awaited on another loop (a notebook's, beside start_background()): its connections'
            # tasks are the loop's it serves on, and are ended and awaited there
            await call_on(loop, self.stop)
            return
        self._stopped = True
        self.engine.forget_server(self)
        self._close_listener()
        for fd in list(self._silent):
            self._drop_silent(fd)
        if self._silent_timer is not None:
            self._silent_timer.cancel()
            self._silent_timer = None
        tasks = list(self._conns)
        # a connection still in its handshake has nothing to receive: end it now
        for conn in list(self._handshaking):
            conn.dismiss()
        # end each event stream where it is: what is buffered for a client (the
        # engine's last events among it) is still written, for a short while
        for conn in self._conns.values():
            if conn.sub is not None:
                conn.sub.close()
        conns = dict(self._conns)
        if tasks:
            _, unflushed = await asyncio.wait(tasks, timeout=_FLUSH_TIMEOUT)
            for task in unflushed:
                # it has had its chance to take the rest: closing would wait for it again
                conns[task].abandon()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._remove_socket_file()

    def _close_listener(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._pause_accepting(None)
        listener.close()
        self._listener = None

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

    # Until its whole hello line is here a connection is a _Silent: a socket in
    # the selector and the bytes it sent, nothing else. Its hello's newline (or
    # a full pool, or its hello_timeout) ends that: it becomes a _Connection
    # reading its hello, or it is closed. So a socket that never speaks, or
    # sends a byte and stalls, costs accept, a read, the selector and close.

    def _pool_size(self) -> int:
        return len(self._silent) + len(self._handshaking)

    def _on_listener_ready(self) -> None:
        listener = self._listener
        if listener is None or self._stopped:
            return
        for _ in range(_ACCEPTS_PER_WAKE):
            if not self._has_room():
                return  # accepting paused; the kernel queues the rest
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # out of file descriptors or memory: the connection waits in the kernel's
                # queue; trying again at once would spin the loop on the same error
                log.warning("control endpoint cannot accept a connection: %s", exc)
                self._pause_accepting(self._now() + 0.1)
                return
            self._counts["connections"] += 1
            sock.setblocking(False)
            data = _take(sock, self.max_hello + 1)
            if data is None:
                sock.close()
                continue
            if not self._make_room():
                # the silent socket _has_room found spoke between the check and the accept, and
                # no other may be closed yet: this one is refused
                self._counts["handshakes_evicted"] += 1
                with contextlib.suppress(OSError):
                    sock.send(self._evicted_line)
                sock.close()
                continue
            accepted = self._now()
            deadline = accepted + self.hello_timeout
            if self._hello_complete(data):
                # its whole hello is already here (the usual case for a real client)
                self._start_connection(sock, deadline, data)
            else:
                self._add_silent(sock, accepted, deadline, data)

    def _has_room(self) -> bool:
        """Whether one more connection fits once a silent socket is closed; else accepting
        pauses until a handshake ends.

        Closes nobody: a connection is closed to make room only for one accepted."""
        while self._pool_size() >= self.max_handshakes:
            if self._silent:
                fd, silent = next(iter(self._silent.items()))
                state = _peek(silent.sock)
                if state == _SILENT:
                    evictable_at = silent.accepted + _EVICTABLE_AFTER
                    if evictable_at <= self._now():
                        return True
                    # the oldest (so every one) may be a client whose hello is on its way:
                    # accept again once it may be closed, or when a place frees up first
                    self._pause_accepting(evictable_at)
                    return False
                if state == _SPOKE:
                    self._silent_readable(fd)  # it stays silent if its hello is still partial
                else:
                    self._drop_silent(fd)
                continue
            # every place is held by a whole hello being read: each is done within a few
            # turns of the loop, and the first to end resumes accepting (_handshake_over)
            self._pause_accepting(None)
            return False
        return True

    def _make_room(self) -> bool:
        """Room in the handshake pool for one more connection, closing the silent socket
        (or partial hello) that has waited longest; False if none."""
        while self._pool_size() >= self.max_handshakes:
            if not self._silent:
                return False
            fd, silent = next(iter(self._silent.items()))
            # its bytes may have arrived since the selector last looked: then it may be
            # no idle socket but a client whose hello is here, and that one keeps its place
            state = _peek(silent.sock)
            if state == _SPOKE:
                self._silent_readable(fd)
            elif state == _GONE:
                self._drop_silent(fd)
            elif silent.accepted + _EVICTABLE_AFTER > self._now():
                return False  # too young to be taken for idle (see _EVICTABLE_AFTER)
            else:
                self._counts["handshakes_evicted"] += 1
                self._drop_silent(fd, self._evicted_line)
        return True

    def _hello_complete(self, data: bytes) -> bool:
        """Whether ``data`` holds a whole line, or more than a hello may hold: it is read now.
        Blank lines before it are no hello: a socket that sent only those stays silent, and may
        be closed to make room (else 64 sockets sending a newline each held every place)."""
        return b"\n" in data.lstrip() or len(data) > self.max_hello

    def _pause_accepting(self, until: float | None) -> None:
        """Stop watching the listener; until the loop time ``until`` at the latest, if given."""
        if self._accepting and self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._accepting = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if until is not None and self._loop is not None and not self._stopped:
            self._resume = self._loop.call_at(until, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._accepting or self._stopped or self._listener is None or self._loop is None:
            return
        self._loop.add_reader(self._listener.fileno(), self._on_listener_ready)
        self._accepting = True

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _add_silent(self, sock: socket.socket, accepted: float, deadline: float, data: bytes) -> None:
        assert self._loop is not None
        fd = sock.fileno()
        self._silent[fd] = _Silent(sock, accepted, deadline, data)
        self._loop.add_reader(fd, self._silent_readable, fd)
        if self._silent_timer is None:
            self._silent_timer = self._loop.call_at(self._silent[fd].deadline, self._expire_silent)

    def _silent_readable(self, fd: int) -> None:
        """Bytes (or the end) came: kept while the hello is partial, a connection once it is whole."""
        silent = self._silent.get(fd)
        if silent is None:
            return
        data = _take(silent.sock, self.max_hello + 1 - len(silent.data))
        if data == b"":
            return  # a wake-up with nothing to read
        if data is None:
            if silent.data.rstrip().endswith(b"}"):
                # a hello without its newline, then the end of what the client sends (printf
                # '...' | nc -N): it is still answered. Other leftovers are a client gone
                # mid-hello; it has nobody to tell
                self._promote(fd)
                return
            self._drop_silent(fd)
            self._resume_accepting()
            return
        silent.data += data
        if self._hello_complete(silent.data):
            self._promote(fd)

    def _promote(self, fd: int) -> None:
        """A silent socket's hello is here: it becomes a connection reading it, in the same pool place."""
        assert self._loop is not None
        silent = self._silent.pop(fd)
        self._loop.remove_reader(fd)
        self._start_connection(silent.sock, silent.deadline, silent.data)

    def _drop_silent(self, fd: int, tell: bytes | None = None) -> None:
        """Close a silent socket, telling it why first if ``tell`` (it has room for one short line)."""
        silent = self._silent.pop(fd)
        if self._loop is not None:
            self._loop.remove_reader(fd)
        if tell is not None:
            with contextlib.suppress(OSError):
                silent.sock.send(tell)
        silent.sock.close()

    def _expire_silent(self) -> None:
        """Close the silent sockets whose hello_timeout is up; wait for the next one's."""
        self._silent_timer = None
        now = self._now()
        while self._silent:
            fd, silent = next(iter(self._silent.items()))
            if silent.deadline > now:
                assert self._loop is not None
                self._silent_timer = self._loop.call_at(silent.deadline, self._expire_silent)
                break
            self._counts["hello_timeouts"] += 1
            self._drop_silent(fd, self._hello_timeout_line)
        self._resume_accepting()

    def _start_connection(self, sock: socket.socket, deadline: float, data: bytes) -> None:
        assert self._loop is not None
        conn = _Connection(self, sock, deadline, data)
        self._handshaking[conn] = None
        task = spawn(conn.run(), name="taskwatch-control-conn")
        self._conns[task] = conn
        task.add_done_callback(self._conn_done)

    # ------------------------------------------------------------------ event fan-out

    def stream_to(self, conn: _Connection) -> None:
        self._streaming[conn] = None

    def stop_streaming(self, conn: _Connection) -> None:
        self._streaming.pop(conn, None)
        if not self._streaming:
            self._encoded.clear()
            self._encoded_order.clear()
            self._encoded_bytes = 0

    def event_line(self, event: BaseEvent) -> tuple[bytes, int]:
        """An event's ``event`` line and how many values were cut in it: encoded once for every client."""
        seq = event.seq
        hit = self._encoded.get(seq)
        if hit is not None and hit[0] is event:
            return hit[1], hit[2]
        try:
            body, cut = bounded_json(event, self.max_value)
        except (ValueError, TypeError, RecursionError) as exc:  # pydantic's serialization error is a ValueError
            # a value no JSON can carry, published unchecked: a drop notice stands in its place
            # (kept for every client, so counted once), where raising would end every client's stream
            self._counts["events_unencodable"] += 1
            log.warning("a %s event (seq %d) cannot be encoded; sent a drop notice instead: %s",
                        getattr(event, "kind", "?"), seq, exc)
            notice = EventsDropped(seq=seq, ts=event.ts, node=event.node, count=1, total=1)
            body, cut = notice.model_dump_json().encode(), 0
        line = event_line(body)
        # kept for the other clients (a drop notice is one client's own)
        if len(self._streaming) > 1 and type(event) is not EventsDropped:
            encoded = self._encoded
            if hit is not None:
                self._encoded_bytes -= len(hit[1])
            else:
                self._encoded_order.append(seq)
            encoded[seq] = (event, line, cut)
            self._encoded_bytes += len(line)
            # the clients furthest behind are at most a subscription buffer behind the rest
            order = self._encoded_order
            while len(order) > self._encoded_max or self._encoded_bytes > _ENCODED_BYTES:
                old = encoded.pop(order.popleft(), None)
                if old is not None:
                    self._encoded_bytes -= len(old[1])
        return line, cut

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        conn = self._conns.pop(task, None)
        if conn is not None:
            self._closed_dropped += conn.dropped
            self._handshake_over(conn)
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
        # (membership, not pop()'s answer: the dict's values are all None)
        if conn in self._handshaking:
            del self._handshaking[conn]
            self._resume_accepting()  # a place in the pool is free

    def count(self, what: str, n: int = 1) -> None:
        self._counts[what] += n

    def refuse_token(self, peer: str) -> None:
        """Count a hello with a wrong or missing token, and log it, at most once per
        :data:`AUTH_WARNING_INTERVAL` (never the token: it may be a mistyped real one)."""
        self._counts["auth_failures"] += 1
        now = self._now()
        if self._auth_warned_at is not None and now - self._auth_warned_at < AUTH_WARNING_INTERVAL:
            self._auth_unlogged += 1
            return
        if self._auth_unlogged:
            since = time.strftime("%H:%M:%S", time.localtime(self._auth_warned_wall))
            log.warning(
                "control endpoint at %s refused a wrong token from %s; %d more refused since %s",
                self._address, peer, self._auth_unlogged, since,
            )  # fmt: skip
        else:
            log.warning(
                "control endpoint at %s refused a wrong token from %s; more within %g s are only "
                "counted (stats()['auth_failures']) until the next such line",
                self._address, peer, AUTH_WARNING_INTERVAL,
            )  # fmt: skip
        self._auth_warned_at = now
        self._auth_warned_wall = time.time()
        self._auth_unlogged = 0

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
        "incompatible",
        "malformed",
        "oversized",
        "unknown",
        "commands",
        "errors",
        "replies_given_up",
        "slow_disconnects",
        "overflow_disconnects",
        "values_truncated",
        "runs_omitted",
        "events_too_large",
        "events_unencodable",
    )

    def stats(self) -> dict[str, int]:
        """Counters and gauges of this endpoint.

        Counters: ``connections`` (accepted sockets), ``handshakes_evicted``
        (closed before their hello to make room in the handshake pool),
        ``hello_timeouts`` (no hello within ``hello_timeout``), ``refused``
        (valid hello beyond ``max_connections``), ``auth_failures``,
        ``incompatible`` (a hello of another protocol version), ``malformed``, ``oversized`` (lines over ``max_hello`` or
        ``max_message``), ``unknown``, ``commands``, ``errors`` (commands that
        failed), ``replies_given_up`` (commands still going ``_EOF_GRACE`` after
        their client half-closed: it got an error line instead of the reply),
        ``slow_disconnects`` (took no bytes for ``write_timeout``),
        ``overflow_disconnects`` (read nothing while a reply waited for room
        within ``max_outgoing_bytes``), ``values_truncated`` and ``runs_omitted``
        (to keep lines within ``max_send``), ``events_too_large`` (sent as a
        ``bus.dropped`` notice instead), ``events_unencodable`` (holding a value
        no JSON can carry: also sent as a notice), ``events_dropped`` (lost by slow
        clients). Gauges: ``handshaking`` and ``active`` (authenticated)
        connections, and ``cached_runs``/``cached_bytes``: the finished runs whose JSON
        is kept for the next snapshots.
        """
        counts = {key: self._counts[key] for key in self._STATS}
        counts["events_dropped"] = self._closed_dropped + sum(c.dropped for c in self._conns.values())
        counts["handshaking"] = self._pool_size()
        counts["active"] = len(self._served)
        counts["cached_runs"] = len(self._run_cache)
        counts["cached_bytes"] = self._run_cache.size
        return counts

    # ------------------------------------------------------------------ commands

    @contextlib.asynccontextmanager
    async def heavy_turn(self, own: asyncio.Lock | None = None) -> AsyncIterator[None]:
        """A turn of the loop of its own for work that holds the loop without an await (a
        snapshot, a full record): one such piece of work per turn, whoever asked for it.

        ``own`` is a lock of the asking client's: its heavy commands then wait in the shared line
        one at a time, so a client keeping sixteen snapshots in flight puts one ahead of a new
        client's attach, not sixteen (each client's turns come round in the order they asked).

        The commands read from one client's buffer in one turn (16 snapshots pipelined, a
        dashboard's ``gather``) would otherwise all run in the next turn, back to back, and
        no timer, run or other client would get a turn before the last of them. Each waits
        for the one before it, then lets the loop turn twice before it runs: a task whose
        timer fell due or whose socket was read meanwhile is woken in the first of those
        turns and runs in the second, before this work rather than after it.
        """
        async with own if own is not None else contextlib.nullcontext(), self._heavy:
            loop = asyncio.get_running_loop()
            rest = self._heavy_free_at - loop.time()
            if rest > 0:
                # pacing, not synchronisation: clients asking for snapshot after snapshot (one
                # pipelining them, many reconnecting) get this work at most a share of the loop,
                # and the engine's own work the rest, however fast they ask
                await asyncio.sleep(rest)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            began = loop.time()
            try:
                yield
            finally:
                ended = loop.time()
                self._heavy_free_at = ended + (ended - began) * _HEAVY_REST

    async def execute(self, cmd: Command, limit: int | None = None, heavy: asyncio.Lock | None = None) -> bytes:
        """Run one command on the engine; returns its result as JSON of at most ``limit`` bytes.

        ``limit`` defaults to ``max_send``. Records are bounded as in snapshots,
        except by ``get``, which returns the full record or raises
        :class:`ReplyTooLarge` -- as does any result that cannot fit. ``heavy``: the
        asking client's own lock for :meth:`heavy_turn`.
        """
        engine = self.engine
        room = self.max_send if limit is None else limit
        result: bytes
        match cmd:
            case SubmitCommand(task=task, params=params, key=key):
                result = self._bounded((await engine.submit(task, params, key=key)).record())
            case CancelCommand(run_id=run_id, grace=grace):
                # the client's grace, not the engine's: it says how long it waits for the reply
                result = self._bounded(await engine.cancel(run_id, grace))
            case RetryCommand(run_id=run_id):
                result = self._bounded((await engine.retry(run_id)).record())
            case GetCommand(run_id=run_id):
                # the whole record: this is how a client reads what listings cut down
                async with self.heavy_turn(heavy):
                    result = engine.get(run_id).model_dump_json().encode()
                if len(result) > room:
                    raise ReplyTooLarge(f"run {run_id}'s full record", len(result), room)
            case PauseCommand(name=name):
                result = self._bounded(engine.pause_periodic(name))
            case ResumeCommand(name=name):
                result = self._bounded(engine.resume_periodic(name))
            case RunPeriodicCommand(name=name):
                result = self._bounded((await engine.run_periodic(name)).record())
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
                async with self.heavy_turn(heavy):
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
            f"handshaking={self._pool_size()}>"
        )


async def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file left by a dead server; refuse to touch anything else.

    Whether a server is there is found by connecting, without blocking the loop: a
    server whose process is stopped (Ctrl+Z, a debugger) with its backlog full would
    hold a blocking connect, and the engine's runs with it, for as long as it stays
    stopped. A probe that gets no answer within ``_STALE_PROBE_TIMEOUT`` is taken for
    a server that is there: only a refused connection shows that nothing listens.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        try:
            async with asyncio.timeout(_STALE_PROBE_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(probe, os.fspath(path))
        except TimeoutError:
            raise OSError(
                errno.EADDRINUSE,
                f"another server is already listening at {path} (it did not answer within "
                f"{_STALE_PROBE_TIMEOUT:g} s: its process may be stopped or busy)",
            ) from None
        except OSError:
            path.unlink(missing_ok=True)
        else:
            raise OSError(errno.EADDRINUSE, f"another server is already listening at {path}")
    finally:
        probe.close()


def _hello_too_large(size: int, limit: int, blank: int = 0) -> MessageTooLarge:
    """The refusal of a hello longer than ``limit`` (max_hello), ``blank`` bytes of blank lines
    before it included: read only until the excess came, and the connection then closed, not the
    line discarded as a later one is."""
    exc = MessageTooLarge(size, limit, setting="max_hello")
    came = f"{size} bytes came before its end" + (f", {blank} of them blank lines before it" if blank else "")
    message = (
        f"the hello is longer than this engine's {limit}-byte limit for it ({came}), so it was not "
        "read and the connection is closed; send a shorter hello (a token the engine accepts fits), "
        "or raise max_hello where the engine is served"
    )
    exc.args = (message,)
    return exc


def _unusable_folder(path: Path, exc: OSError) -> InvalidAddress:
    """Why no socket file can be made at ``path``: its folder is missing, not a folder, or not ours to write."""
    folder = path.parent
    if isinstance(exc, PermissionError):
        why = f"the folder {folder} is not writable by this process, so the socket file cannot be made there"
    elif isinstance(exc, NotADirectoryError):
        why = f"{folder} (or a folder above it) is not a folder"
    else:
        why = f"the folder {folder} does not exist"
    return InvalidAddress(
        str(path),
        why,
        "choose a socket path in a folder you can write to (create it first: mkdir -p), or pass no "
        "address to serve at a private default path",
    )


def _peek(sock: socket.socket) -> int:
    """Whether a connection has sent something (``_SPOKE``), nothing yet (``_SILENT``) or has gone (``_GONE``)."""
    try:
        return _SPOKE if sock.recv(1, socket.MSG_PEEK) else _GONE
    except (BlockingIOError, InterruptedError):
        return _SILENT
    except OSError:
        return _GONE


def _take(sock: socket.socket, size: int) -> bytes | None:
    """Up to ``size`` bytes a connection has sent (``b""`` if none yet), or None once it has gone."""
    try:
        return sock.recv(size) or None
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return None


class _Silent:
    """An accepted socket whose hello has not all arrived: what it sent of it (``data``), and
    when its hello_timeout is up."""

    __slots__ = ("sock", "accepted", "deadline", "data")

    def __init__(self, sock: socket.socket, accepted: float, deadline: float, data: bytes) -> None:
        self.sock = sock
        #: loop time of the accept: a younger socket than _EVICTABLE_AFTER is never closed for room
        self.accepted = accepted
        self.deadline = deadline
        self.data = data


class _Refused(Exception):
    """A handshake ends with this error reply, then the connection closes."""

    def __init__(self, message_id: MessageId | None, error: BaseException) -> None:
        self.message_id = message_id
        self.error = error


class _Outbox:
    """A connection's encoded lines waiting for its socket writer, bounded in lines and in bytes.

    ``size`` counts the bytes queued plus those taken by the writer and not yet
    drained to the socket. A reply that does not fit waits for room, and while
    one waits no further command is executed (:meth:`wait_turn`), so a client
    that reads nothing holds at most ``max_bytes`` of the server's memory and
    one reply more, whatever it asks for. Events are put in batches without
    waiting (see :meth:`_Connection.forward`); the writer is woken once per
    batch, not once per line.
    """

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.lines: deque[bytes] = deque()
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.size = 0
        #: set while lines wait for the writer
        self._filled = asyncio.Event()
        #: set when lines or bytes were freed (what a waiting reply waits for)
        self._freed = asyncio.Event()
        #: replies waiting for room, in turn (first come, first queued)
        self.waiting = 0
        self._turns = asyncio.Lock()
        #: the connection is ending: nothing more is queued, and waiting replies give up
        self.closed = False

    def fits_event(self, line: bytes, lines: int = 0, size: int = 0) -> bool:
        """Whether ``line`` fits after ``lines`` more lines of ``size`` bytes.

        Events may fill half the bytes: the other half is kept for replies. An
        empty outbox takes any line, so a large event cannot wait forever."""
        total = self.size + size
        return len(self.lines) + lines < self.max_lines and (
            total == 0 or total + len(line) <= self.max_bytes // 2
        )

    def has_event_room(self) -> bool:
        return len(self.lines) < self.max_lines and self.size < self.max_bytes // 2

    async def wait_freed(self) -> None:
        """Wait until the writer takes or writes something."""
        self._freed.clear()
        await self._freed.wait()

    def put_events(self, lines: list[bytes], size: int) -> None:
        """Queue event lines of ``size`` bytes in all, already checked with :meth:`fits_event`."""
        self.lines.extend(lines)
        self.size += size
        self._filled.set()

    def _fits_reply(self, line: bytes) -> bool:
        return len(self.lines) < self.max_lines and self.size + len(line) <= self.max_bytes

    async def put_reply(self, line: bytes) -> bool:
        """Queue ``line`` once it fits, after the replies already waiting; False if the
        connection ended first. (The writer cuts off a client that reads nothing meanwhile.)"""
        if not self.waiting and self._fits_reply(line):
            self._queue(line)
            return True
        self.waiting += 1
        try:
            async with self._turns:
                while not self.closed and not self._fits_reply(line):
                    await self.wait_freed()
                if self.closed:
                    return False
                self._queue(line)
                return True
        finally:
            self.waiting -= 1

    async def wait_turn(self) -> None:
        """Wait while a reply waits for room: a command's reply is made only once the ones
        before it are queued, so what a client asked for and does not read stays bounded."""
        while self.waiting and not self.closed:
            await self.wait_freed()

    def _queue(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line)
        self._filled.set()

    def put_first(self, line: bytes) -> None:
        """Queue a line before the writer starts (the welcome and first snapshot)."""
        self.lines.append(line)
        self.size += len(line)
        self._filled.set()

    def put_end(self) -> None:
        """Queue the end mark: the writer writes what is before it, then stops."""
        self.lines.append(_END)
        self._filled.set()

    async def take(self, chunk: int) -> list[bytes]:
        """Wait for lines; take them up to about ``chunk`` bytes. Call :meth:`written` once sent."""
        while not self.lines:
            self._filled.clear()
            await self._filled.wait()
        lines = self.lines
        taken = [lines.popleft()]
        size = len(taken[0])
        while size < chunk and lines:
            line = lines.popleft()
            taken.append(line)
            size += len(line)
        self._freed.set()  # lines are free again
        return taken

    def written(self, size: int) -> None:
        self.size = max(0, self.size - size)  # (0 after a clear)
        self._freed.set()

    def clear(self) -> None:
        """The connection is ending: drop what is queued; replies waiting give up."""
        self.closed = True
        self.lines.clear()
        self.size = 0
        self._freed.set()


class _Connection:
    """One client: handshake, then reader, writer and event-pump tasks until either side ends."""

    def __init__(self, server: ControlServer, sock: socket.socket, deadline: float, data: bytes) -> None:
        self.server = server
        self.sock = sock
        #: loop time by which the handshake must be over (hello_timeout after the accept)
        self.deadline = deadline
        #: what it sent before it became a connection: its hello (whole, unless too long or
        #: ended early), perhaps commands after it
        self.data = data
        # set by _open_streams, first thing in run()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: the handshake refusal to send once the streams are open, if evicted before that
        self.evicted: bytes | None = None
        self.out = _Outbox(server.outgoing, server.max_outgoing_bytes)
        #: longest line sent to this client: the server's, or less if its hello asked
        self.max_send = server.max_send
        self.sub: Subscription | None = None
        self.commands: set[asyncio.Task[None]] = set()
        #: what each command task answers (its id and type), for the line a late one gets instead
        self.asked: dict[asyncio.Task[None], tuple[MessageId, str]] = {}
        self.inflight = asyncio.Semaphore(server.max_inflight)
        #: its place in the server's line for heavy work (see ControlServer.heavy_turn)
        self.heavy = asyncio.Lock()
        #: set once everything queued before the end of the stream is written
        self.flushed = asyncio.Event()
        #: event lines taken from the subscription that did not fit the outbox yet (at
        #: most one batch, and no more than the outbox has free lines: see forward)
        self.held: deque[bytes] = deque()
        #: the end mark is queued: nothing more is forwarded
        self.ended = False
        #: a handshake refusal is being written
        self.refusing = False
        #: closed by the server during its handshake (to make room, or stopping)
        self.dismissed = False
        #: the server ended this connection: what is still buffered for it is thrown away
        self.cut_off = False
        #: cut off for not reading, the line saying why written after what its socket holds
        self.told_why = False
        #: the most one socket write holds (None: all that is taken from the outbox at once)
        self.send_size: int | None = None
        #: what the writer has of its lines and not written yet, while it waits for the socket
        #: (see _send): written before the line saying why, if this client is cut off meanwhile
        self.unwritten: memoryview | None = None

    @property
    def dropped(self) -> int:
        return self.sub.dropped if self.sub is not None else 0

    async def run(self) -> None:
        try:
            await self._open_streams()
            if await self._handshake():
                await self._serve()
        except (ConnectionError, OSError):
            pass  # the peer went away; nothing to tell it
        finally:
            await self._teardown()

    async def _open_streams(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.server.max_hello, loop=loop)
        if self.data:
            # read from the socket already (see ControlServer._silent_readable): it comes first
            reader.feed_data(self.data)
            self.data = b""
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, self.sock)
        if self.sock.family == socket.AF_UNIX:
            # written in sends of _UNIX_SEND bytes, each once the one before is in the kernel's
            # hands (drain() waits for the transport's buffer to empty): see _send
            transport.set_write_buffer_limits(high=0)
            self.send_size = _UNIX_SEND
        self.reader = reader
        self.writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if self.dismissed:
            # evicted or stopped while the streams were being made
            if self.evicted is not None:
                self.writer.write(self.evicted)
            self.writer.close()

    @property
    def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.reader is not None and self.writer is not None, "used before _open_streams"
        return self.reader, self.writer

    def abandon(self) -> None:
        """The server is stopping and this client has not taken what is left for it: drop that unsent."""
        self.cut_off = True
        if self.writer is not None:
            self.writer.transport.abort()

    def _cut_off(self, counter: str, why: str) -> None:
        """Drop this client, and what is queued for it: it is not reading. ``why`` is its last line."""
        if self.cut_off:
            return
        self.cut_off = True
        self.told_why = True
        self.server.count(counter)
        self.out.clear()
        transport = self._streams[1].transport
        if self.unwritten:
            # the rest of the lines whose first part went out: only whole lines come before why
            transport.write(self.unwritten)
        # after what its socket already holds (whole lines), so that a client that reads again
        # learns why the stream ended; teardown aborts if it does not read within write_timeout
        transport.write(self._error_line(None, ConnectionClosed(why)))
        transport.close()

    # ------------------------------------------------------------------ handshake

    async def _handshake(self) -> bool:
        """The hello and its checks, all within ``hello_timeout``; True once served."""
        server = self.server
        writer = self._streams[1]
        try:
            async with asyncio.timeout_at(self.deadline):
                try:
                    return await self._hello()
                except _Refused as refused:
                    self.refusing = True
                    reply = error_reply(refused.message_id, refused.error, server.max_value)
                    writer.write(encode_message(reply))
                    await writer.drain()
                    return False
        except TimeoutError:
            if self.refusing:
                self.cut_off = True  # it does not even read why it was refused
            elif not self.dismissed:
                server.count("hello_timeouts")
                # one short line; the socket takes it without waiting
                writer.write(server._hello_timeout_line)
            return False
        finally:
            server._handshake_over(self)

    async def _hello(self) -> bool:
        """Read and check the hello: True once admitted, False if the peer left; else :class:`_Refused`."""
        server = self.server
        limit = server.max_hello
        blank = 0  # bytes of blank lines before the hello
        try:
            # left half-read if too long: the connection closes, nothing more is read. A hello
            # without its newline, then the end of what the client sends (printf | nc -N), is
            # still one
            line = await read_line(self._streams[0], limit, discard=False, unterminated=True)
            # blank lines before it are harmless, as after it (an Enter typed into nc first), but
            # count towards its limit: a buffer full of them is read without a pause, and an
            # endless stream of them (a client that never says hello) would hold the engine's loop
            while line is not None and not line.strip() and not self.dismissed:
                blank += len(line) + 1
                if blank >= limit:
                    raise MessageTooLarge(0, limit)  # (no byte of the hello itself yet)
                line = await read_line(self._streams[0], limit - blank, discard=False, unterminated=True)
        except MessageTooLarge as exc:
            server.count(exc.reason)
            raise _Refused(None, _hello_too_large(blank + exc.size, limit, blank)) from None
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
            server.count("incompatible")
            raise _Refused(None, IncompatibleVersion(PROTOCOL_VERSION, msg.version))
        if not server.token_ok(msg.token):
            server.refuse_token(self._peer())
            raise _Refused(None, AuthenticationFailed(token_given=msg.token is not None))
        if not server._admit(self):
            raise _Refused(None, TooManyConnections(server.max_connections))
        if msg.max_message is not None:
            # a client may ask for shorter lines, down to the floor every bounded event fits in
            self.max_send = min(server.max_send, max(msg.max_message, server.min_send))
        return True

    def _peer(self) -> str:
        """Who is connected, for a log line: ``host:port`` over TCP. Nothing the client chose
        (a Unix client's own socket path is, so it is not named)."""
        if self.sock.family == socket.AF_UNIX:
            return "a unix socket client"
        # taken by asyncio when the transport was made: still there once the peer has left
        peer = self._streams[1].get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host, port = peer[0], peer[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return "an unknown peer"

    def evict(self, line: bytes) -> None:
        """Close this connection, still in its handshake, to make room; ``line`` tells it why."""
        if not self.refusing and not self.dismissed:
            self.evicted = line
            if self.writer is not None:
                self.writer.write(line)
        self.dismiss()

    def dismiss(self) -> None:
        """End the handshake: the reader sees the end of the stream."""
        self.dismissed = True
        if self.writer is not None:
            self.writer.close()
        # else _open_streams closes it as soon as it exists

    # ------------------------------------------------------------------ streaming

    async def _serve(self) -> None:
        server = self.server
        engine = server.engine
        try:
            async with server.heavy_turn():
                if server._stopped:
                    return  # stopped while it waited for its turn: it would stream nothing
                # subscribe before the snapshot, with no await between them: every event
                # is either reflected in the snapshot or delivered after it
                self.sub = engine.bus.subscribe(replay=0, maxsize=server.buffer)
                first = server.encode_snapshot(
                    engine.snapshot(server.snapshot_runs), self.max_send - _SNAPSHOT_FRAME
                )
        except ReplyTooLarge as too_large:
            # nothing a dashboard could draw from: say why, rather than send a line it cannot read
            log.warning("cannot send a control client its first snapshot: %s", too_large)
            writer = self._streams[1]
            writer.write(encode_message(error_reply(None, too_large, server.max_value)))
            async with asyncio.timeout(server.write_timeout):
                await writer.drain()
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
        server.stream_to(self)
        tasks = [
            spawn(self._read_loop(), name="taskwatch-control-read"),
            spawn(self._pump(self.sub), name="taskwatch-control-pump"),
            spawn(self._write_loop(), name="taskwatch-control-write"),
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
        """Queue a reply for the writer, once it fits (see :meth:`_drain` for a client that reads nothing)."""
        if self.cut_off:
            return  # the commands still in flight when it was cut off: nobody reads their replies
        await self.out.put_reply(line)

    def _error_line(self, message_id: MessageId | None, exc: BaseException) -> bytes:
        return encode_message(error_reply(message_id, exc, self.server.max_value))

    async def _read_loop(self) -> None:
        server = self.server
        reader = self._streams[0]
        blank = 0  # blank lines skipped
        while True:
            try:
                # a last command without its newline (printf | nc -N) is still answered
                line = await read_line(reader, server.max_message, unterminated=True)
            except MessageTooLarge as exc:
                server.count(exc.reason)
                # named by the id in its first bytes, if it has one there: a client with several
                # commands out learns which one was refused, rather than waiting out its timeout
                await self._reply(self._error_line(peek_id(exc.head) if exc.head else None, exc))
                continue
            except ConnectionError:
                return
            if line is None:
                await self._finish()
                return
            if not line.strip():
                # blank lines are harmless (e.g. typed by hand into nc); but read from a full buffer
                # they come without a pause, and a stream of them would hold the engine's loop
                blank += 1
                if blank % _BLANK_RUN == 0:
                    await asyncio.sleep(0)
                continue
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
            task = spawn(self._command(msg), name=f"taskwatch-control-{msg.type}")
            self.commands.add(task)
            self.asked[task] = (msg.id, msg.type)
            task.add_done_callback(self._command_done)

    async def _finish(self) -> None:
        """The client has sent its last line; it may still be reading (a half-close: ``nc -N``).
        Its commands still executing finish (for up to ``_EOF_GRACE``), then what is queued for
        it, their replies among it, is written before the connection ends. A command still going
        then is given up, and its id gets an error line saying so in place of its reply."""
        if self.commands and not self.cut_off:
            _, late = await asyncio.wait(set(self.commands), timeout=_EOF_GRACE)
            if late and not self.cut_off:
                given_up = [self.asked[task] for task in late if task in self.asked]
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
                self.server.count("replies_given_up", len(given_up))
                for message_id, kind in given_up:
                    why = (
                        f"the client closed its side of the connection and {kind!r} was still going "
                        f"{_EOF_GRACE:g} s later: its reply was given up, and whether it was applied is "
                        "unknown (look it up, e.g. the run it acted on)"
                    )
                    await self._reply(self._error_line(message_id, ConnectionClosed(why)))
        if self.cut_off:
            return
        if not self.ended:
            self.ended = True  # no more events: the stream ends after these replies
            self.out.put_end()
        await self.flushed.wait()

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self.commands.discard(task)
        self.asked.pop(task, None)
        self.inflight.release()

    async def _command(self, cmd: Command) -> None:
        server = self.server
        # made only once the replies before it are queued: a client that asks for more than it
        # reads holds one reply waiting, not one per command in flight
        await self.out.wait_turn()
        if self.cut_off:
            return
        # what the reply adds around its result must fit in the line too
        room = self.max_send - (len(ok_line(cmd.id, b"")) - 1)
        try:
            result = await server.execute(cmd, room, self.heavy)
        except Exception as exc:
            server.count("errors")
            if not isinstance(exc, TaskwatchError):
                log.warning("control command %r failed", cmd, exc_info=True)
            line = self._error_line(cmd.id, for_client(exc))
        else:
            line = ok_line(cmd.id, result)
        await self._reply(line)

    async def _pump(self, sub: Subscription) -> None:
        # woken by the first event after a quiet spell, then at most once per
        # _FAN_OUT_INTERVAL: a busy engine's events go out in batches, one wake-up
        # and one write each, rather than one per event
        out = self.out
        while not self.ended:
            if not await sub.wait():
                if sub.closed:
                    break
                # the writer's forward() took what woke us (it is a second reader of
                # the subscription): nothing ended, wait for the next event
                continue
            if self.ended:
                break  # the client sent its last line: its stream ends after its replies
            self.forward()
            if self.held or not out.has_event_room():
                # the writer forwards the rest as it makes room; meanwhile the
                # subscription fills up and drops for this client alone
                await out.wait_freed()
            # pacing of the batches, not synchronisation
            await asyncio.sleep(_FAN_OUT_INTERVAL)
        # the stream ended (the server is stopping): the rest, then the end mark
        while not self.ended:
            self.forward()
            if not self.ended:
                await out.wait_freed()
        await self.flushed.wait()

    def forward(self) -> None:
        """Move this client's events from its bus subscription to its outbox, as many as fit.

        Called by the pump and by the writer once it has made room. It never
        waits: what does not fit stays in the subscription, which fills up and
        drops events for this client alone, with a notice -- the engine never
        waits for a client. Each event is encoded once for all clients
        (:meth:`ControlServer.event_line`), and a batch is queued with one
        wake-up of the writer.
        """
        sub = self.sub
        if sub is None or self.ended:
            return
        out = self.out
        batch: list[bytes] = []
        size = 0
        held = self.held
        while held:
            line = held[0]
            if not out.fits_event(line, len(batch), size):
                break
            batch.append(held.popleft())
            size += len(line)
        exhausted = False
        if not held:
            # taken only up to the free lines, so what is held stays within the line bound
            room = out.max_lines - len(out.lines) - len(batch)
            if room > 0:
                wanted = min(room, _PUMP_BATCH)
                events = sub.get_batch(wanted)
                exhausted = len(events) < wanted
                for event in events:
                    line = self._event_line(event)
                    if held or not out.fits_event(line, len(batch), size):
                        held.append(line)
                    else:
                        batch.append(line)
                        size += len(line)
        if batch:
            out.put_events(batch, size)
        if sub.closed and exhausted and not held:
            # the stream ended (the server is stopping): the writer writes everything
            # before the end mark, then this connection ends
            self.ended = True
            out.put_end()

    def _event_line(self, event: BaseEvent) -> bytes:
        server = self.server
        line, cut = server.event_line(event)
        if cut:
            server.count("values_truncated", cut)
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
        writer = self._streams[1]
        while True:
            chunks = await out.take(_WRITE_CHUNK)
            size = sum(len(chunk) for chunk in chunks)
            ending = any(chunk is _END for chunk in chunks)
            if ending:
                chunks = [chunk for chunk in chunks if chunk is not _END]
            if writer.transport.is_closing():
                return  # the client left: uvloop raises on a write to a closed transport
            try:
                if not await self._send(writer, chunks[0] if len(chunks) == 1 else b"".join(chunks)):
                    return
            except (ConnectionError, OSError):
                return
            out.written(size)
            if ending:
                self.flushed.set()
                return
            self.forward()  # room was made: events (or a drop notice) waiting for it go now

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write ``data`` and wait until the socket has taken it (see :meth:`_drain`); False
        once the client is cut off.

        To a Unix socket it goes in sends of at most ``send_size`` bytes, each written once
        the kernel holds the one before (the transport writes a send that finds room at once,
        and only a send that did not waits in its buffer), so the kernel holds it in buffers of
        that size, whose frees show a slow reader's progress (see :func:`_kernel_unsent`).
        """
        size = self.send_size
        if size is None or len(data) <= size:
            if data:
                writer.write(data)
            return await self._drain(writer)
        view = memoryview(data)
        transport = writer.transport
        try:
            for start in range(0, len(data), size):
                if transport.is_closing():
                    return False  # the client left meanwhile
                writer.write(view[start : start + size])
                if transport.get_write_buffer_size():
                    self.unwritten = view[start + size :]
                    if not await self._drain(writer):
                        return False
                    self.unwritten = None
        finally:
            self.unwritten = None
        return True

    def _unsent(self, transport: asyncio.WriteTransport) -> int:
        """Bytes written for this client that it has not taken yet (the kernel's share as
        far as the system tells)."""
        return transport.get_write_buffer_size() + _kernel_unsent(self.sock.fileno())

    async def _drain(self, writer: asyncio.StreamWriter) -> bool:
        """Wait until the socket has taken what was written. False once the client is cut off
        for taking no bytes at all for ``write_timeout`` -- or for ``_REPLY_PATIENCE``, if shorter,
        while a reply waits for room: a slow reader is no stalled one."""
        server = self.server
        interval = min(_PROGRESS_CHECK, server.write_timeout / 4)
        loop = asyncio.get_running_loop()
        transport = writer.transport
        last = self._unsent(transport)
        since = loop.time()
        while True:
            try:
                async with asyncio.timeout(interval):
                    await writer.drain()
                return True
            except TimeoutError:
                pass
            now = loop.time()
            unsent = self._unsent(transport)
            if unsent < last:
                since = now  # the client took bytes since the last look (nothing else writes meanwhile)
            last = unsent
            waiting = self.out.waiting
            limit = min(server.write_timeout, _REPLY_PATIENCE) if waiting else server.write_timeout
            if now - since < limit:
                continue
            if waiting:
                log.warning(
                    "dropping a control client with replies unread: they do not fit the %d bytes kept "
                    "for it, and it took no bytes of what was written to it for %g s",
                    server.max_outgoing_bytes, limit,
                )
                self._cut_off(
                    "overflow_disconnects",
                    f"the engine closed this connection: the replies it asked for did not fit the "
                    f"{server.max_outgoing_bytes} bytes the engine keeps for a client, and it read nothing "
                    f"for {limit:g} s. Read replies as they come, or ask for less at a time",
                )
            else:
                log.warning(
                    "dropping a control client that took no bytes of what was written to it for %g s "
                    "(what a client reads shows only as the system frees it: %s, so one reading less "
                    "than that in %g s is taken for stalled)",
                    limit, self._progress_grain(), limit,
                )  # fmt: skip
                self._cut_off(
                    "slow_disconnects",
                    f"the engine closed this connection: it read nothing of what was sent to it for {limit:g} s. "
                    "Read what the engine sends as it comes (events too), or serve with a longer write_timeout",
                )
            return False

    def _progress_grain(self) -> str:
        """In what steps a reading client's progress shows to the engine, in words (see
        :func:`_kernel_unsent`)."""
        if self.send_size is not None:
            return f"over a Unix socket, every {self.send_size // 1024} KiB read"
        return (
            "over TCP, as its receive window reopens, which may take reading most of its receive "
            "buffer (128 KiB by default on loopback) and a few seconds more"
        )

    async def _teardown(self) -> None:
        self.server.stop_streaming(self)
        for task in list(self.commands):
            task.cancel()
        await asyncio.gather(*self.commands, return_exceptions=True)
        if self.sub is not None:
            self.sub.close()
        self.out.clear()
        writer = self.writer
        if writer is None:
            self.sock.close()  # the streams were never made: the peer left at once
            return
        transport = writer.transport
        # a client cut off finds the line saying why after what its socket holds and it has not
        # read: aborted before it reads again, its stream would end mid-line, that line lost. It
        # gets as long to read again as it had before the cut, holding no more than the transport
        # held then; any other client gets _FLUSH_TIMEOUT for the rest of its stream
        patience = max(_FLUSH_TIMEOUT, self.server.write_timeout) if self.told_why else _FLUSH_TIMEOUT
        if self.told_why:
            # served no more (its subscription closed): meanwhile it keeps no client out, its
            # own reconnect say
            self.server._served.discard(self)
        writer.close()
        try:
            async with asyncio.timeout(patience):
                await writer.wait_closed()
        except TimeoutError:
            # a peer that reads nothing would keep what is still buffered for it forever
            transport.abort()
        except Exception:
            pass  # the connection is gone either way
