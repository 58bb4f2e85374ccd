"""The ranges of every option the engine, its tasks, loops and workers accept.

One pydantic model per place options are given, checked once when they are
given: a nonsense value (``every=1e-9``, ``timeout=nan``, a negative
``backoff``, ``True`` for a number of seconds) is refused at registration with
:class:`~taskwatch.engine.errors.InvalidConfiguration`, instead of making the
engine spin, stall or fail every run later.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidConfiguration

#: the shortest interval a periodic task may have; below it a loop only burns CPU
MIN_INTERVAL = 0.001


def _not_bool(value: Any) -> Any:
    # bool is an int to Python, so True would silently mean 1 second or 1 retry
    if isinstance(value, bool):
        raise ValueError("a number is needed, not a bool")
    return value


Seconds = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, strict=True)]
AtLeastOne = Annotated[int, BeforeValidator(_not_bool), Field(ge=1, strict=True)]
#: seconds between the turns of a loop: at least MIN_INTERVAL
Interval = Annotated[float, BeforeValidator(_not_bool), Field(ge=MIN_INTERVAL, allow_inf_nan=False)]


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EngineOptions(_Options):
    max_concurrency: AtLeastOne
    max_queue: AtLeastOne
    history: Count
    retention: PositiveSeconds | None
    replay: Count
    lease_ttl: Annotated[float, BeforeValidator(_not_bool), Field(ge=0.05, allow_inf_nan=False)] | None
    poll_interval: Annotated[float, BeforeValidator(_not_bool), Field(ge=0.001, allow_inf_nan=False)]
    cancel_grace: Seconds
    throughput_window: PositiveSeconds
    health_interval: PositiveSeconds | None
    # strict: flags read from the environment as "false" or "0" must not switch a task on
    flags: dict[str, Annotated[bool, Field(strict=True)]]


class TaskOptions(_Options):
    retries: Count
    timeout: PositiveSeconds | None
    concurrency: AtLeastOne | None
    backoff: Seconds
    backoff_max: Seconds
    on_lost: Literal["retry", "fail"]

    @model_validator(mode="after")
    def _ordered(self) -> TaskOptions:
        # a cap below the first delay would silently make every delay the cap
        if self.backoff_max < self.backoff:
            raise ValueError(f"backoff_max must be at least backoff ({self.backoff:g})")
        return self


def _flag_name(value: Any) -> Any:
    # checked before the task is recorded: a flag name that is no str cannot even be looked
    # up (a list is unhashable), and would break every schedule() and snapshot afterwards
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("the name of a flag in Engine(flags=...) is needed: a non-empty str, such as opt_in='kg_extraction'")
    return value


class PeriodicOptions(_Options):
    every: Annotated[float, BeforeValidator(_not_bool), Field(ge=MIN_INTERVAL, allow_inf_nan=False)] | None
    initial_delay: Seconds
    jitter: Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=1, allow_inf_nan=False)]
    opt_in: Annotated[str | None, BeforeValidator(_flag_name)]
    # strict: fixed_rate="no" would otherwise be taken as true
    fixed_rate: Annotated[bool, Field(strict=True)]


class QueueOptions(_Options):
    concurrency: AtLeastOne
    maxsize: AtLeastOne


class TriggerOptions(_Options):
    size_threshold: AtLeastOne
    staleness: Interval | None
    staleness_min: AtLeastOne
    check_interval: Interval | None
    save_interval: Interval
    forget_after: Interval | None


class StoreOptions(_Options):
    # as the engine's: a shorter lease only makes every node heartbeat without pause
    lease_ttl: Annotated[float, BeforeValidator(_not_bool), Field(ge=0.05, allow_inf_nan=False)]
    node_ttl: PositiveSeconds | None
    max_lost: AtLeastOne


class SqliteOptions(_Options):
    synchronous: Literal["off", "normal", "full", "extra"]
    busy_timeout: Count
    max_batch: AtLeastOne


class PostgresOptions(_Options):
    pool_size: AtLeastOne
    reconnect_timeout: Seconds | None
    channel: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class LeaseOptions(_Options):
    ttl: PositiveSeconds
    renew_interval: PositiveSeconds | None


class WorkerOptions(_Options):
    # as for loops: a crashing worker would restart (and log, and publish) thousands of times a second
    backoff: Interval
    backoff_max: PositiveSeconds

    @model_validator(mode="after")
    def _ordered(self) -> WorkerOptions:
        if self.backoff_max < self.backoff:
            raise ValueError(f"backoff_max must be at least backoff ({self.backoff:g})")
        return self


# strict as well: a str such as "5" is refused, not read as 5 seconds
StrictSeconds = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, allow_inf_nan=False, strict=True)]
StrictPositiveSeconds = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, allow_inf_nan=False, strict=True)]


#: a wait on a peer over a socket: shorter than this would turn every real client away
PeerSeconds = Annotated[float, BeforeValidator(_not_bool), Field(ge=0.1, allow_inf_nan=False, strict=True)]


class ServerOptions(_Options):
    allow_remote: Annotated[bool, Field(strict=True)]
    announce: Annotated[bool, Field(strict=True)]
    max_message: Annotated[int, BeforeValidator(_not_bool), Field(ge=64, strict=True)]
    max_hello: Annotated[int, BeforeValidator(_not_bool), Field(ge=256, strict=True)]
    max_handshakes: AtLeastOne
    hello_timeout: PeerSeconds
    buffer: AtLeastOne
    outgoing: Annotated[int, BeforeValidator(_not_bool), Field(ge=2, strict=True)]
    max_outgoing_bytes: AtLeastOne
    max_send: AtLeastOne
    max_value: Annotated[int, BeforeValidator(_not_bool), Field(ge=1024, strict=True)]
    write_timeout: PeerSeconds
    snapshot_runs: Count
    max_inflight: AtLeastOne
    max_connections: AtLeastOne


class RemoteOptions(_Options):
    # no engine sends lines shorter than 32 of its values, and max_value is at least 1 KiB:
    # a client refusing longer lines could never read a first snapshot. The floor of the engine
    # connected to (512 KiB with the default max_value) is checked by connect(), once known
    max_message: Annotated[int, BeforeValidator(_not_bool), Field(ge=32 * 1024, strict=True)]
    buffer: AtLeastOne
    timeout: PeerSeconds
    allow_remote: Annotated[bool, Field(strict=True)]


class BackgroundOptions(_Options):
    call_timeout: StrictPositiveSeconds | None
    # 0 is a stop that drains nothing, as bg.stop(timeout=0) is
    stop_timeout: StrictSeconds
    start_timeout: StrictPositiveSeconds


class WaitOptions(_Options):
    timeout: StrictSeconds | None


class CancelOptions(_Options):
    # no inf: a cancel's grace is how long its caller waits for the run to end, and it always returns
    grace: StrictSeconds | None


class StopOptions(_Options):
    # finite: a stop that waited for ever would never cancel what is left
    timeout: StrictSeconds


class SubscribeOptions(_Options):
    # strict counts: "10" or 1.5 events of buffer is a mistake, and a negative replay no history
    replay: Count
    maxsize: AtLeastOne


class PutOptions(_Options):
    # no None and no inf: a queue's put promises its producer never blocks without limit
    timeout: StrictSeconds


M = TypeVar("M", bound=_Options)


def check_options(model: type[M], where: str, **values: Any) -> M:
    """Validate ``values`` against ``model``; raise InvalidConfiguration naming each bad option."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                name = str(err["loc"][0])
                problems.setdefault(name, f"{name}={values.get(name)!r}: {msg}")
            else:
                problems.setdefault("", msg)
        raise InvalidConfiguration(where, list(problems.values())) from None


def check_option_names(where: str, given: Iterable[str], takes: Callable[..., Any]) -> None:
    """Refuse, as :func:`check_options` refuses a bad value, each of ``given`` that ``takes`` has no
    keyword-only parameter for and each such parameter without a default that is not in ``given``.

    For a method that forwards ``**options`` to ``takes``: ``where`` names that method, which the
    user called, not ``takes``, which Python's own TypeError would name.
    """
    names = set(given)
    params = [p for p in inspect.signature(takes).parameters.values() if p.kind is p.KEYWORD_ONLY]
    accepted = [p.name for p in params]
    problems = []
    suggested = set()
    for name in sorted(names.difference(accepted)):
        near = difflib.get_close_matches(name, accepted, n=1)
        suggested.update(near)
        problems.append(
            f"{name}: no such option (did you mean {near[0]}?)"
            if near
            else f"{name}: no such option; the options are {', '.join(accepted)}"
        )
    for param in params:
        # a required option misspelled is said once, by its did-you-mean
        if param.default is param.empty and param.name not in names and param.name not in suggested:
            problems.append(f"{param.name}: required and not given; pass {param.name}=...")
    if problems:
        raise InvalidConfiguration(where, problems)
