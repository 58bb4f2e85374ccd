"""Calling into an engine's event loop from another thread or another loop.

The engine is not thread-safe: everything it does happens on its loop. The
background thread's facade, the dashboard's local client and the notebook
displays all need the same step, so it lives here once: ship a call to the
loop, run it there (awaiting its result there if it is awaitable), and hand
the result or the exception back to the caller's thread or loop. On the
engine's own loop (or before it has one) the call runs directly.

It also holds the one way a loop of the engine ends a task it owns:
:func:`cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Escaped(Exception):
    """Carries a SystemExit or KeyboardInterrupt raised by a hopped call back to its caller."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except (SystemExit, KeyboardInterrupt) as exc:
        # raised inside the loop these would end it for everyone; they belong to the caller
        raise Escaped(exc) from None
    return result


def submit_to(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
    """Schedule ``fn(*args, **kwargs)`` on ``loop`` from any thread; its result arrives in the future.

    Cancelling the future cancels the call if it has not finished. Raises
    ``RuntimeError`` when ``loop`` is closed. A SystemExit or KeyboardInterrupt
    from ``fn`` arrives as :class:`Escaped`.
    """
    return asyncio.run_coroutine_threadsafe(_invoke(fn, args, kwargs), loop)


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await ``fn(*args, **kwargs)`` run on ``loop``, from a coroutine on any loop."""
    if loop is None or loop is _current_loop():
        result = fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result
    try:
        return await asyncio.wrap_future(submit_to(loop, fn, *args, **kwargs))
    except Escaped as escaped:
        raise escaped.exc from None


def call_blocking(
    loop: asyncio.AbstractEventLoop | None, fn: Callable[..., T], *args: Any, timeout: float | None = 5.0, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` run on ``loop``, waiting for it on this thread (``fn`` must not be async).

    On the loop's own thread, or when the loop is not running, it runs here.
    """
    if loop is None or loop.is_closed() or not loop.is_running() or loop is _current_loop():
        return fn(*args, **kwargs)
    try:
        return submit_to(loop, fn, *args, **kwargs).result(timeout)  # type: ignore[no-any-return]
    except Escaped as escaped:
        raise escaped.exc from None


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended, without raising what it raised."""
    if task is None:
        return
    task.cancel()
    # asyncio.wait, unlike awaiting the task, leaves a cancel of the caller itself alone
    await asyncio.wait([task])
