"""The control protocol's wire format: newline-delimited JSON messages.

Every line is one JSON object with a ``type`` field naming its model. Events
and snapshots travel as the same pydantic models the engine uses in-process,
so nothing here invents a second schema (and nothing is ever pickled).

A connection goes::

    client                          server
    hello {version, token}    ->
                              <-    welcome {version, node_id, server, max_message}
                              <-    snapshot {snapshot}
                              <-    event {event}            (a stream, until close)
    submit/cancel/retry/pause/
    resume/snapshot/ping {id} ->
                              <-    ok {id, result} | error {id, error_type, message, details}

Events with ``seq <= snapshot.last_seq`` are already reflected in the
snapshot and may be dropped. An event of kind ``bus.dropped`` means this
client's buffer overflowed and events were lost: ask for a fresh snapshot.

Decoding is strict and total: :func:`decode_client_message` and
:func:`decode_server_message` return a valid message or raise a
:class:`~taskwatch.engine.errors.ProtocolError` subclass whose ``reason`` is
``malformed``, ``oversized`` or ``unknown`` -- never anything else.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import MalformedMessage, MessageTooLarge, ProtocolError, UnknownCommand
from .events import BaseEvent, Event
from .snapshot import Snapshot
from .version import __version__

#: bumped on any incompatible change to the messages below
PROTOCOL_VERSION = 1

#: default limit for one client->server line (commands are small)
DEFAULT_MAX_MESSAGE = 1 << 20

#: default limit for one server->client line: a snapshot carries hundreds of runs
DEFAULT_CLIENT_MAX_MESSAGE = 64 << 20

#: request ids are chosen by the client and echoed in the reply
MessageId = int | str


class WireMessage(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---------------------------------------------------------------- client -> server


class Hello(WireMessage):
    """The first message on every connection."""

    type: Literal["hello"] = "hello"
    version: int
    token: str | None = None


class Command(WireMessage):
    """A request; the server's ``ok`` or ``error`` reply carries the same ``id``."""

    id: MessageId


class SubmitCommand(Command):
    type: Literal["submit"] = "submit"
    task: str
    params: dict[str, Any] | None = None
    key: str | None = None


class CancelCommand(Command):
    type: Literal["cancel"] = "cancel"
    run_id: str


class RetryCommand(Command):
    type: Literal["retry"] = "retry"
    run_id: str


class PauseCommand(Command):
    type: Literal["pause"] = "pause"
    name: str


class ResumeCommand(Command):
    type: Literal["resume"] = "resume"
    name: str


class SnapshotCommand(Command):
    """Ask for a fresh snapshot, e.g. after a ``bus.dropped`` event.

    ``runs_limit`` caps the runs included (0 for just the schedule, queues,
    triggers, workers, stats and leadership); ``None`` uses the server's default.
    """

    type: Literal["snapshot"] = "snapshot"
    runs_limit: int | None = Field(default=None, ge=0, le=100_000)


class PingCommand(Command):
    type: Literal["ping"] = "ping"


ClientMessage = Annotated[
    Hello
    | SubmitCommand
    | CancelCommand
    | RetryCommand
    | PauseCommand
    | ResumeCommand
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


class SnapshotMessage(WireMessage):
    type: Literal["snapshot"] = "snapshot"
    snapshot: Snapshot


class EventMessage(WireMessage):
    type: Literal["event"] = "event"
    event: Event


class OkReply(WireMessage):
    type: Literal["ok"] = "ok"
    id: MessageId
    #: the command's result as JSON: a RunRecord, PeriodicInfo or Snapshot dict, or null
    result: Any = None


class ErrorReply(WireMessage):
    type: Literal["error"] = "error"
    #: the failed command's id; null when the line had no readable id (or before hello)
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


def encode_event(event: BaseEvent) -> bytes:
    """An ``event`` message, without building an :class:`EventMessage` per event."""
    return b'{"type":"event","event":' + event.model_dump_json().encode() + b"}\n"


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
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(message)"
        parts.append(f"{_clip(loc)}: {_clip(str(err.get('msg', 'invalid')))}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return MalformedMessage("malformed message: " + "; ".join(parts) + more)


def _clip(text: str, limit: int = 120) -> str:
    # error replies echo parts of hostile input; keep them short
    return text if len(text) <= limit else text[: limit - 3] + "..."


def peek_id(line: bytes) -> MessageId | None:
    """Best-effort ``id`` of a line that failed to decode, so the error reply can echo it."""
    try:
        data = pydantic_core.from_json(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    mid = data.get("id")
    if isinstance(mid, bool) or not isinstance(mid, int | str):
        return None
    if isinstance(mid, str) and len(mid) > 200:
        return None
    return mid


async def read_line(reader: asyncio.StreamReader, max_message: int) -> bytes | None:
    """The next line without its newline, or None at end of stream.

    ``reader`` must have been created with ``limit=max_message``. A line longer
    than that is read and thrown away up to its newline (so the stream stays in
    sync and memory stays bounded), then :class:`MessageTooLarge` is raised.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        # a last line without a newline still counts; an empty one is the end
        line = exc.partial
        if not line:
            return None
    except asyncio.LimitOverrunError as exc:
        size = await _discard_line(reader, exc.consumed)
        raise MessageTooLarge(size, max_message) from None
    body = line[:-1] if line.endswith(b"\n") else line
    if len(body) > max_message:
        raise MessageTooLarge(len(body), max_message)
    return body


async def _discard_line(reader: asyncio.StreamReader, consumed: int) -> int:
    """Drop the rest of an oversized line; returns its size in bytes."""
    total = 0
    while True:
        # ``consumed`` bytes are already buffered and hold no newline
        await reader.readexactly(consumed)
        total += consumed
        try:
            rest = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        except asyncio.IncompleteReadError as exc:
            return total + len(exc.partial)
        else:
            return total + len(rest) - 1


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
        parts = urlsplit(address)
        try:
            port = parts.port or 0
        except ValueError:
            raise ValueError(f"bad port in address {address!r}") from None
        if not parts.hostname:
            raise ValueError(f"address {address!r} has no host; use tcp://127.0.0.1:PORT")
        return TcpAddress(parts.hostname, port)
    if address.startswith("unix://"):
        address = address[len("unix://"):]
    elif address.startswith("unix:"):
        address = address[len("unix:"):]
    if not address:
        raise ValueError("empty socket path")
    if "://" in address:
        raise ValueError(f"unsupported address {address!r}; use tcp://HOST:PORT or a socket path")
    return UnixAddress(address)
