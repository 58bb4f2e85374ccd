"""Making values safe for the wire where they enter the engine.

Params, results, keys, queue jobs and error texts all end up in events and
snapshots that are encoded as UTF-8 JSON for dashboards. A value that cannot
be encoded there (a ``str`` holding a lone surrogate such as
``os.fsdecode(b"\\xff")``, non-UTF-8 ``bytes``, a circular structure, an
arbitrary object) must be refused or escaped where it comes in, never found
later by an encoder that would then drop every attached dashboard.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from pydantic_core import PydanticSerializationError, from_json, to_json, to_jsonable_python

from .errors import InvalidKey, shown

#: what the encoders raise for values they cannot turn into JSON
_ENCODE_ERRORS = (PydanticSerializationError, ValueError, TypeError, RecursionError)


class NotJsonSafe(ValueError):
    """``value`` cannot be encoded as UTF-8 JSON; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


def jsonable(value: Any, *, finite: bool = True, distinct_keys: bool = False) -> Any:
    """``value`` as plain JSON data that encodes as UTF-8; raises :class:`NotJsonSafe`.

    Pydantic models, dataclasses, datetimes and the like are converted as
    pydantic converts them. The encode check catches what conversion lets
    through (lone surrogates in strings, also as dict keys), and NaN or
    infinity unless ``finite`` is false. With ``distinct_keys``, a dict whose
    keys become the same JSON key (``1`` and ``"1"``), which would lose all but
    one of their entries, is refused too.
    """
    try:
        data = to_jsonable_python(value)
        encoded = to_json(data)
    except _ENCODE_ERRORS as exc:
        raise NotJsonSafe(encode_problem(exc)) from None
    if finite:
        _check_finite(data, encoded)
    _check_readable(encoded)
    if distinct_keys and type(value) not in _SCALARS:
        _check_distinct_keys(value, encoded)
    return data


def check_jsonable(data: Any) -> bytes:
    """Raise :class:`NotJsonSafe` unless already-converted ``data`` encodes as UTF-8 JSON; its
    JSON text if it does."""
    try:
        encoded = to_json(data)
    except _ENCODE_ERRORS as exc:
        raise NotJsonSafe(encode_problem(exc)) from None
    _check_finite(data, encoded)
    _check_readable(encoded)
    return encoded


#: values that hold no dict, so no keys to run together
_SCALARS = frozenset({int, float, str, bool})


class _SameKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_same_key(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _SameKey(key)
            seen.add(key)
    # (the parse is for its keys alone: nothing of it is kept)


def _check_distinct_keys(value: Any, encoded: bytes) -> None:
    # Converting a dict makes each key a str, and keys that were distinct can become the same
    # one (1 and "1", None and "None", True and "true"): the dict made keeps the last entry of
    # those and drops the others without a word. The value encoded as it is keeps every entry,
    # a key repeated in its text where one was dropped, so it is the converted data's text
    # unless one was: the common value costs an encode and a comparison. Text that differs
    # for another reason (a computed field read twice, an iterator spent by the conversion) is
    # read for repeated keys before anything is refused.
    try:
        direct = to_json(value)
    except _ENCODE_ERRORS:
        return  # converted once but not twice (an iterator, spent): what was converted is whole
    if direct == encoded:
        return
    try:
        json.loads(direct, object_pairs_hook=_no_same_key)
    except _SameKey as same:
        raise NotJsonSafe(
            f"it holds a dict whose keys differ but become the same JSON key {shown(same.key)} (as 1 "
            "and '1' do, or None and 'None', True and 'true'): JSON keys are text, so all but one of "
            "those entries would be lost; give the dict keys of one type (str)"
        ) from None
    except (ValueError, RecursionError):
        return  # no JSON a reader takes back, yet the converted data's is: that is what is kept


#: how deep a value may nest: JSON readers stop at a depth (200 for pydantic's, which every
#: dashboard, client and store here reads with), and a value travels inside messages that
#: nest it a few levels further
MAX_DEPTH = 100
#: the most digits an integer may have: JSON readers refuse longer ones (pydantic's says
#: "number out of range"), as Python's own int() does past sys.get_int_max_str_digits()
MAX_INT_DIGITS = 4300

#: each byte of a text as ``0`` if it is a digit, else ``x``: a run of digits too long for a
#: reader shows as a run of zeros that a substring search finds at C speed
_DIGIT_RUNS = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))
_TOO_MANY_DIGITS = b"0" * (MAX_INT_DIGITS + 1)
#: the reader's own depth limit (pydantic_core's JSON parser, which the wire and stores use)
_READER_DEPTH = 200
_PAD = _READER_DEPTH - MAX_DEPTH
_TOO_DEEP = (
    f"it is nested more than {MAX_DEPTH} levels deep, which JSON readers refuse; "
    "flatten it, or keep the structure elsewhere and pass a reference to it"
)


def _check_readable(encoded: bytes) -> None:
    # The encoder writes what no reader takes back: a value nested past a reader's depth, or
    # an int too long to parse. Recorded, it would break every snapshot holding it, so each
    # dashboard's attach, for as long as the run is kept. Neither fits in a short text, and
    # neither can be there without many brackets or a long run of digits, so the common
    # value costs a length test, and only a suspect one is read back.
    if len(encoded) <= 2 * MAX_DEPTH:
        return
    if encoded.count(b"[") + encoded.count(b"{") <= MAX_DEPTH and (
        len(encoded) <= MAX_INT_DIGITS or _TOO_MANY_DIGITS not in encoded.translate(_DIGIT_RUNS)
    ):
        return
    try:
        # read inside _PAD levels of lists, so the reader's own limit stops at MAX_DEPTH
        from_json(b"[" * _PAD + encoded + b"]" * _PAD)
    except ValueError as exc:
        text = str(exc)
        if "recursion" in text:
            raise NotJsonSafe(_TOO_DEEP) from None
        if "number" in text:
            raise NotJsonSafe(
                f"it holds an integer of more than {MAX_INT_DIGITS} digits, which JSON readers "
                "refuse; pass it as a string"
            ) from None
        raise NotJsonSafe(f"it does not read back as JSON ({safe_str(exc)})") from None


def _check_finite(data: Any, encoded: bytes) -> None:
    # JSON has no NaN or infinity: the encoder writes them as bare constants that a
    # strict reader refuses, and events and snapshots carry them as null, so a run
    # would show dashboards another value than the one it holds. The byte search is
    # the cheap test; only a hit walks the data.
    if b"NaN" not in encoded and b"Infinity" not in encoded:
        return
    found = non_finite_problem(data)
    if found is not None:
        raise NotJsonSafe(found[1])


def non_finite_problem(data: Any) -> tuple[str, str] | None:
    """Where the first NaN or infinity in ``data`` (dicts, lists, tuples) is (``""``: ``data``
    itself; ``"scores[2]"``), and what is wrong with it, in the words :func:`check_jsonable`
    uses; None when there is none."""
    found = _non_finite(data)
    if found is None:
        return None
    where, value = found
    return where, f"{where or 'it'} is {shown(value)}, which JSON cannot carry; use None or a string for it"


def _non_finite(data: Any) -> tuple[str, float] | None:
    """The path to the first NaN or infinity in converted ``data`` (``""`` for ``data`` itself),
    within :data:`MAX_DEPTH` levels."""
    # A walk of its own stack, not of Python's: data nested a thousand levels must not make the
    # search raise RecursionError. Deeper than MAX_DEPTH it does not look: such data is refused
    # for its depth, which is what to tell, rather than a NaN at the end of a path that long.
    # Each entry is (item, its key, its parent's entry, its depth); the path is spelled out for
    # the one found alone.
    pending: list[tuple[Any, Any, Any, int]] = [(data, None, None, 0)]
    while pending:
        entry = pending.pop()
        item, _, _, depth = entry
        if isinstance(item, float):
            if not math.isfinite(item):
                return _path_of(entry), item
        elif depth >= MAX_DEPTH:
            continue
        elif isinstance(item, dict):
            pending.extend((value, key, entry, depth + 1) for key, value in reversed(item.items()))
        elif isinstance(item, (list, tuple)):
            pending.extend(
                (value, index, entry, depth + 1) for index, value in zip(range(len(item) - 1, -1, -1), reversed(item))
            )
    return None


def _path_of(entry: tuple[Any, Any, Any, int]) -> str:
    keys = []
    while entry[2] is not None:
        keys.append(entry[1])
        entry = entry[2]
    keys.reverse()
    if not keys:
        return ""
    first = keys[0]
    # a top-level str key is named bare ("scores[2]"), as a field is
    head = first if isinstance(first, str) else f"[{shown(first)}]"
    return head + "".join(f"[{shown(key)}]" for key in keys[1:])


#: the line that stands for the middle of a text cut to a bound (``is_truncated`` finds it)
TEXT_CUT = "\n[... {} characters truncated ...]\n"
TEXT_CUT_RE = re.compile(r"\n\[\.\.\. \d+ characters truncated \.\.\.\]\n")


def cut_text(text: str, head: int, tail: int) -> str:
    """``text`` with its middle replaced by a line saying how many characters were cut, if it
    is longer than ``head + tail`` characters (and the line)."""
    cut = len(text) - head - tail
    if cut <= len(TEXT_CUT):
        return text
    return text[:head] + TEXT_CUT.format(cut) + text[len(text) - tail :]


def utf8_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) escaped as ``\\udcff``;
    the very same object when it has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode escaped as ``\\udcff``, and each NUL as
    ``\\x00``; the very same object when it has neither."""
    text = utf8_text(text)
    # PostgreSQL's text refuses NUL: a progress message holding one would fail every write
    # of its run (and the node's heartbeat with it), where UTF-8 JSON would carry it
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text


def safe_str(obj: object, show: Callable[[object], str] = str) -> str:
    """``str(obj)`` (or ``show(obj)``: ``repr``) made wire-safe, even for objects whose
    ``__str__`` raises."""
    try:
        text = show(obj)
        if type(text) is not str:
            # a str subclass's own methods (encode, __contains__...) would run below, outside this try
            text = str.__str__(text)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not hide the real failure
        # BaseException: this runs where a run's failure is caught, and a __str__ raising
        # KeyboardInterrupt or a BaseException of its own would escape the run from there
        text = f"<unprintable {type(obj).__qualname__}>"
    return safe_text(text)


#: the most UTF-8 bytes a key (a dedup key, a trigger key) may have, on every store. A PostgreSQL
#: store indexes a key beside its task's or trigger's name, and an index entry holds at most about
#: 2.7 KB there (a third of a page): past that, every write of the key would fail. With names of
#: at most :data:`MAX_NAME_BYTES` a key of this size always fits
MAX_KEY_BYTES = 2048
#: the most UTF-8 bytes a name (of a task, a queue, a trigger, a worker, a node...) may have: a
#: PostgreSQL store indexes names (a task's with its runs' dedup keys, a trigger's with its keys)
MAX_NAME_BYTES = 512


def check_key(owner: str, key: object) -> None:
    """Refuse a key that is not a ``str`` UTF-8 can encode, that holds a NUL, or that is longer
    than :data:`MAX_KEY_BYTES` in UTF-8; raises :class:`InvalidKey`."""
    if not isinstance(key, str):
        raise InvalidKey(owner, key, f"a key must be a str, not {type(key).__qualname__}")
    if "\x00" in key:
        # refused on every store, not only PostgreSQL's (whose text cannot hold it): an
        # application moving to it would find out key by key, each save of them failing
        raise InvalidKey(
            owner, key, f"it holds a NUL character ('\\x00' at index {key.index(chr(0))}), which a "
            "PostgreSQL store cannot keep; drop it or encode the key (as hex, say)"
        )
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey(owner, key, "it holds characters UTF-8 cannot encode (lone surrogates)") from None
    if size > MAX_KEY_BYTES:
        # refused on every store, as a NUL is: on PostgreSQL's each save of the key would fail
        raise InvalidKey(
            owner, key, f"it is {size} bytes long in UTF-8, over the {MAX_KEY_BYTES} a key may have on every "
            "store (PostgreSQL's indexes it); use a digest of the long value as the key "
            "(hashlib.sha256(value.encode()).hexdigest(), say) and keep the value where the task can "
            "look it up by that"
        )


def check_run_key(owner: str, key: object) -> None:
    """:func:`check_key` for a run's dedup key, which may not be empty either: ``""`` (an empty
    form field passed on) would make every submit given it one run, however unrelated."""
    check_key(owner, key)
    if key == "":
        raise InvalidKey(
            owner, key, "an empty key would make every submit given it the same run; give key=None for "
            "a run with no dedup key"
        )


#: what a name of plain text never holds: C0 and C1 control characters (NUL, newline, tab, ESC) and DEL
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def name_problem(option: str, name: object) -> str | None:
    """What is wrong with ``name`` as the name of something events and snapshots carry
    (a task, a worker, a lease), as one ``InvalidConfiguration`` problem; None when nothing is."""
    if not isinstance(name, str):
        return f"{option}={name!r}: a name must be a str, not {type(name).__qualname__}"
    if not name:
        return f"{option}='': a name must not be empty"
    control = _CONTROL.search(name)
    if control is not None:
        # a NUL makes a PostgreSQL store refuse every write naming it (the start itself, for a
        # queue's); a newline or an escape sequence garbles every log line and dashboard row
        return (
            f"{option}={name!r}: it holds the control character {control.group()!r} (at index "
            f"{control.start()}); use a name of plain text"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        # every snapshot and event naming it would fail to encode, dropping each dashboard
        return (
            f"{option}={name!r}: it holds characters UTF-8 cannot encode (lone surrogates, "
            "as os.fsdecode() makes of non-UTF-8 bytes); use a name of plain text"
        )
    # a run's source is no index's and holds a name behind a prefix ("trigger:NAME"): not counted
    if size > MAX_NAME_BYTES and option != "source":
        # a PostgreSQL store indexes names, with keys beside them: a longer one, with a long
        # key, would make every write of it fail
        return (
            f"{option}={name[:40]!r}...: it is {size} bytes long in UTF-8, over the {MAX_NAME_BYTES} "
            "a name may have; use a shorter name"
        )
    return None


def encode_problem(exc: BaseException) -> str:
    """What an encoder's ``exc`` says is wrong with a value, in words a user acts on."""
    text = safe_str(exc)
    if isinstance(exc, RecursionError) or "Circular reference" in text:
        return "it refers to itself (a circular structure)"
    if "serialization depth" in text:
        return _TOO_DEEP
    return text
