"""The control protocol's wire format: newline-delimited JSON messages.

Every line is one JSON object with a ``type`` field naming its model. Events
and snapshots travel as the same pydantic models the engine uses in-process,
so nothing here invents a second schema (and nothing is ever pickled).

A connection goes::

    client                          server
    hello {version, token, max_message} ->
                              <-    welcome {version, node_id, server, max_message, max_send}
                              <-    snapshot {snapshot}
                              <-    event {event}            (a stream, until close)
    submit/cancel/retry/get/pause/
    resume/run_periodic/snapshot/ping {id} ->
    restart_worker/stop_worker/start_worker/
    pause_queue/resume_queue/purge_queue/
    fire_trigger {id} ->
                              <-    ok {id, result} | error {id, error_type, message, details}

Events with ``seq <= snapshot.last_seq`` are already reflected in the
snapshot and may be dropped. An event of kind ``bus.dropped`` means this
client's buffer overflowed and events were lost: ask for a fresh snapshot.

Line limits: the hello line may be at most :data:`DEFAULT_MAX_HELLO` bytes
(4 KiB) by default, later client lines ``welcome.max_message``. No server line
is longer than ``welcome.max_send``, which is the server's own limit or, if
lower, the ``max_message`` the client's hello asked for (never below a floor
the server sets). To keep to it, values too large to send are cut down in
snapshots, events and replies, as :mod:`taskwatch.engine.snapshot` describes;
``get {id, run_id}`` returns a run's full record, or a ``ReplyTooLarge`` error
when even that one record does not fit.

Decoding is strict and total: :func:`decode_client_message` and
:func:`decode_server_message` return a valid message or raise a
:class:`~taskwatch.engine.errors.ProtocolError` subclass whose ``reason`` is
``malformed``, ``oversized`` or ``unknown`` -- never anything else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from .errors import ConnectionClosed, InvalidAddress, MalformedMessage, MessageTooLarge, ProtocolError, UnknownCommand
from .events import BaseEvent, Event
from .index import MAX_LIMIT
from .snapshot import DEFAULT_MAX_VALUE, Snapshot, bounded_json
from .version import __version__

#: bumped on any incompatible change to the messages below
PROTOCOL_VERSION = 1

#: default limit for one client->server line (commands are small)
DEFAULT_MAX_MESSAGE = 1 << 20

#: default limit for one server->client line a client accepts: a snapshot carries hundreds of runs
DEFAULT_CLIENT_MAX_MESSAGE = 64 << 20

#: default limit for one server->client line a server sends (below what clients accept)
DEFAULT_MAX_SEND = 16 << 20

#: default limit for the hello line: it is read before the client has proved anything
DEFAULT_MAX_HELLO = 4096

#: longest request id: ids are echoed in replies, whose size the server keeps bounded
MAX_ID_LENGTH = 200

#: request ids are chosen by the client and echoed in the reply
#: (strict: a ``true`` taken for 1 would be echoed as an id its client never sent)
MessageId = StrictInt | Annotated[StrictStr, Field(max_length=MAX_ID_LENGTH)]


class WireMessage(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---------------------------------------------------------------- client -> server


class Hello(WireMessage):
    """The first message on every connection."""

    type: Literal["hello"] = "hello"
    version: int
    token: str | None = None
    #: longest line this client accepts; the server sends no longer ones (down to its floor)
    max_message: int | None = Field(default=None, ge=1)


class Command(WireMessage):
    """A request; the server's ``ok`` or ``error`` reply carries the same ``id``."""

    id: MessageId


class SubmitCommand(Command):
    type: Literal["submit"] = "submit"
    task: str
    params: dict[str, Any] | None = None
    key: str | None = None


class CancelCommand(Command):
    """Cancel a run. ``grace``: how long to wait for a running run to end before replying, as
    ``Engine.cancel``'s (finite, 0 or more; None: the engine's ``cancel_grace``). A client
    sends what it can wait for: a reply after the engine's own grace may come after the
    client's timeout, and a dashboard would report a cancel that happened as failed.
    """

    type: Literal["cancel"] = "cancel"
    run_id: str
    grace: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)


class RetryCommand(Command):
    type: Literal["retry"] = "retry"
    run_id: str


class GetCommand(Command):
    """A run's full record: what snapshots and events show cut down (see :mod:`.snapshot`)."""

    type: Literal["get"] = "get"
    run_id: str


class PauseCommand(Command):
    type: Literal["pause"] = "pause"
    name: str


class ResumeCommand(Command):
    type: Literal["resume"] = "resume"
    name: str


class RunPeriodicCommand(Command):
    """Queue one run of a periodic task now, off its schedule; the reply is its record."""

    type: Literal["run_periodic"] = "run_periodic"
    name: str


class RestartWorkerCommand(Command):
    type: Literal["restart_worker"] = "restart_worker"
    name: str


class StopWorkerCommand(Command):
    type: Literal["stop_worker"] = "stop_worker"
    name: str


class StartWorkerCommand(Command):
    type: Literal["start_worker"] = "start_worker"
    name: str


class PauseQueueCommand(Command):
    type: Literal["pause_queue"] = "pause_queue"
    name: str


class ResumeQueueCommand(Command):
    type: Literal["resume_queue"] = "resume_queue"
    name: str


class PurgeQueueCommand(Command):
    type: Literal["purge_queue"] = "purge_queue"
    name: str


class FireTriggerCommand(Command):
    type: Literal["fire_trigger"] = "fire_trigger"
    name: str
    key: str


class SnapshotCommand(Command):
    """Ask for a fresh snapshot, e.g. after a ``bus.dropped`` event.

    ``runs_limit`` caps the runs included (0 for just the schedule, queues,
    triggers, workers, stats and leadership); ``None`` uses the server's default.
    Bounded as ``Engine.snapshot()``'s own ``runs_limit`` is, so the same values work
    remotely: a snapshot holds no more runs than the engine's index keeps, and its line
    keeps within ``max_send`` whatever is asked.
    """

    type: Literal["snapshot"] = "snapshot"
    runs_limit: int | None = Field(default=None, ge=0, le=MAX_LIMIT)


class PingCommand(Command):
    type: Literal["ping"] = "ping"


ClientMessage = Annotated[
    Hello
    | SubmitCommand
    | CancelCommand
    | RetryCommand
    | GetCommand
    | PauseCommand
    | ResumeCommand
    | RunPeriodicCommand
    | RestartWorkerCommand
    | StopWorkerCommand
    | StartWorkerCommand
    | PauseQueueCommand
    | ResumeQueueCommand
    | PurgeQueueCommand
    | FireTriggerCommand
    | SnapshotCommand
    | PingCommand,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- server -> client


class Welcome(WireMessage):
    type: Literal["welcome"] = "welcome"
    version: int
    node_id: str
    #: the server's taskwatch version, for display
    server: str = __version__
    #: longest line the server accepts; a client refuses to send longer ones
    max_message: int = DEFAULT_MAX_MESSAGE
    #: longest line the server sends on this connection
    max_send: int = DEFAULT_MAX_SEND


class SnapshotMessage(WireMessage):
    type: Literal["snapshot"] = "snapshot"
    snapshot: Snapshot


class EventMessage(WireMessage):
    type: Literal["event"] = "event"
    event: Event


class OkReply(WireMessage):
    type: Literal["ok"] = "ok"
    id: MessageId
    #: the command's result as JSON: a RunRecord, PeriodicInfo, WorkerInfo, QueueInfo,
    #: QueuePurge, TriggerFire or Snapshot dict, or null.
    #: Records are bounded as in snapshots, except in the reply to ``get``
    result: Any = None


class ErrorReply(WireMessage):
    type: Literal["error"] = "error"
    #: the failed command's id; null when the line had no readable id (or before hello).
    #: A ``ConnectionClosed`` error with a null id is the server's last line: why it ends the
    #: connection; any other with a null id answers a line it could not tell the id of
    id: MessageId | None = None
    #: the TaskwatchError class name, e.g. ``InvalidParams``
    error_type: str
    message: str
    #: the error's attributes, e.g. ``{"task": ..., "errors": [...]}`` for InvalidParams
    details: dict[str, Any] = Field(default_factory=dict)


ServerMessage = Annotated[
    Welcome | SnapshotMessage | EventMessage | OkReply | ErrorReply,
    Field(discriminator="type"),
]

CLIENT_ADAPTER: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
SERVER_ADAPTER: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)

M = TypeVar("M")

# ---------------------------------------------------------------- encoding and decoding


def encode_message(message: WireMessage) -> bytes:
    """One message as a wire line. JSON escapes newlines in strings, so the line is whole."""
    return message.model_dump_json().encode() + b"\n"


def encode_event(event: BaseEvent, max_value: int = DEFAULT_MAX_VALUE) -> bytes:
    """An ``event`` message, its values bounded (see :mod:`.snapshot`), without an :class:`EventMessage`."""
    return event_line(bounded_json(event, max_value)[0])


# the lines below are assembled from JSON already encoded (and bounded) elsewhere


def event_line(event_json: bytes) -> bytes:
    """An ``event`` message around an event's JSON."""
    return b'{"type":"event","event":' + event_json + b"}\n"


def snapshot_line(snapshot_json: bytes) -> bytes:
    """A ``snapshot`` message around a snapshot's JSON (see :func:`.snapshot.encode_snapshot`)."""
    return b'{"type":"snapshot","snapshot":' + snapshot_json + b"}\n"


def ok_line(message_id: MessageId, result_json: bytes) -> bytes:
    """An ``ok`` reply around its result's JSON."""
    return b'{"type":"ok","id":' + pydantic_core.to_json(message_id) + b',"result":' + result_json + b"}\n"


def decode_client_message(line: bytes, max_message: int = DEFAULT_MAX_MESSAGE) -> ClientMessage:
    """Decode one line from a client. Raises :class:`ProtocolError` for anything bad."""
    return _decode(CLIENT_ADAPTER, line, max_message)


def decode_server_message(
    line: bytes, max_message: int = DEFAULT_CLIENT_MAX_MESSAGE
) -> ServerMessage:
    """Decode one line from a server. Raises :class:`ProtocolError` for anything bad."""
    return _decode(SERVER_ADAPTER, line, max_message)


def _decode(adapter: TypeAdapter[M], line: bytes, max_message: int) -> M:
    body = line.rstrip(b"\r\n")
    if len(body) > max_message:
        raise MessageTooLarge(len(body), max_message)
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raise _classify(exc) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"undecodable message: {_clip(str(exc))}") from None


def _classify(exc: ValidationError) -> ProtocolError:
    errors = exc.errors(include_url=False, include_input=False)
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    if first.get("type") == "union_tag_invalid" and not first.get("loc"):
        ctx = first.get("ctx") or {}
        return UnknownCommand(
            f"unknown message type {_clip(str(ctx.get('tag')))!r}; "
            f"expected one of {ctx.get('expected_tags', '')}"
        )
    if first.get("type") == "json_invalid":
        unreadable = _unreadable((first.get("ctx") or {}).get("error"))
        if unreadable is not None:
            return MalformedMessage(unreadable)
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(message)"
        parts.append(f"{_clip(loc)}: {_clip(str(err.get('msg', 'invalid')))}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return MalformedMessage("malformed message: " + "; ".join(parts) + more)


#: what pydantic_core's JSON reader takes, and refuses beyond: nesting, and an integer's digits
JSON_MAX_DEPTH = 200
JSON_MAX_INT_DIGITS = 4300

_READER_AT = re.compile(r"at line (\d+) column (\d+)$")


def _unreadable(error: object) -> str | None:
    """Words for a line the JSON reader stopped at because of one of its own limits (the
    line may be valid JSON), or None for another reason: its own message says that well."""
    if not isinstance(error, str):
        return None
    at = _READER_AT.search(error)
    where = f" (it stopped at column {at.group(2)})" if at and at.group(1) == "1" else ""
    if error.startswith("recursion limit exceeded"):
        return (
            f"unreadable message: its JSON nests arrays and objects more than {JSON_MAX_DEPTH} levels "
            f"deep, more than the JSON reader takes{where}, so nothing in it was read (values must "
            "be nested less deeply)"
        )
    if "surrogate" in error or error.startswith("unexpected end of hex escape"):
        # what json.dumps writes for text that is no Unicode (a file name os.fsdecode read, say)
        return (
            f"unreadable message: a string in it holds a \\u escape of half a UTF-16 surrogate pair{where}, "
            "which is no character: no text can carry it (send such text as valid Unicode, e.g. with "
            "its undecodable bytes replaced, or as base64)"
        )
    if error.startswith("number out of range"):
        return (
            f"unreadable message: it holds an integer of more than {JSON_MAX_INT_DIGITS} digits, more "
            f"than the JSON reader takes{where}, so nothing in it was read (so long a number must "
            "travel as a string)"
        )
    return None


def _clip(text: str, limit: int = 120) -> str:
    # error replies echo parts of hostile input; keep them short
    return text if len(text) <= limit else text[: limit - 3] + "..."


def peek_id(line: bytes) -> MessageId | None:
    """Best-effort ``id`` of a line that failed to decode, so the error reply can echo it.

    The line's head is first scanned for a top-level ``"id"`` member, without
    parsing the line: one the JSON reader refuses (nested deeper than it takes, an
    integer longer than it reads) still names its command, so its sender learns at
    once which command was refused, rather than waiting out its timeout.
    ``RemoteEngine`` writes ``id`` first, so its lines are answered from their first
    bytes. The scan is bounded (:data:`_SCAN_BYTES` of the line, :data:`_SCAN_STEPS`
    steps); where it cannot tell, a full parse decides, as for any well-formed line.
    """
    found = _scan_id(line[:_SCAN_BYTES])
    if found is not _UNKNOWN:
        return found
    try:
        data = pydantic_core.from_json(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return _usable_id(data.get("id"))


def _usable_id(mid: object) -> MessageId | None:
    """``mid`` if a reply can echo it as the id a command carried, else None."""
    if isinstance(mid, bool) or not isinstance(mid, int | str):
        return None
    if isinstance(mid, str):
        if len(mid) > MAX_ID_LENGTH:
            return None
        try:
            mid.encode()
        except UnicodeEncodeError:  # a lone surrogate: no reply could carry it
            return None
    return mid


#: what :func:`_scan_id` returns when it cannot tell (a full parse decides then)
_UNKNOWN: Any = object()

#: how much of a line :func:`peek_id` scans: a command's id comes before any bulky value, or
#: the line is parsed whole. Regex matching runs at some ms a MiB: this keeps it well under one
_SCAN_BYTES = 64 << 10

#: members, and strings and brackets inside values before ``id``, that the scan steps over at
#: most (one regex match each): a line of nothing else costs a few ms at worst
_SCAN_STEPS = 2048

_WS = rb"[ \t\r\n]*+"
#: a JSON string, escapes and all (possessive: matching it never backtracks)
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_OPEN = re.compile(_WS + rb"\{")
_CLOSE = re.compile(_WS + rb"\}")
_KEY = re.compile(_WS + rb"(" + _STRING + rb")" + _WS + rb":" + _WS, re.DOTALL)
_STRING_AT = re.compile(_STRING, re.DOTALL)
#: a scalar value other than a string, as far as telling where it ends goes
_BARE = re.compile(rb"[-+0-9A-Za-z.]++")
_INT = re.compile(rb"-?+(?:0|[1-9][0-9]*+)")
_NEXT = re.compile(_WS + rb"([,}])")
_STRUCTURE = re.compile(rb'[\[\]{}"]')


def _scan_id(head: bytes) -> Any:
    """The id of the object ``head`` begins (None: it has none, or one no reply can echo),
    or :data:`_UNKNOWN` when that is not in ``head`` or not plain enough to tell."""
    start = _OPEN.match(head)
    if start is None:
        return _UNKNOWN
    pos = start.end()
    if _CLOSE.match(head, pos) is not None:
        return None  # {}
    steps = _SCAN_STEPS
    while steps > 0:
        steps -= 1
        key = _KEY.match(head, pos)
        if key is None:
            return _UNKNOWN
        pos = key.end()
        if _is_id(key.group(1)):
            return _id_at(head, pos)
        pos, steps = _skip_value(head, pos, steps)
        after = _NEXT.match(head, pos) if pos >= 0 else None
        if after is None:
            return _UNKNOWN
        if after.group(1) == b"}":
            return None  # the whole object, and no id in it
        pos = after.end()
    return _UNKNOWN


def _is_id(key: bytes) -> bool:
    if key == b'"id"':
        return True
    # "\u0069d" is "id" too; an escaped key longer than this cannot be
    if b"\\" not in key or len(key) > 16:
        return False
    try:
        return bool(json.loads(key) == "id")
    except ValueError:
        return False


def _id_at(head: bytes, pos: int) -> Any:
    """The id whose value starts at ``pos``: an int or a string, as a command's is."""
    if head[pos : pos + 1] == b'"':
        token = _STRING_AT.match(head, pos)
        if token is None:
            return _UNKNOWN
        try:
            return _usable_id(json.loads(token.group()))
        except ValueError:
            return _UNKNOWN
    token = _INT.match(head, pos)
    if token is None or _NEXT.match(head, token.end()) is None:
        return _UNKNOWN  # not an int (a float, an object...), or cut at the end of the head
    return int(token.group()) if token.end() - pos <= MAX_ID_LENGTH else None


def _skip_value(head: bytes, pos: int, steps: int) -> tuple[int, int]:
    """Where the value at ``pos`` ends (-1: not found), and the steps left."""
    first = head[pos : pos + 1]
    if first == b'"':
        token = _STRING_AT.match(head, pos)
        return (-1 if token is None else token.end()), steps
    if first not in (b"[", b"{"):
        token = _BARE.match(head, pos)
        return (-1 if token is None else token.end()), steps
    # an array or object: count brackets, stepping over strings (which may hold brackets)
    depth = 0
    while steps > 0:
        steps -= 1
        mark = _STRUCTURE.search(head, pos)
        if mark is None:
            return -1, steps
        char = head[mark.start()]
        if char == 0x22:  # '"'
            token = _STRING_AT.match(head, mark.start())
            if token is None:
                return -1, steps
            pos = token.end()
            continue
        pos = mark.end()
        depth += 1 if char in b"[{" else -1
        if depth == 0:
            return pos, steps
    return -1, steps


async def read_line(
    reader: asyncio.StreamReader, max_message: int, *, discard: bool = True, unterminated: bool = False
) -> bytes | None:
    """The next line without its newline, or None at end of stream.

    A line longer than ``max_message`` raises :class:`MessageTooLarge`. With
    ``discard`` it is first read and thrown away up to its newline (so the
    stream stays in sync and memory stays bounded); without, it is left
    half-read, as soon as the excess arrives (for a caller that closes the
    connection then). ``reader``'s own ``limit`` may be lower than
    ``max_message``: a longer line is then gathered in pieces of that size.

    A stream that ends in the middle of a line raises :class:`ConnectionClosed`:
    the peer went away (or was cut off) mid-message, and the bytes that came are
    no message. With ``unterminated`` such a last line is returned instead, for a
    server whose client sends its last line without a newline and then the end of
    what it sends (``printf '...' | nc -N``).
    """
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            piece = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            piece = exc.partial
            if not piece and not parts:
                return None
            if not unterminated:
                raise ConnectionClosed(
                    f"the connection ended in the middle of a message: {size + len(piece)} bytes of a "
                    "line came, then the end of the stream, without the line's newline"
                ) from None
        except asyncio.LimitOverrunError as exc:
            if size + exc.consumed > max_message:
                # its head is kept for the refusal to name the command's id (see peek_id)
                head = b"".join(parts)[:_SCAN_BYTES]
                if not discard:
                    raise MessageTooLarge(size + exc.consumed, max_message, head=head) from None
                rest, first = await _discard_line(reader, exc.consumed)
                if len(head) < _SCAN_BYTES:
                    head = (head + first)[:_SCAN_BYTES]
                raise MessageTooLarge(size + rest, max_message, head=head) from None
            # ``consumed`` bytes are buffered and hold no newline
            parts.append(await reader.readexactly(exc.consumed))
            size += exc.consumed
            continue
        break
    line = b"".join((*parts, piece)) if parts else piece
    body = line[:-1] if line.endswith(b"\n") else line
    if len(body) > max_message:
        raise MessageTooLarge(len(body), max_message, head=body[:_SCAN_BYTES])
    return body


async def _discard_line(reader: asyncio.StreamReader, consumed: int) -> tuple[int, bytes]:
    """Drop the rest of an oversized line; returns its size in bytes and its first piece."""
    total = 0
    first = b""
    while True:
        # ``consumed`` bytes are already buffered and hold no newline
        piece = await reader.readexactly(consumed)
        if not total:
            first = piece[:_SCAN_BYTES]
        total += consumed
        try:
            rest = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        except asyncio.IncompleteReadError as exc:
            return total + len(exc.partial), first
        else:
            return total + len(rest) - 1, first


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


Address = UnixAddress | TcpAddress


def parse_address(address: str) -> Address:
    """``tcp://HOST:PORT``, ``unix:PATH`` / ``unix://PATH``, or a plain socket path."""
    if address.startswith("tcp://"):
        try:
            parts = urlsplit(address)
        except ValueError:  # an unbalanced "[" around an IPv6 host
            raise InvalidAddress(address, "its host is not a valid IPv6 address in brackets") from None
        # a token written into the address (tcp://:TOKEN@host:port) would be shown wherever
        # the address is -- repr, errors, the dashboard's header -- so none of this is echoed
        hostport = parts.netloc.rpartition("@")[2]
        if "@" in parts.netloc:
            raise InvalidAddress(
                f"tcp://***@{hostport}",
                "a tcp:// address carries no user part (what is before '@', shown here as ***): "
                "the address is shown in messages and dashboards, a token in it would be too",
                "write tcp://HOST:PORT and give the token apart: token= (RemoteEngine, engine.serve), "
                "or --token-file or $TASKWATCH_TOKEN (taskwatch attach)",
            )
        if address[len("tcp://") + len(parts.netloc):]:
            raise InvalidAddress(
                f"tcp://{hostport}/…",
                "a tcp:// address has nothing after its port (no path, '?' query or '#' fragment; "
                "shown here as …)",
                f"write it as tcp://{hostport} and give the token apart (token=, --token-file or $TASKWATCH_TOKEN)",
            )
        try:
            port = parts.port or 0
        except ValueError:
            raise InvalidAddress(address, "its port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise InvalidAddress(address, "it names no host")
        return TcpAddress(parts.hostname, port)
    path = address
    if path.startswith("unix://"):
        path = path[len("unix://"):]
    elif path.startswith("unix:"):
        path = path[len("unix:"):]
    if not path:
        raise InvalidAddress(address, "the socket path is empty")
    if "://" in path:
        raise InvalidAddress(address, "only tcp:// and unix: addresses are supported")
    return UnixAddress(path)


def parse_connect_address(address: str) -> Address:
    """:func:`parse_address` for an address to connect to: a ``tcp://`` one must name its port.

    Port 0 (or none) means "pick a free port" when serving; there is nothing to
    connect to there, and a client would only retry forever.
    """
    target = parse_address(address)
    if isinstance(target, TcpAddress) and target.port == 0:
        host = f"[{target.host}]" if ":" in target.host else target.host
        raise InvalidAddress(
            address,
            "it names no port to connect to (port 0 only picks a free port when serving)",
            f"give the port the engine serves on: tcp://{host}:PORT",
        )
    return target
