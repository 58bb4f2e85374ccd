"""The engine's log lines: what it writes of users' values, and how often it says a thing.

- :func:`log_text`: a user's text (an exception's message) fit for one log line, so that
  no value can forge another record; :func:`traceback_block`: a traceback as the lines
  after a record's first;
- :func:`log_safely`: a log call that a raising handler cannot turn into a failure of the
  work that logs (a run's bookkeeping, a worker's restart);
- :class:`OutageLog`: how a loop that retries a failing call says so once per outage.
  A store out of reach fails every loop that uses it (claims, heartbeats, recovery, each
  periodic task, trigger and queue), once a second or more, for as long as it lasts; a
  traceback for each try would bury the one line that matters, and say nothing when it
  ends. The first failure of a streak is a warning (an outage's error by its message,
  which says what to check; anything else with its traceback, a bug to report), the rest
  are debug (an error of another kind within the streak is said once too), and the first
  success after them one info line with how long it lasted.
"""

from __future__ import annotations

import logging
import re
import time

from .errors import StoreError
from .runs import RunError

#: characters of a user's text (an exception's message) a log line's first line shows at most
LOG_TEXT_LIMIT = 500
#: what would end or garble a log line: C0 and C1 control characters, DEL, and the Unicode line
#: and paragraph separators (str.splitlines breaks at them)
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_text(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """``text`` (a user's: an exception's message) fit for one log line: at most ``limit``
    characters, and each character that would break the line escaped (a newline as ``\\n``),
    so that no value can start a line that reads as another record of a collector."""
    if len(text) > limit:
        text = f"{text[:limit]}[... {len(text) - limit} more characters]"
    return _LINE_BREAKING.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def traceback_block(error: RunError) -> str:
    """``error``'s traceback as the lines following a log record's first ("" if it has none):
    multi-line, as ``exc_info`` would make it."""
    text = error.traceback.rstrip("\n")
    return "\n" + text if text else ""


def log_safely(
    logger: logging.Logger, level: int, msg: str, *args: object, exc_info: BaseException | None = None
) -> None:
    """``logger.log(level, msg, *args)``, where a handler that raises (a broken log shipper's,
    raising from its ``emit`` or a filter, which ``Handler.handleError`` never sees) must not
    stop the work that logs: a run's bookkeeping, a worker's restart, a queue's consumer."""
    try:
        logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)  # the caller's line, not this one
    except Exception:  # noqa: BLE001 - the handler's failure is its own; the engine goes on
        pass


class OutageLog:
    """The log lines of one retrying loop's failure streaks."""

    __slots__ = ("_log", "_what", "_expected", "_since", "_failures", "_said")

    def __init__(
        self, log: logging.Logger, what: str, expected: tuple[type[BaseException], ...] = (StoreError,)
    ) -> None:
        self._log = log
        #: what failed, as the lines say it ("claiming runs", "periodic task 'sync'")
        self._what = what
        #: the errors of an outage, whose message says it all: anything else is a bug to report,
        #: and its first line carries the traceback
        self._expected = expected
        self._since: float | None = None
        self._failures = 0
        #: the kinds of error the streak has said: one of another kind is said too, once
        self._said: set[type[BaseException]] = set()

    def failed(self, exc: BaseException, retry: str, *, ends: bool = False) -> None:
        """A try failed; ``retry`` says what happens next ("trying again in 1 s"). ``ends``: it
        left nothing to try again, so it is said, and the streak (if any) ends with it."""
        if ends:
            self._since, self._failures = None, 0
            self._said.clear()
            self._say(exc, retry, "")
            return
        self._failures += 1
        if type(exc) in self._said:
            log_safely(self._log, logging.DEBUG, "%s failed again (%s); %s", self._what, _named(exc), retry, exc_info=exc)
            return
        # the first failure of a streak, or one of another kind within it (an outage that turns
        # into a bug, or the other way round): each is said once
        if self._since is None:
            self._since = time.monotonic()
        self._said.add(type(exc))
        self._say(exc, retry, f" ({_UNTIL_IT_WORKS})")

    def _say(self, exc: BaseException, retry: str, then: str) -> None:
        if isinstance(exc, self._expected):
            # a store error's message names the store, what failed and what to check, a driver's
            # what the network said: the traceback would only show the engine's own frames
            log_safely(self._log, logging.WARNING, "%s failed (%s); %s%s", self._what, _named(exc), retry, then)
        else:
            log_safely(self._log, logging.ERROR, "%s failed; %s%s", self._what, retry, then, exc_info=exc)

    def given_up(self, why: str) -> None:
        """Nothing is left to try again (``why``): the streak ends unresolved, said once, and the
        next failure is said again as a new streak's first."""
        if self._since is None:
            return
        self._since, self._failures = None, 0
        self._said.clear()
        log_safely(self._log, logging.INFO, "%s: %s; nothing is left to try again", self._what, why)

    def succeeded(self) -> None:
        """A try worked: the end of a streak is said once."""
        if self._since is None:
            return
        lasted = time.monotonic() - self._since
        failures, self._since, self._failures = self._failures, None, 0
        self._said.clear()
        log_safely(
            self._log, logging.INFO, "%s works again after %.1f s (%d failed %s)", self._what, lasted, failures,
            "try" if failures == 1 else "tries",
        )


_UNTIL_IT_WORKS = "further failures are logged at debug level until it works again"


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
