"""The debug-event bus: typed events fanned out to bounded subscribers.

Publishing never waits: each subscriber owns a bounded buffer, and events
that do not fit are dropped *for that subscriber alone* and counted. The
subscriber reads the count (``Subscription.dropped``) and is also handed an
:class:`~taskwatch.engine.events.EventsDropped` event exactly where the gap is:
after the events it did get before the gap, with the ``seq`` of the first
event it missed. A ring buffer keeps the last events so late subscribers can
replay recent history.

The engine's own per-run events are *posted* rather than emitted: the bus
keeps their class and fields and builds the pydantic event only when someone
reads it, once, whoever reads first, putting it together from the engine's
own values without validating them again (see :mod:`.trusted`). Publishing a
run event so costs well under a microsecond, and nothing at all is built for
events no one reads; a reader sees the same typed events either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, overload

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from .errors import InvalidConfiguration, LoopThreadError, UnknownEventKind
from .events import EVENT_KINDS, BaseEvent, Event, EventsDropped
from .jsonsafe import NotJsonSafe, jsonable, utf8_text
from .options import SubscribeOptions, check_options
from .trusted import FAST, new, set_dict, set_extra, set_fields_set, set_private

log = logging.getLogger("taskwatch.bus")

E = TypeVar("E", bound=BaseEvent)

DEFAULT_BUFFER = 10_000
#: what a kinds filter may name
_KINDS = frozenset(EVENT_KINDS)
DEFAULT_REPLAY = 1_000


def _checked_kinds(kinds: Iterable[str] | None) -> list[str]:
    """``kinds`` as a list, each an event kind or a prefix of some ending in ``.``: a filter
    that can match nothing would deliver nothing, silently."""
    if kinds is None:
        return []
    if isinstance(kinds, (str, bytes)):
        raise UnknownEventKind(kinds, f"kinds takes a list of kinds, not the one string {kinds!r}: pass [{kinds!r}]")
    try:
        out = list(kinds)
    except TypeError:
        raise UnknownEventKind(
            kinds, f"kinds takes a list of kinds (or None for all), not {type(kinds).__qualname__} {kinds!r}"
        ) from None
    if not out:
        # (it used to mean every event, the opposite of what it says)
        raise UnknownEventKind(kinds, f"kinds={kinds!r} names no kind and would deliver nothing: pass None for every event")
    for kind in out:
        if not isinstance(kind, str):
            raise UnknownEventKind(kind, f"kinds holds {kind!r}, which is no kind")
        if kind in _KINDS or (kind.endswith(".") and any(k.startswith(kind) for k in _KINDS)):
            continue
        stem = kind.rstrip("*")
        if stem != kind and (stem in _KINDS or any(k.startswith(stem) for k in _KINDS)):
            near: list[str] = [stem]
        elif any(k.startswith(kind + ".") for k in _KINDS):
            near = [kind + "."]
        else:
            near = difflib.get_close_matches(kind, _KINDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownEventKind(kind, f"no event has kind {kind!r}{hint}")
    return out


def _check_limit(where: str, limit: int | None) -> None:
    """:class:`InvalidConfiguration` for a count of events to take that is not an int >= 0 or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidConfiguration(where, [f"limit={limit!r}: a whole number >= 0, or None for all"])


class KindFilter:
    """Matches event kinds exactly, or by prefix when a pattern ends with ``.``."""

    __slots__ = ("_exact", "_prefixes", "answers", "matches_all")

    def __init__(self, kinds: Iterable[str] | None, *, always: Iterable[str] = ()) -> None:
        kinds = _checked_kinds(kinds)
        self._exact = frozenset(k for k in kinds if not k.endswith("."))
        self._prefixes = tuple(k for k in kinds if k.endswith("."))
        #: kind -> whether it matches, filled in as kinds are seen (hot callers look here first);
        #: ``always`` are kinds matched whatever ``kinds`` say
        self.answers: dict[str, bool] = dict.fromkeys(always, True)
        self.matches_all = not kinds

    def __call__(self, kind: str) -> bool:
        if self.matches_all:
            return True
        hit = self.answers.get(kind)
        if hit is None:
            hit = kind in self._exact or kind.startswith(self._prefixes)
            self.answers[kind] = hit
        return hit


#: the class every reader of the wire (a dashboard, a RemoteEngine, a relay) decodes each kind as
_CLASS_OF_KIND: dict[str, type[BaseEvent]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(Event)[0])
}
#: the fields the bus stamps itself
_STAMPED = frozenset({"seq", "ts", "node"})


def _wire_kind(cls: object, where: str) -> str:
    """The kind of event class ``cls``; InvalidConfiguration unless readers decode it as one."""
    if not (isinstance(cls, type) and issubclass(cls, BaseEvent)):
        raise InvalidConfiguration(
            where,
            [
                f"{cls!r} is no event class; pass one such as RunProgressed (from "
                "taskwatch.engine.events); nothing was published"
            ],
        )
    field = cls.model_fields.get("kind")
    kind = field.default if field is not None else None
    known = _CLASS_OF_KIND.get(kind) if isinstance(kind, str) else None
    if isinstance(kind, str) and known is not None and issubclass(cls, known):
        return kind
    # a reader decodes events as the Event union: it would refuse this one and drop its
    # connection, which would leave every dashboard attached to the engine blind
    if known is not None:
        what = f"has the kind {kind!r} of {known.__name__} without being a {known.__name__}"
    elif field is None:
        what = "has no kind"
    else:
        what = f"has kind {kind!r}, which is not one of the engine's event kinds (EVENT_KINDS)"
    raise InvalidConfiguration(
        where,
        [
            f"{cls.__qualname__} {what}: every dashboard and client attached to the engine reads "
            "its events as the engine's own classes and would drop its connection on this one; "
            "publish one of those (from taskwatch.engine.events), or keep events of your own on "
            "an EventBus() of your own, which no server streams; nothing was published"
        ],
    )


def _finite_only(meta: object) -> bool:
    if getattr(meta, "allow_inf_nan", None) is False:
        return True
    return isinstance(meta, FieldInfo) and any(_finite_only(m) for m in meta.metadata)


def _admits(annotation: Any, metadata: Sequence[Any], of: type) -> bool:
    """Whether a field so declared holds plain ``of`` values; for ``float``, ones that may be
    NaN or infinite (not declared finite)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _admits(base, [*metadata, *extra], of)
    if origin is Union or origin is UnionType:
        return any(_admits(arm, metadata, of) for arm in get_args(annotation))
    if annotation is not of:
        return False
    return of is not float or not any(_finite_only(m) for m in metadata)


def _scalar(annotation: Any) -> bool:
    """Whether a field so declared holds only a str, a number, a bool, a literal or None:
    nothing nested, in which a value JSON cannot carry could hide."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return all(_scalar(arm) for arm in get_args(annotation))
    return origin is Literal or annotation in (str, int, float, bool, type(None))


class EventShape:
    """What building a posted event of one class needs: the class, its ``kind``, and the
    fields a poster gives when it gives every one but ``kind`` (their number and names);
    and what :meth:`EventBus.emit` checks of values from user code: its ``texts`` (fields
    holding a str), ``numbers`` (floats that may be NaN or infinite) and ``nested``
    (fields that may hold dicts, lists or models: a result, a job, params, an error)."""

    __slots__ = ("cls", "kind", "size", "given", "texts", "numbers", "nested")

    def __init__(self, cls: type[BaseEvent], where: str = "bus.emit()") -> None:
        self.kind: str = _wire_kind(cls, where)
        self.cls = cls
        self.given = {name for name in cls.model_fields if name != "kind"}
        self.size = len(self.given)
        fields = [(name, f) for name, f in cls.model_fields.items() if name not in _STAMPED]
        self.texts = tuple(name for name, f in fields if _admits(f.annotation, f.metadata, str))
        self.numbers = tuple(name for name, f in fields if _admits(f.annotation, f.metadata, float))
        self.nested = tuple(name for name, f in fields if not _scalar(f.annotation))


_SHAPES: dict[type[BaseEvent], EventShape] = {}
_new_posted = object.__new__


def shape_of(cls: type[BaseEvent], where: str = "bus.emit()") -> EventShape:
    """The :class:`EventShape` of ``cls``, made once; InvalidConfiguration for a class no
    reader of the engine's events could decode (``where`` names the call)."""
    try:
        shape = _SHAPES.get(cls)
    except TypeError:  # unhashable: no class at all, which EventShape refuses
        shape = None
    if shape is None:
        shape = EventShape(cls, where)
        _SHAPES[cls] = shape
    return shape


class Posted:
    """A published event not built yet: its shape, its fields and its stamps; :meth:`get`
    builds it once.

    The stamps (``seq``, ``ts``, ``node``) sit beside the fields, not in them, until the
    event is built: adding three keys to the poster's kwargs dict grows it, a fifth of
    what publishing costs, and most posted events are never built.
    """

    __slots__ = ("shape", "fields", "seq", "ts", "node", "_event")

    shape: EventShape
    fields: dict[str, Any] | None
    seq: int
    ts: float
    node: str
    _event: BaseEvent | None

    def __init__(self, shape: EventShape, fields: dict[str, Any], seq: int, ts: float, node: str) -> None:
        self.shape = shape
        self.fields = fields
        self.seq = seq
        self.ts = ts
        self.node = node
        self._event = None

    @property
    def kind(self) -> str:
        return self.shape.kind

    def get(self) -> Event:
        """The event, built now by the first reader.

        Posted fields come from the engine itself, already of their declared
        types, so an event given every field is put together as
        :func:`~taskwatch.engine.trusted.construct` does, its fields dict
        becoming the event's, without validating each field again (a third of
        a run's cost once a dashboard reads every event). One given fewer
        fields is validated, defaults filled in.
        """
        # fields first: a reader on another thread (a dashboard's) may build this event at
        # the same time, and sets _event before it drops fields; so fields gone means the
        # event is there (two builders in a dead heat each build an equal event, both fine)
        fields = self.fields
        event = self._event
        if event is None:
            if fields is None:
                return self._event  # type: ignore[return-value]
            shape = self.shape
            # in place, as "kind" below: two builders in a dead heat write the same values
            fields["seq"] = self.seq
            fields["ts"] = self.ts
            fields["node"] = self.node
            if len(fields) == shape.size and FAST:
                # construct(), inline: three of these per run
                fields["kind"] = shape.kind
                event = new(shape.cls)
                set_dict(event, fields)
                set_fields_set(event, shape.given)
                set_extra(event, None)
                set_private(event, None)
            else:
                event = shape.cls.__pydantic_validator__.validate_python(fields)
            self._event = event
            self.fields = None
        return event  # type: ignore[return-value]


def _check_finite(event: BaseEvent, shape: EventShape, where: str) -> None:
    """Refuse an event holding a NaN or infinite float (InvalidConfiguration): JSON has
    neither, so a reader would get null where it needs a number and drop its connection."""
    values = event.__dict__
    for name in shape.numbers:
        value = values[name]
        # NaN - NaN and inf - inf are NaN, which is true; any finite x - x is 0.0
        if type(value) is float and value - value:
            raise InvalidConfiguration(
                where,
                [
                    f"{shape.cls.__qualname__}.{name}={value!r}: JSON has no NaN or infinity, and every "
                    "dashboard attached would drop its connection on this event; give a finite "
                    "number; nothing was published"
                ],
            )


def _refuse_non_finite(exc: ValidationError, cls: type[BaseEvent], where: str) -> None:
    """Raise InvalidConfiguration, as :func:`_check_finite` does, when pydantic refused a NaN or
    infinity of a field declared finite (progress amounts): a user of emit() is told the same
    for every number, whichever refused it."""
    problems = [
        f"{cls.__qualname__}.{'.'.join(map(str, err['loc']))}={err.get('input')!r}: JSON has no NaN or "
        "infinity, and every dashboard attached would drop its connection on this event; give a "
        "finite number; nothing was published"
        for err in exc.errors()
        if err["type"] == "finite_number"
    ]
    if problems:
        raise InvalidConfiguration(where, problems) from exc  # (a progress report tells its own way)


def _check_nested(event: BaseEvent, shape: EventShape, where: str) -> None:
    """Refuse an event with a value nested in a field (a result, a job, params) that JSON
    cannot carry (InvalidConfiguration): a lone surrogate, NaN or infinity, an object with
    no JSON form. Every attached dashboard and the cluster's relay would have to drop it."""
    values = event.__dict__
    for name in shape.nested:
        value = values[name]
        if value is None or (not value and isinstance(value, (dict, list))):
            continue
        try:
            jsonable(value)
        except NotJsonSafe as exc:
            raise InvalidConfiguration(
                where,
                [
                    f"{shape.cls.__qualname__}.{name} holds a value JSON cannot carry ({exc.detail}), so no "
                    "attached dashboard or other node could read this event; make it JSON-safe (escape "
                    "or drop the text, use None for a NaN); nothing was published"
                ],
            ) from None


def check_event(event: BaseEvent, where: str = "bus.publish()") -> None:
    """Refuse (InvalidConfiguration) an event no attached dashboard or other node could read:
    a class outside the engine's events, a NaN or infinite float, a nested value JSON cannot
    carry. What :meth:`EventBus.publish` checks, for a caller that checks first."""
    shape = _SHAPES.get(type(event)) or shape_of(type(event), where)
    if shape.numbers:
        _check_finite(event, shape, where)
    if shape.nested:
        _check_nested(event, shape, where)


def after_seq(notice: EventsDropped, seq: int) -> EventsDropped | None:
    """The part of a drop notice past ``seq`` (None if it has none), for a reader whose
    snapshot taken at ``seq`` covers the rest: the notice stands for consecutive seqs."""
    last = notice.seq + notice.count - 1
    if last <= seq:
        return None
    if notice.seq > seq:
        return notice
    return notice.model_copy(update={"seq": seq + 1, "count": last - seq})


def built(item: BaseEvent | Posted) -> Event:
    """The event itself, built now if it was posted unbuilt (safe from any thread)."""
    return item.get() if type(item) is Posted else item  # type: ignore[return-value]


class _Gap:
    """Where a subscriber's buffer overflowed: ``count`` events from ``first_seq`` on."""

    __slots__ = ("first_seq", "count")

    def __init__(self, first_seq: int, count: int = 1) -> None:
        self.first_seq = first_seq
        self.count = count


class EventBuffer:
    """A bounded FIFO of events that remembers where it overflowed.

    Events past ``maxsize`` are dropped and counted; each run of dropped events
    leaves one marker in the queue, read back as an
    :class:`~taskwatch.engine.events.EventsDropped` notice at exactly that
    place, carrying the ``seq`` of the first event missed. A drop notice from
    further up (a server's, a relay's) dropped here stands for the ``count``
    events it announced: they are all counted, so the notices read back add up
    to every event lost on the way. One event loop only.
    """

    def __init__(self, maxsize: int, node: str = "", clock: Callable[[], float] = time.time) -> None:
        if maxsize < 1:
            raise InvalidConfiguration("subscription", [f"maxsize={maxsize!r}: room for at least one event"])
        self.maxsize = maxsize
        self.node = node
        self.clock = clock
        self._items: deque[BaseEvent | Posted | _Gap] = deque()
        self._events = 0
        #: events dropped because the buffer was full
        self.dropped = 0
        #: events taken out of the buffer (read, or covered by a snapshot)
        self._taken = 0

    def offer(self, event: BaseEvent | Posted) -> bool:
        """Keep ``event`` if there is room (True), else count it as dropped (False)."""
        items = self._items
        if self._events >= self.maxsize:
            lost = event.count if type(event) is EventsDropped else 1
            self.dropped += lost
            tail = items[-1] if items else None
            if isinstance(tail, _Gap):
                tail.count += lost
            else:
                items.append(_Gap(event.seq, lost))
            return False
        items.append(event)
        self._events += 1
        return True

    def take_one(self) -> Event:
        item = self._items.popleft()
        kind = type(item)
        if kind is Posted:
            self._events -= 1
            self._taken += 1
            event = item._event  # type: ignore[union-attr]
            if event is None:
                event = item.get()  # type: ignore[union-attr]
            return event  # type: ignore[no-any-return,return-value]  # a Posted builds an Event
        if kind is _Gap:
            return EventsDropped(
                seq=item.first_seq, ts=self.clock(), node=self.node, count=item.count, total=self.dropped  # type: ignore[union-attr]
            )
        self._events -= 1
        self._taken += 1
        return item  # type: ignore[return-value]

    def take(self, limit: int | None = None) -> list[Event]:
        """Up to ``limit`` items (events and drop notices), oldest first."""
        items = self._items
        n = len(items) if limit is None else min(limit, len(items))
        out: list[Event] = []
        append = out.append
        popleft = items.popleft
        taken = 0
        # take_one, unrolled: a dashboard drains thousands of events a second this way
        try:
            for _ in range(n):
                item = popleft()
                kind = type(item)
                if kind is Posted:
                    taken += 1  # counted out before it is built: a build that raises loses only itself
                    event = item._event  # type: ignore[union-attr]
                    if event is None:
                        event = item.get()  # type: ignore[union-attr]
                    append(event)  # type: ignore[arg-type]  # a Posted builds an Event
                elif kind is _Gap:
                    append(EventsDropped(
                        seq=item.first_seq, ts=self.clock(), node=self.node, count=item.count, total=self.dropped  # type: ignore[union-attr]
                    ))
                else:
                    append(item)  # type: ignore[arg-type]
                    taken += 1
        finally:
            self._events -= taken
            self._taken += taken
        return out

    def discard_through(self, seq: int) -> None:
        """Forget events (and gaps) up to ``seq``: a snapshot taken at ``seq`` covers them.

        A gap or drop notice that reaches past ``seq`` is kept for its part past
        it: the events lost after the snapshot must still be announced. Both
        stand for a run of consecutive seqs (a buffer holding every kind, as
        a connection's does: a notice counts its own events as lost).
        """
        kept: deque[BaseEvent | Posted | _Gap] = deque()
        events = 0
        for item in self._items:
            if isinstance(item, _Gap):
                last = item.first_seq + item.count - 1
                if last > seq:
                    if item.first_seq <= seq:
                        item.first_seq, item.count = seq + 1, last - seq
                    kept.append(item)
            elif item.seq > seq:
                kept.append(item)
                events += 1
            elif type(item) is EventsDropped and (after := after_seq(item, seq)) is not None:
                kept.append(after)
                events += 1
        self._items = kept
        self._taken += self._events - events
        self._events = events

    @property
    def pending(self) -> int:
        """Events buffered and not yet read (drop notices not counted)."""
        return self._events

    @property
    def received(self) -> int:
        """Events accepted into the buffer (taken out since, or still in it)."""
        return self._taken + self._events

    def __len__(self) -> int:
        return len(self._items)


class Subscription:
    """An async iterator over events, with its own bounded buffer.

    Use as ``async for event in sub`` or drain in batches with
    :meth:`get_batch`. Iteration ends after the bus closes and the buffer is
    empty. Close it (or use ``async with``) when done so the bus stops feeding it.
    """

    def __init__(self, bus: EventBus, maxsize: int, kinds: Iterable[str] | None) -> None:
        self._bus = bus
        self._buffer = EventBuffer(maxsize, bus.node, bus.clock)
        self.maxsize = maxsize
        # told of events missed further up (a cluster relay's, a server's) whatever its kinds, as
        # it is of those its own full buffer drops: filtered out, a reader of run.failed missed
        # failures without a word
        self._filter = KindFilter(kinds, always=("bus.dropped",))
        self._all = self._filter.matches_all
        # a future per waiting coroutine: one cancelled waiter never cancels another's wait,
        # and waiting needs no shield (a future and two callbacks per wake on the hot path)
        self._waiters: list[asyncio.Future[None]] = []
        self.closed = False

    @property
    def dropped(self) -> int:
        """Events this subscriber missed because its buffer was full."""
        return self._buffer.dropped

    @property
    def received(self) -> int:
        """Events delivered into this subscriber's buffer."""
        return self._buffer.received

    # called by the bus, on the engine's loop
    def _offer(self, event: BaseEvent | Posted, kind: str) -> None:
        if not self._all:
            wanted = self._filter.answers.get(kind)  # the filter's call, skipped once it answered
            if wanted is None:
                wanted = self._filter(kind)
            if not wanted:
                return
        buffer = self._buffer
        if buffer._events < buffer.maxsize:
            # EventBuffer.offer's keeping branch, inline: this runs for every event and reader
            buffer._items.append(event)
            buffer._events += 1
            if self._waiters:
                # woken once: the next events find no waiter until a reader waits again
                self._wake()
        else:
            dropped = buffer.dropped
            buffer.offer(event)  # counts the drop and marks the gap
            # (a drop notice from further up stands for the events it announced, as it does there)
            self._bus.dropped_total += buffer.dropped - dropped

    def _wake(self) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def pending(self) -> int:
        """Events buffered and not yet read."""
        return self._buffer.pending

    def get_batch(self, limit: int | None = None) -> list[Event]:
        """Take up to ``limit`` buffered items (events and drop notices) without waiting;
        :class:`InvalidConfiguration` for a ``limit`` that is not an int >= 0 (nothing is taken)."""
        _check_limit("Subscription.get_batch()", limit)
        return self._buffer.take(limit)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until an event is buffered or the bus closes. True if events are ready.

        ``timeout`` in seconds (0 or less: no wait); :class:`InvalidConfiguration` for NaN or
        anything but a number or None, which would wait for good or fail later."""
        if timeout is not None and (type(timeout) not in (int, float) or timeout != timeout):
            raise InvalidConfiguration(
                "Subscription.wait()",
                [f"timeout={timeout!r}: give the seconds to wait as a number, or None to wait without limit"],
            )
        if self._buffer:
            return True
        if self.closed:
            return False
        loop = asyncio.get_running_loop()
        home = self._bus.loop
        if home is not None and loop is not home and home.is_running():
            raise LoopThreadError(
                "Subscription.wait",
                "a subscription was awaited on another event loop than the engine's, which publishes "
                "its events and could never wake it (a notebook cell beside start_background(), say); "
                "read it on the engine's loop: `await bg.acall(watch)` with `async def watch(engine): "
                "async for event in engine.bus.subscribe(): ...`; nothing was read",
            )
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            pass
        finally:
            if not waiter.done() or waiter.cancelled():
                # timed out or cancelled: nothing is left behind for the next event to wake
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        return bool(self._buffer)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        buffer = self._buffer
        while not buffer._items:  # the deque itself: len(buffer) is a Python call per event
            if self.closed:
                raise StopAsyncIteration
            await self.wait()
        return buffer.take_one()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            loop = self._bus.off_loop()
            if loop is not None:
                # from another thread: the removal and the wake-up are the loop's to make. A
                # waiter's future woken from here would never call back on its loop (its reader
                # neither ending nor cancellable), and the bus's list of subscribers, replaced
                # here and there at once, could lose one or bring a closed one back
                try:
                    loop.call_soon_threadsafe(self._closed_here)
                    return
                except RuntimeError:
                    pass  # the loop closed meanwhile: nothing publishes any more
            self._closed_here()

    def _closed_here(self) -> None:
        self._bus._remove(self)
        self._wake()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Callback:
    __slots__ = ("fn", "filter", "errors", "unbuilt")

    def __init__(self, fn: Callable[[Any], Any], kinds: Iterable[str] | None, unbuilt: bool) -> None:
        self.fn = fn
        self.filter = KindFilter(kinds)
        self.errors = 0
        self.unbuilt = unbuilt


class EventBus:
    """Fans events out to subscribers. Publish from the engine's event loop only."""

    def __init__(
        self, node: str = "", replay: int = DEFAULT_REPLAY, clock: Callable[[], float] = time.time
    ) -> None:
        self.node = node
        self.clock = clock
        self._seq = 0
        self._ring: deque[BaseEvent | Posted] = deque(maxlen=max(0, replay))
        self._subs: list[Subscription] = []
        self._callbacks: list[_Callback] = []
        #: events published by a callback while callbacks were being handed another one:
        #: handed out after it, so every callback sees events in seq order
        self._calling = False
        self._call_queue: deque[tuple[BaseEvent | Posted, str]] = deque()
        self.dropped_total = 0
        self.callback_errors = 0
        self.closed = False
        #: the event loop that publishes (the engine's, once started): the only one a
        #: subscription's wait can be woken on
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def published(self) -> int:
        """Events published so far (each took the next ``seq``)."""
        return self._seq

    def make(self, cls: type[E], **fields: Any) -> E:
        """Build an event stamped with this bus's node and clock, without publishing it."""
        return cls(seq=self._seq, ts=self.clock(), node=self.node, **fields)

    def emit(self, cls: type[E], **fields: Any) -> E:
        """Build an event with the next ``seq`` and publish it.

        Refuses (InvalidConfiguration, before the event takes a ``seq``) a class
        that is not one of the engine's events, a float that is NaN or infinite,
        and a value nested in a result, job or params that JSON cannot carry;
        escapes lone surrogates in str fields: attached dashboards and other
        nodes could not read any of them.
        """
        self._on_its_loop("emit")
        try:
            shape = _SHAPES[cls]
        except (KeyError, TypeError):
            shape = shape_of(cls)
        for name in shape.texts:
            # str.isascii() is a flag lookup: only other text is tried for surrogates
            value = fields.get(name)
            if isinstance(value, str) and not value.isascii():
                fields[name] = utf8_text(value)
        fields["seq"] = self._seq + 1
        fields["ts"] = self.clock()
        fields["node"] = self.node
        # the validator on the kwargs dict itself: the same validation as cls(**fields),
        # without building a second dict on the hot path; a bad value raises before the
        # event takes its seq, so a refused event leaves no hole in the sequence
        try:
            event: E = cls.__pydantic_validator__.validate_python(fields)
        except ValidationError as exc:
            _refuse_non_finite(exc, cls, "bus.emit()")
            raise
        if shape.numbers:
            _check_finite(event, shape, "bus.emit()")
        if shape.nested:
            _check_nested(event, shape, "bus.emit()")
        self._seq += 1
        self._deliver(event, shape.kind)
        return event

    def post(self, cls: type[BaseEvent], **fields: Any) -> None:
        """Publish an event of ``cls`` with the next ``seq``, built only when first read.

        For events whose fields the engine itself produced (already typed and
        checked): the pydantic validation then happens on the reader's side,
        once. Anything from user code goes through :meth:`emit`, which
        validates before publishing and raises on a bad value.
        """
        try:
            shape = _SHAPES[cls]
        except (KeyError, TypeError):
            shape = shape_of(cls, "bus.post()")  # a class refused takes no seq
        seq = self._seq = self._seq + 1
        kind = shape.kind
        # Posted(shape, fields, seq, ts, node), made without its __init__: a Python call is a
        # sixth of an event's cost, and three are posted per run
        item = _new_posted(Posted)
        item.shape = shape
        item.fields = fields
        item.seq = seq
        item.ts = self.clock()
        item.node = self.node
        item._event = None
        # _deliver, inline: three of these per run
        self._ring.append(item)
        for sub in self._subs:
            # Subscription._offer, inline but for a kind its filter meets first and a full
            # buffer: a call per reader is a tenth of this
            if not sub._all:
                wanted = sub._filter.answers.get(kind)
                if not wanted:
                    if wanted is None:
                        sub._offer(item, kind)
                    continue
            buffer = sub._buffer
            if buffer._events < buffer.maxsize:
                buffer._items.append(item)
                buffer._events += 1
                if sub._waiters:
                    sub._wake()
            else:
                sub._offer(item, kind)
        if self._callbacks:
            self._call_back(item, kind)

    def publish(self, event: Event, *, checked: bool = False) -> Event:
        """Publish a ready-made event, restamping it with the next ``seq``; checked as
        :meth:`emit` checks its values, unless ``checked`` says :func:`check_event` (or
        its equivalent) already passed it: an event just decoded from JSON that holds no
        NaN or infinity, say, which a relay reads by the thousand."""
        self._on_its_loop("publish")
        cls = type(event)
        shape = _SHAPES.get(cls) or shape_of(cls, "bus.publish()")
        if not checked:
            # the event keeps its own ts (emit stamps its own): a NaN there would reach readers too
            ts = event.ts
            if type(ts) is float and ts - ts:
                raise InvalidConfiguration(
                    "bus.publish()",
                    [f"{cls.__qualname__}.ts={ts!r}: JSON has no NaN or infinity; give a finite time; nothing was published"],
                )
            if shape.numbers:
                _check_finite(event, shape, "bus.publish()")
            if shape.nested:
                _check_nested(event, shape, "bus.publish()")
        update: dict[str, Any] = {"seq": self._seq + 1, "node": event.node or self.node}
        values = event.__dict__
        for name in shape.texts:
            value = values.get(name)
            if isinstance(value, str) and not value.isascii():
                escaped = utf8_text(value)
                if escaped is not value:
                    update[name] = escaped
        self._seq += 1
        event = event.model_copy(update=update)
        self._deliver(event, shape.kind)
        return event

    def _on_its_loop(self, method: str) -> None:
        """Raise :class:`LoopThreadError` for a publish from a thread other than the running
        engine loop's: ``seq`` is taken without a lock, so two threads would hand out one seq
        twice, and a subscription woken from there would not wake its loop."""
        loop = self.loop
        if loop is not None and asyncio._get_running_loop() is not loop and loop.is_running():
            raise LoopThreadError(
                f"bus.{method}",
                f"bus.{method}() was called from a thread other than the engine's event loop's, which "
                "alone publishes (each event takes the next seq there); nothing was published. From "
                "another thread, hand it to the engine's loop: "
                f"`engine.loop.call_soon_threadsafe(functools.partial(engine.bus.{method}, ...))`, or "
                f"`bg.call(lambda engine: engine.bus.{method}(...))` for a start_background() engine",
            )

    def _deliver(self, item: BaseEvent | Posted, kind: str) -> None:
        self._ring.append(item)
        for sub in self._subs:
            sub._offer(item, kind)
        if self._callbacks:
            self._call_back(item, kind)

    def _call_back(self, item: BaseEvent | Posted, kind: str) -> None:
        """Hand ``item`` to the callbacks; an event a callback publishes meanwhile waits until
        every callback has this one (a later callback, a cluster relay's say, would see it first)."""
        if self._calling:
            self._call_queue.append((item, kind))
            return
        self._calling = True
        try:
            self._call_back_one(item, kind)
            queue = self._call_queue
            while queue:
                self._call_back_one(*queue.popleft())
        finally:
            self._calling = False

    def _call_back_one(self, item: BaseEvent | Posted, kind: str) -> None:
        """Hand ``item`` to every callback whose filter takes ``kind`` (built once, for those that want it built)."""
        event: BaseEvent | Posted | None = None
        for cb in self._callbacks:
            if cb.filter(kind):
                if cb.unbuilt:
                    arg: BaseEvent | Posted = item
                else:
                    if event is None:
                        event = built(item)
                    arg = event
                try:
                    cb.fn(arg)
                except (Exception, asyncio.CancelledError):
                    # a CancelledError too (a callback reading a cancelled future's result): let
                    # through, it ended the publish in the middle of a submit, or of a run's start
                    cb.errors += 1
                    self.callback_errors += 1
                    if cb.errors == 1:
                        log.exception("event callback %r raised; errors are counted", cb.fn)

    def subscribe(
        self,
        replay: int = 0,
        kinds: Iterable[str] | None = None,
        maxsize: int = DEFAULT_BUFFER,
    ) -> Subscription:
        """Subscribe to events from now on, after the last ``replay`` past events that match.

        ``kinds`` filters by exact kind (``"run.failed"``) or prefix (``"run."``).
        ``maxsize`` bounds the buffer; overflow is dropped for this subscriber only.
        A ``replay`` over ``maxsize`` replays the newest ``maxsize`` events: history the
        buffer cannot hold is not counted as dropped, as no live event was lost. One made while
        the engine is stopped (or not started yet) is fed from its next start. From another
        thread than the running engine's loop's, the subscription is registered on that loop, at
        its next step (not waited for: a blocked loop holds no caller).
        """
        check_options(SubscribeOptions, "bus.subscribe()", replay=replay, maxsize=maxsize)
        sub = Subscription(self, maxsize, kinds)
        replay = min(replay, maxsize)
        loop = self.off_loop()
        if loop is not None:
            # from another thread: the replay's pick and the registration are made on the loop,
            # between two publishes. Made here, events published in between were lost or given
            # twice, and two threads replacing the list of subscribers at once could lose one.
            # Not waited for: a loop a task blocks would hold the caller as long
            try:
                loop.call_soon_threadsafe(self._register, sub, replay)
                return sub
            except RuntimeError:
                pass  # the loop closed meanwhile: nothing publishes any more
        self._register(sub, replay)
        return sub

    def off_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop that publishes, when it runs and this thread is not the one running it:
        what changes the subscribers is then made there."""
        loop = self.loop
        if loop is not None and asyncio._get_running_loop() is not loop and loop.is_running():
            return loop
        return None

    def _register(self, sub: Subscription, replay: int) -> None:
        if sub.closed:
            return  # closed from its thread before the loop got to this
        if replay > 0:
            # the last ``replay`` events this subscriber would have received
            picked: list[BaseEvent | Posted] = []
            # a copy (made at once, under the GIL): a subscriber on another thread must not
            # iterate the ring while the loop appends to it
            for item in reversed(list(self._ring)):
                if sub._filter(item.kind):
                    picked.append(item)
                    if len(picked) >= replay:
                        break
            for item in reversed(picked):
                sub._offer(item, item.kind)
        # registered on a closed bus too (an engine stopped): fed from its next start, as one made
        # before the first start is. Ended at once, it missed every event of that start, silently
        # (a new list, never the one a publish is going over, from a callback)
        self._subs = [*self._subs, sub]

    # a callback gets every event its ``kinds`` match: typed as any event (narrow on ``kind``),
    # or declared for the one class the filter picks; with ``unbuilt``, posted events too
    @overload
    def add_callback(
        self, fn: Callable[[Event], object], kinds: Iterable[str] | None = None, *, unbuilt: Literal[False] = False
    ) -> Callable[[], None]: ...

    @overload
    def add_callback(
        self, fn: Callable[[E], object], kinds: Iterable[str] | None = None, *, unbuilt: Literal[False] = False
    ) -> Callable[[], None]: ...

    @overload
    def add_callback(
        self, fn: Callable[[Event | Posted], object], kinds: Iterable[str] | None = None, *, unbuilt: Literal[True]
    ) -> Callable[[], None]: ...

    def add_callback(
        self, fn: Callable[[Any], object], kinds: Iterable[str] | None = None, *, unbuilt: bool = False
    ) -> Callable[[], None]:
        """Call ``fn(event)`` synchronously for each event; returns an unsubscribe function.

        Callbacks run inside ``publish``: keep them fast. Exceptions are caught,
        counted in ``callback_errors`` and logged once per callback. With
        ``unbuilt``, ``fn`` gets posted events as they are, to be built by
        :func:`built` later, wherever the consumer reads them (say, on another
        thread): building them is then no work for the engine's loop.
        """
        if not callable(fn):
            # refused here: accepted, it would fail on every event, counted and logged once
            raise InvalidConfiguration(
                "bus.add_callback()", [f"fn={fn!r}: not callable; give a function that takes one event"]
            )
        cb = _Callback(fn, kinds, unbuilt)
        # a new list: a callback added while an event is handed out gets the events after it
        self._callbacks = [*self._callbacks, cb]

        def unsubscribe() -> None:
            if cb in self._callbacks:
                # a new list, not the one an event being delivered goes over: removing from that
                # one (a callback unsubscribing itself, say) would skip the next callback's turn
                self._callbacks = [c for c in self._callbacks if c is not cb]

        return unsubscribe

    def recent(self, limit: int | None = None) -> list[Event]:
        """The newest ``limit`` events the bus keeps for replay (all of them for None), oldest first."""
        _check_limit("EventBus.recent()", limit)
        items = list(self._ring)
        if limit is not None:
            items = items[len(items) - limit :] if limit else []
        return [built(item) for item in items]

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            # a new list, not the one a publish is going over: removing from that one (a close
            # from a callback, or from another thread) would skip the next subscriber's turn
            self._subs = [s for s in self._subs if s is not sub]

    @property
    def subscribers(self) -> int:
        return len(self._subs) + len(self._callbacks)

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "subscribers": self.subscribers,
            "dropped": self.dropped_total,
            "callback_errors": self.callback_errors,
            "last_seq": self._seq,
        }

    def close(self) -> None:
        """End every subscription once its buffer is read. The bus stays readable."""
        self.closed = True
        subs, self._subs = self._subs, []
        for sub in subs:
            sub.closed = True
            sub._wake()

    def reopen(self) -> None:
        self.closed = False
