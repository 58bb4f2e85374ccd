"""Making values safe for the wire where they enter the engine.

Params, results, keys, queue jobs and error texts all end up in events and
snapshots that are encoded as UTF-8 JSON for dashboards. A value that cannot
be encoded there (a ``str`` holding a lone surrogate such as
``os.fsdecode(b"\\xff")``, non-UTF-8 ``bytes``, a circular structure, an
arbitrary object) must be refused or escaped where it comes in, never found
later by an encoder that would then drop every attached dashboard.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticSerializationError, to_json, to_jsonable_python

from .errors import InvalidKey

#: what the encoders raise for values they cannot turn into JSON
_ENCODE_ERRORS = (PydanticSerializationError, ValueError, TypeError, RecursionError)


class NotJsonSafe(ValueError):
    """``value`` cannot be encoded as UTF-8 JSON; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data that encodes as UTF-8; raises :class:`NotJsonSafe`.

    Pydantic models, dataclasses, datetimes and the like are converted as
    pydantic converts them. The encode check catches what conversion lets
    through (lone surrogates in strings, also as dict keys).
    """
    try:
        data = to_jsonable_python(value)
        to_json(data)
    except _ENCODE_ERRORS as exc:
        raise NotJsonSafe(_describe(exc)) from None
    return data


def check_jsonable(data: Any) -> None:
    """Raise :class:`NotJsonSafe` unless already-converted ``data`` encodes as UTF-8 JSON."""
    try:
        to_json(data)
    except _ENCODE_ERRORS as exc:
        raise NotJsonSafe(_describe(exc)) from None


def safe_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode escaped as ``\\udcff``; unchanged otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_str(obj: object) -> str:
    """``str(obj)`` made wire-safe, even for objects whose ``__str__`` raises."""
    try:
        text = str(obj)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the real failure
        text = f"<unprintable {type(obj).__qualname__}>"
    return safe_text(text)


def check_key(owner: str, key: object) -> None:
    """Refuse a key that is not a ``str`` UTF-8 can encode; raises :class:`InvalidKey`."""
    if not isinstance(key, str):
        raise InvalidKey(owner, key, f"a key must be a str, not {type(key).__qualname__}")
    if safe_text(key) is not key:
        raise InvalidKey(owner, key, "it holds characters UTF-8 cannot encode (lone surrogates)")


def _describe(exc: BaseException) -> str:
    text = safe_str(exc)
    if isinstance(exc, RecursionError) or "Circular reference" in text:
        return "it refers to itself (a circular structure)"
    return text
