"""The snapshot model: an engine's whole visible state at one moment, and how it is bounded on the wire.

Bounded values
--------------
What a control server sends -- snapshots, events, command replies -- must fit
in a line its client accepts, whatever a task was given or returned. So every
value whose JSON encoding is longer than ``max_value`` bytes (16 KiB by
default, :data:`DEFAULT_MAX_VALUE`) is cut down on the way out by
:func:`bounded_json`:

* a free-form value -- a run's ``params`` or ``result``, a queue ``job`` -- is
  replaced whole by a marker object::

      {"__truncated__": true, "bytes": 1048590, "preview": "{\\"data\\":\\"xxxx..."}

  ``bytes`` is the size of the value's JSON encoding and ``preview`` its first
  200 characters. A marker is a JSON object, so it is still a valid ``params``
  dict or ``result``.
* a string field -- an error's ``message`` or ``traceback``, a progress
  message, a key -- stays a string: its head and tail are kept around a line
  ``[... N characters truncated ...]`` (the end of a traceback is the part
  that names the error).

:func:`is_truncated` recognises both, for a dashboard to say so. Nothing is
lost: the ``get`` command (:meth:`RemoteEngine.get
<taskwatch.engine.remote.RemoteEngine.get>`) returns a run's full record.

A snapshot is also bounded as a whole, by :func:`encode_snapshot`: with its
values cut, if it is still longer than the line limit, the oldest finished
runs are left out of ``runs`` (then pending, then running ones, should even
that not be enough), and ``runs_omitted`` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict

from .errors import ReplyTooLarge
from .jsonsafe import TEXT_CUT, TEXT_CUT_RE
from .lease import Leadership
from .queues import QueueInfo
from .runs import EngineStats, RunRecord, RunStatus
from .scheduler import PeriodicInfo
from .supervisor import WorkerInfo
from .tasks import TaskInfo
from .triggers import TriggerState

#: default bound, in bytes of JSON, on one value in what a control server sends
DEFAULT_MAX_VALUE = 16 << 10

#: the key of a marker object standing in for a value too large to send
TRUNCATED = "__truncated__"

#: characters of a value's JSON kept in its marker's ``preview``
PREVIEW_CHARS = 200

#: fields holding free-form JSON: replaced whole by a marker, never cut inside
_FREE_FORM = frozenset({"params", "result", "job"})


#: room for what encode_snapshot adds around the runs: {"runs":[...],"runs_omitted":N,
_SNAPSHOT_FRAME = 64


class Snapshot(BaseModel):
    """What a dashboard needs to draw itself; events after ``last_seq`` bring it up to date."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    version: str
    state: str
    started_at: float | None
    runs: list[RunRecord]
    tasks: list[TaskInfo]
    schedule: list[PeriodicInfo]
    queues: list[QueueInfo]
    triggers: list[TriggerState]
    workers: list[WorkerInfo]
    stats: EngineStats
    leadership: Leadership
    last_seq: int
    #: where the runs live (``memory``, ``sqlite:/path``) and this process start's incarnation
    store: str = "memory"
    incarnation: str = ""
    #: runs left out of ``runs`` to keep the snapshot within its connection's line limit
    runs_omitted: int = 0


# ---------------------------------------------------------------- bounding values


def truncate_value(value: Any, max_value: int) -> Any:
    """A JSON-able ``value`` as it is if its JSON fits in ``max_value`` bytes, else its marker."""
    encoded = pydantic_core.to_json(value)
    return value if len(encoded) <= max_value else _marker(encoded)


def truncate_text(text: str, max_value: int) -> str:
    """``text`` as it is if its JSON fits in ``max_value`` bytes, else its head and tail around a mark."""
    if len(text) * 6 <= max_value:
        return text  # even if every character needed a \\u escape
    size = len(pydantic_core.to_json(text))
    if size <= max_value:
        return text
    keep = min(max_value // 4, len(text) // 3)
    while True:
        clipped = text[:keep] + TEXT_CUT.format(len(text) - 2 * keep) + text[len(text) - keep :]
        # escapes can make the kept part longer than its character count: halve until it fits
        if keep == 0 or len(pydantic_core.to_json(clipped)) <= max_value:
            return clipped
        keep //= 2


def is_truncated(value: Any) -> bool:
    """True for a marker object or a cut string, as :func:`bounded_json` makes them."""
    if isinstance(value, dict):
        return value.get(TRUNCATED) is True
    return isinstance(value, str) and TEXT_CUT_RE.search(value) is not None


def _marker(encoded: bytes) -> dict[str, Any]:
    # 4 bytes per character at most in UTF-8; a split character at the end is dropped
    preview = encoded[: PREVIEW_CHARS * 4].decode("utf-8", "ignore")[:PREVIEW_CHARS]
    return {TRUNCATED: True, "bytes": len(encoded), "preview": preview}


class _Bounder:
    """Cuts the values of one model's JSON data; counts how many it cut."""

    def __init__(self, max_value: int) -> None:
        self.max_value = max_value
        self.cut = 0

    def fields(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: self.whole(value) if key in _FREE_FORM else self.strings(value)
            for key, value in data.items()
        }

    def whole(self, value: Any) -> Any:
        bounded = truncate_value(value, self.max_value)
        self.cut += bounded is not value
        return bounded

    def strings(self, value: Any) -> Any:
        # only strings are cut below the top level: a marker object there could break
        # the type of a field (a str, a list of models); a long string keeps its type
        if isinstance(value, str):
            bounded = truncate_text(value, self.max_value)
            self.cut += bounded is not value
            return bounded
        if isinstance(value, dict):
            return {key: self.strings(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.strings(item) for item in value]
        return value


def bounded_json(
    model: BaseModel, max_value: int = DEFAULT_MAX_VALUE, *, exclude: set[str] | None = None
) -> tuple[bytes, int]:
    """``model`` as JSON with every value over ``max_value`` bytes cut down, and how many were cut.

    The one helper for everything a control server sends: run records, events,
    snapshots (see the module docstring for what a cut value looks like).
    """
    raw = model.model_dump_json(exclude=exclude).encode()
    if len(raw) <= max_value:
        return raw, 0  # no value inside can be longer than the whole
    bounder = _Bounder(max_value)
    data = bounder.fields(model.model_dump(mode="json", exclude=exclude))
    if not bounder.cut:
        return raw, 0
    return pydantic_core.to_json(data), bounder.cut


# ---------------------------------------------------------------- bounding a snapshot


class RunJsonCache:
    """The bounded JSON of finished runs, which no longer change, up to ``max_bytes`` in all,
    and no more runs than twice the largest snapshot listed so far.

    A snapshot lists hundreds of runs, most of them finished; with this cache
    only new and changed runs are encoded again. That matters when their values
    are megabytes, serialised only to be cut down. Runs no snapshot lists any
    more (gone from the engine's history) are let go once the cache holds twice
    what one lists, oldest first, rather than kept until ``max_bytes``.
    """

    def __init__(self, max_value: int, max_bytes: int) -> None:
        self.max_value = max_value
        self.max_bytes = max_bytes
        self.size = 0
        #: the most runs one snapshot listed: the cache keeps twice that at most
        self.listed_max = 0
        # run id -> (what identifies the finished record, its JSON, values cut); oldest first
        self._entries: dict[str, tuple[tuple[str, float | None, int], bytes, int]] = {}

    def encode(self, run: RunRecord) -> tuple[bytes, int]:
        """``bounded_json(run)``, from the cache when the run had already finished."""
        if not run.status.finished:
            return bounded_json(run, self.max_value)
        key = (run.status.value, run.finished_at, run.attempt)
        hit = self._entries.get(run.id)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        data, cut = bounded_json(run, self.max_value)
        self._forget(run.id)
        self._entries[run.id] = (key, data, cut)
        self.size += len(data)
        while self.size > self.max_bytes and self._entries:
            self._forget(next(iter(self._entries)))
        return data, cut

    def listed(self, runs: int) -> None:
        """A snapshot listed ``runs`` runs: the oldest entries past twice the most ever listed go."""
        self.listed_max = max(self.listed_max, runs)
        while len(self._entries) > 2 * self.listed_max:
            self._forget(next(iter(self._entries)))

    def _forget(self, run_id: str) -> None:
        entry = self._entries.pop(run_id, None)
        if entry is not None:
            self.size -= len(entry[1])

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class EncodedSnapshot:
    """A snapshot as JSON within a byte limit, and what was cut to get there."""

    json: bytes
    #: values replaced by markers or cut, in the runs sent and the rest
    truncated: int
    #: runs left out of the listing (also in the JSON, as ``runs_omitted``)
    omitted: int


def encode_snapshot(
    snapshot: Snapshot,
    limit: int,
    max_value: int = DEFAULT_MAX_VALUE,
    cache: RunJsonCache | None = None,
) -> EncodedSnapshot:
    """``snapshot`` as JSON of at most ``limit`` bytes: values bounded, then runs left out if need be.

    ``cache`` (of the same ``max_value``) keeps finished runs' JSON between
    snapshots. Raises :class:`ReplyTooLarge` if even without any run the
    snapshot is longer (a schedule or trigger listing that large; nothing a
    client could read).
    """
    rest, truncated = bounded_json(snapshot, max_value, exclude={"runs", "runs_omitted"})
    if cache is not None and cache.max_value != max_value:
        raise ValueError("the cache holds runs bounded to another max_value")
    encode = cache.encode if cache is not None else lambda run: bounded_json(run, max_value)
    runs = [encode(run) for run in snapshot.runs]
    if cache is not None:
        cache.listed(len(runs))
    # assembled here, so that each run's size is known and leaving one out is arithmetic;
    # one comma per run is counted, so the estimate is never short
    size = len(rest) + _SNAPSHOT_FRAME + sum(len(body) + 1 for body, _ in runs)
    left_out: set[int] = set()
    if size > limit:
        for index in sorted(range(len(runs)), key=lambda i: _omit_order(snapshot.runs[i])):
            if size <= limit:
                break
            left_out.add(index)
            size -= len(runs[index][0]) + 1
    if size > limit:
        raise ReplyTooLarge("the snapshot, even without any runs,", size, limit)
    kept = [run for index, run in enumerate(runs) if index not in left_out]
    body = b"".join(
        (
            b'{"runs":[',
            b",".join(run_json for run_json, _ in kept),
            b'],"runs_omitted":',
            str(len(left_out)).encode(),
            b",",
            rest[1:],  # the rest's own fields, after its opening brace
        )
    )
    return EncodedSnapshot(body, truncated + sum(cut for _, cut in kept), len(left_out))


def _omit_order(run: RunRecord) -> tuple[int, float]:
    # finished runs go first, oldest first; what a dashboard can still act on goes last
    rank = 0 if run.status.finished else 1 if run.status is RunStatus.PENDING else 2
    return rank, run.created_at
