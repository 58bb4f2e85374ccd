"""Run stores: where run rows live (memory, a SQLite file shared by processes, or a
PostgreSQL database shared by the nodes of a cluster).

``make_store(spec)`` turns a configuration value into a store: ``"memory"``,
``"sqlite:///relative.db"`` / ``"sqlite:////absolute.db"`` (SQLAlchemy's
convention; options ``synchronous``, ``busy_timeout``, ``lease_ttl`` as query
parameters), ``"postgresql://user:password@host:port/database"`` (options
``pool_size``, ``lease_ttl``, ``node_ttl``, ``reconnect_timeout``, ``schema``;
any other query parameter goes to the driver; needs the ``postgres`` extra), or a
:class:`Store` instance, returned as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..urls import password_problem, redact_url
from .base import Store, Subscription
from ..errors import (
    DuplicateRunId,
    InvalidConfiguration,
    NotATaskwatchStore,
    SchemaInUse,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreDriverMissing,
    StoreError,
    StoreGaveUp,
    StoreUnavailable,
    UnknownStore,
)
from .memory import MemoryStore
from .models import (
    CancelResult,
    Cancelled,
    Claim,
    Counts,
    Failed,
    HeartbeatResult,
    Inserted,
    NewRun,
    NodeInfo,
    OnLost,
    Outcome,
    Page,
    Recovered,
    Retry,
    StoredJob,
    StoredRun,
    Succeeded,
    TriggerKeyRecord,
    Wakeup,
)
from .postgres import PostgresStore
from .sqlite import SqliteStore

__all__ = [
    "CancelResult",
    "Cancelled",
    "Claim",
    "Counts",
    "DuplicateRunId",
    "Failed",
    "HeartbeatResult",
    "Inserted",
    "MemoryStore",
    "NewRun",
    "NodeInfo",
    "OnLost",
    "Outcome",
    "Page",
    "PostgresStore",
    "Recovered",
    "Retry",
    "NotATaskwatchStore",
    "SchemaInUse",
    "SchemaTooNew",
    "SqliteStore",
    "Store",
    "StoreBusy",
    "StoreClosed",
    "StoreDriverMissing",
    "StoreError",
    "StoreGaveUp",
    "StoreUnavailable",
    "StoredJob",
    "StoredRun",
    "Subscription",
    "Succeeded",
    "TriggerKeyRecord",
    "UnknownStore",
    "Wakeup",
    "make_store",
]

_SQLITE_OPTIONS = {"synchronous": str, "busy_timeout": int, "lease_ttl": float, "node_ttl": float}
_POSTGRES_OPTIONS = {
    "pool_size": int, "lease_ttl": float, "node_ttl": float, "reconnect_timeout": float,
    "schema": str,  # checked by PostgresStore, which keeps it in its url (for the relay and the lease)
}  # fmt: skip


def make_store(spec: str | Store, **options: Any) -> Store:
    """A store from a spec; ``options`` (clock, lease_ttl, ...) go to its constructor."""
    if isinstance(spec, Store):
        return spec
    if not isinstance(spec, str):
        raise UnknownStore(spec, "expected a string or a Store")
    if spec == "memory":
        return MemoryStore(**options)
    parts = urlsplit(spec)
    if parts.scheme in ("postgresql", "postgres"):
        return _postgres(spec, options)
    if parts.scheme != "sqlite":
        raise UnknownStore(spec)
    if parts.netloc:
        raise UnknownStore(spec, "a SQLite URL has no host: write three slashes before a relative path, four before an absolute one")
    if "#" in spec:
        # a URL's fragment: what follows it (the rest of the file name, the options) was dropped
        raise UnknownStore(spec, "'#' starts a URL's fragment, which would cut the file name or options short: write it as %23")
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not path:
        raise UnknownStore(spec, "the URL names no file")
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        conv = _SQLITE_OPTIONS.get(name)
        if conv is None:
            raise _bad_option(spec, f"unknown option {name!r} (known: {', '.join(_SQLITE_OPTIONS)})")
        _url_option(spec, options, name, raw, conv)
    return SqliteStore(path, **options)


def _bad_option(spec: str, problem: str) -> InvalidConfiguration:
    """A store the URL names well, with an option it cannot take."""
    return InvalidConfiguration(f"run store {redact_url(spec)}", [problem])


def _url_option(spec: str, options: dict[str, Any], name: str, raw: str, conv: Callable[[str], Any]) -> None:
    """Take the URL's option ``name``; one also given in ``options`` must be the same value."""
    try:
        value = conv(raw)
    except ValueError:
        raise _bad_option(spec, f"option {name}={raw!r} is not a valid {conv.__name__}") from None
    if name in options and options[name] != value:
        raise _bad_option(spec, f"{name}={raw} in the URL but {name}={options[name]!r} given beside it; give it in one place")
    options[name] = value


def _postgres(spec: str, options: dict[str, Any]) -> Store:
    if (problem := password_problem(spec)) is not None:
        raise _bad_option(spec, problem)  # before the query is read: a '?' in the password would split it
    parts = urlsplit(spec)
    if not parts.hostname and "host=" not in parts.query:
        raise UnknownStore(spec, "a PostgreSQL URL names its server: postgresql://user@host:port/database")
    driver_args: list[tuple[str, str]] = []
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        conv = _POSTGRES_OPTIONS.get(name)
        if conv is None:
            # sslmode, application_name, ...: the driver's; the event relay's (keep=...) stay in
            # the store's url too, which events="postgres" builds its relay from (the store's
            # own connections leave them out)
            driver_args.append((name, raw))
            continue
        _url_option(spec, options, name, raw, conv)
    if options.get("clock") is time.time:
        # the engine's default wall clock: a cluster keeps the database's instead
        del options["clock"]
    url = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(driver_args)))
    return PostgresStore(url, **options)
