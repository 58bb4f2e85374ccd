"""The browser dashboard: textual-serve behind a per-launch secret and an Origin check.

textual-serve on its own serves anyone who can reach the port, and its
websocket accepts connections from any web page: a page the user merely visits
could open ``ws://127.0.0.1:8000/ws`` and type into the dashboard (cancel runs,
submit tasks). :class:`DashboardServer` closes that:

- every page, asset and the websocket live under ``/<secret>/``, a
  :func:`secrets.token_urlsafe` value made per launch; any other path gets 403
  before textual-serve sees it, so nothing without the secret spawns an app;
- a request that carries an ``Origin`` header is served only when that origin
  is this server (same host and port as the request's ``Host``, where
  ``localhost``, ``127.0.0.1`` and ``::1`` count as the same machine);
  browsers always send ``Origin`` on websocket handshakes, so a foreign page
  is refused even if it learned the secret. A client without ``Origin`` (not
  a browser) still needs the secret;
- it listens on 127.0.0.1 unless given another host.

The page's URLs (assets, websocket) are built from the request's ``Host``, not
the bind address, so the page works however it was reached: a LAN address of a
server listening on 0.0.0.0, or an SSH port forward to another local port.

Each browser tab runs the command in a process group of its own; the tab's
websocket closes when that process ends, and on SIGINT/SIGTERM every session is
asked to quit (then its group killed) and every websocket closed, so the server
exits within a couple of seconds and leaves no session process behind. A server
killed outright (SIGKILL) cannot do that: its sessions' stdin pipes close then,
and ``taskwatch attach`` under textual-serve quits when its stdin does.

Used by ``taskwatch web`` and, in a subprocess, by ``BackgroundEngine.dashboard()``,
which hands the secret over in ``$TASKWATCH_WEB_SECRET`` so it never shows in ``ps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
from aiohttp import WSCloseCode, hdrs, web
from rich.console import Console
from rich.logging import RichHandler
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

log = logging.getLogger("taskwatch.web")

#: how a parent process hands the secret to the web server (argv would show it in ``ps``)
SECRET_ENV = "TASKWATCH_WEB_SECRET"
#: the secret is a path segment: URL-safe characters only, and long enough not to be guessed
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{22,}")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
#: a ``Host`` header the page's URLs may be built from: a name or IPv4 address, or a bracketed IPv6 one
_HOST_HEADER_RE = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
#: seconds a session has to quit when asked (its tab closed, or the server stopping) before its group is killed
SESSION_QUIT_GRACE = 1.0
#: seconds a websocket close waits for the browser's answer
_WS_CLOSE_TIMEOUT = 1.0
#: aiohttp's last resort at exit: handlers still running after this are cancelled
_SHUTDOWN_TIMEOUT = 3.0
#: `taskwatch web APP`'s private directory: this prefix, the server's pid, "-", tempfile's random part
_PRIVATE_PREFIX = "taskwatch-web-"
_PRIVATE_RE = re.compile(r"taskwatch-web-([0-9]+)-[a-z0-9_]+")
#: the engine's socket in that directory, where every session attaches
ENGINE_SOCKET = "engine.sock"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SecretError(ValueError):
    """A secret that cannot protect the dashboard (too short, or not URL-safe)."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def check_secret(secret: str) -> str:
    if not _SECRET_RE.fullmatch(secret):
        raise SecretError("the web dashboard secret must be at least 22 URL-safe characters ([A-Za-z0-9_-])")
    return secret


def base_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def dashboard_url(host: str, port: int, secret: str) -> str:
    """The URL to open: the secret is its first path segment."""
    return f"{base_url(host, port)}/{secret}/"


def is_wildcard_host(host: str) -> bool:
    """Whether ``host`` means every interface (``0.0.0.0``, ``::``), which no browser can open."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_host(host: str) -> str:
    """``host``, unless it is empty (which would listen on every interface without saying so)."""
    if not host.strip():
        raise ValueError("the host to listen on is empty; give 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    return host


def shown_host(host: str) -> str:
    """The host to print in the URL: a wildcard bind address is replaced by this machine's name."""
    if is_wildcard_host(host):
        return socket.gethostname() or "localhost"
    return host


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(netloc_or_url: str, default_port: int) -> tuple[str, int] | None:
    """(hostname, port) of ``http://h:p`` or of a bare ``h:p``; None if it does not parse."""
    parts = urlsplit(netloc_or_url if "//" in netloc_or_url else f"//{netloc_or_url}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else default_port


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a browser ``Origin`` names the server the request was sent to (its ``Host``).

    Ports must match; host names must match, except that two loopback names
    (``localhost`` vs ``127.0.0.1``) are the same machine -- a notebook's IFrame
    may name this server either way. ``null`` and non-http(s) origins never match.
    """
    scheme = urlsplit(origin).scheme.lower()
    if scheme not in ("http", "https"):
        return False
    default = 443 if scheme == "https" else 80
    mine = _host_port(origin, default)
    theirs = _host_port(host_header, default)
    if mine is None or theirs is None or mine[1] != theirs[1]:
        return False
    return mine[0] == theirs[0] or (is_loopback_host(mine[0]) and is_loopback_host(theirs[0]))


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` at ``port``, not yet listening (as asyncio binds).

    With port 0 the first gets a free port and the others the same one. Raises
    :class:`OSError` (a :class:`socket.gaierror` for a host that does not resolve,
    ``EADDRINUSE`` for a port in use), with no socket left open.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(infos):
            if socks and port == 0:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class _Session(AppService):
    """One browser tab's dashboard process: textual-serve's :class:`AppService`, changed through its hooks.

    The process gets ``extra_env`` on top of this process's environment, and a
    session (so a process group) of its own: the shell textual-serve runs the
    command in and the dashboard under it are ended together, without signalling
    the server. ``ended`` is set once the process's output has ended.
    """

    def __init__(self, command: str, *, extra_env: Mapping[str, str], **options: Any) -> None:
        super().__init__(command, **options)
        self.extra_env = dict(extra_env)
        self.ended = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        environment = super()._build_environment(width=width, height=height)
        environment.update(self.extra_env)
        return environment

    async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
        environment = self._build_environment(width=width, height=height)
        pipe = asyncio.subprocess.PIPE
        process = await asyncio.create_subprocess_shell(
            self.command, stdin=pipe, stdout=pipe, stderr=pipe, env=environment, start_new_session=True
        )
        assert process.stdin is not None
        # the attributes AppService's own version sets, which its send and read methods use
        self.process = self._process = process
        self._stdin = process.stdin
        return process

    async def run(self) -> None:
        try:
            await super().run()
        except ConnectionError as exc:
            # the browser went away while its screen was being sent (a tab closed, a client that
            # stopped reading): the websocket's end, not a fault; the session is ended below
            log.debug("a dashboard session's websocket closed while it was written to: %r", exc)
        finally:
            self.ended.set()

    async def end(self, grace: float) -> None:
        """Ask the process to quit; if it has not after ``grace`` s, SIGTERM its group, then SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            # bounded: a process that stopped reading would block the write forever
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.send_meta({"type": "quit"}), grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), grace)
                break
            self._signal_group(process.pid, sig)
        await process.wait()
        if process.stdin is not None:
            # the process's transport ends once its pipes have: left open, it is closed only when
            # collected, which may be after the loop closed ("Event loop is closed" at exit)
            process.stdin.close()
        try:
            # the output ends once every process of the group has gone
            await asyncio.wait_for(self.ended.wait(), grace)
        except TimeoutError:
            # something the dashboard started still holds its output (the group outlived its
            # leader), or run() is stuck sending the screen to a browser that stopped reading
            self._signal_group(process.pid, signal.SIGKILL)
            if self._task is not None:
                self._task.cancel()  # run() takes a cancel as its end, and stops reading the pipes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), grace)
        # what run() left unread (it stops early when the websocket fails): read to the end, so
        # that the pipes, and with them the process's transport, close on this loop (left open, it
        # is closed when collected, after the loop closed: "Event loop is closed" at exit)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                # RuntimeError: run() still reads it (an escaped process holds the output open)
                with contextlib.suppress(TimeoutError, RuntimeError):
                    await asyncio.wait_for(_read_to_end(stream), grace)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


async def _read_to_end(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


class DashboardServer(Server):
    """textual-serve's :class:`~textual_serve.server.Server`, reachable only under ``/<secret>/``.

    Relies on these textual-serve details (checked by tests/test_web_security.py
    and tests/test_web.py): ``Server._make_app()`` builds the aiohttp app that
    ``serve()`` runs, routing ``/`` to ``handle_index``, ``/ws`` to
    ``handle_websocket`` and ``/static``, with ``on_shutdown`` on its shutdown
    signal; mounting that app as a sub-application under ``/<secret>`` puts the
    secret in every URL the page uses (``url_for()``). The secret goes in the
    path, not the query, because textual-serve's JavaScript appends
    ``?width=..&height=..`` to the websocket URL. ``/download/{key}``
    (``App.deliver_*``, which taskwatch does not use) is fetched from the site
    root by that JavaScript and so stays refused. A session is textual-serve's
    ``AppService`` with ``_build_environment`` and ``_open_app_process``
    replaced, whose ``_task`` (``run()``, started by ``start()``) it cancels
    when that is stuck writing to a browser (see :class:`_Session`).

    ``env`` is added to each session's environment (a token, kept off argv).
    """

    def __init__(
        self,
        command: str,
        *,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        title: str = "taskwatch",
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_host(host)
        super().__init__(
            command, host=host, port=port, title=title, public_url=base_url(shown_host(host), port),
            # our copy of the page, whose font comes from this server instead of Google's
            templates_path=Path(__file__).with_name("templates"),
        )
        self.secret = check_secret(secret)
        self.env: dict[str, str] = dict(env or {})
        self.url = dashboard_url(shown_host(host), port, self.secret)
        self._stopping = asyncio.Event()
        #: one event per open session, set once its process has ended and its websocket closed
        self._sessions: set[asyncio.Event] = set()

    async def _make_app(self) -> web.Application:
        inner = await super()._make_app()
        outer = web.Application(middlewares=[self._guard])
        outer.add_subapp(f"/{self.secret}", inner)
        outer.on_response_prepare.append(_private_headers)
        return outer

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # middlewares run for unmatched paths too, so this answers every request
        first, sep, _ = request.path.lstrip("/").partition("/")
        if not hmac.compare_digest(first.encode(), self.secret.encode()):
            raise web.HTTPForbidden(text="taskwatch web: open the URL printed when the server started\n")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not same_origin(origin, request.host):
            log.warning("refused a request from origin %r (served as %r)", origin, request.host)
            raise web.HTTPForbidden(text="taskwatch web: cross-origin request refused\n")
        if not sep:
            # the URL typed without its final slash: the page lives at /<secret>/
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPFound(f"/{self.secret}/{query}")
        return await handler(request)

    @aiohttp_jinja2.template("app_index.html")
    async def handle_index(self, request: web.Request) -> dict[str, Any]:
        """textual-serve's page, its URLs on the host and port the browser used.

        Not the bind address: through ``--host 0.0.0.0`` and a LAN address, or an
        SSH forward to another local port, the browser must come back the way it came.
        """
        host = request.headers.get(hdrs.HOST, "")
        # the Host is written into the page: only a plain host[:port] is
        if not _HOST_HEADER_RE.fullmatch(host):
            raise web.HTTPBadRequest(text="taskwatch web: the request's Host header is missing or malformed\n")
        router = request.app.router
        static = f"{request.scheme}://{host}{router['static'].url_for(filename='/')}".rstrip("/") + "/"
        ws_scheme = "wss" if request.scheme == "https" else "ws"
        return {
            "font_size": to_int(request.query.get("fontsize", "16"), 16),
            "app_websocket_url": f"{ws_scheme}://{host}{router['websocket'].url_for()}",
            "config": {"static": {"url": static}},
            "application": {"name": self.title},
        }

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """One browser tab: its dashboard process, for as long as both last.

        The websocket closes when the process ends (the user quit, or it failed
        to start); the process is asked to quit when the websocket closes or the
        server stops, and its group killed if it does not.
        """
        websocket = web.WebSocketResponse(heartbeat=15, timeout=_WS_CLOSE_TIMEOUT)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        await websocket.prepare(request)
        if self._stopping.is_set():
            await websocket.close(code=WSCloseCode.GOING_AWAY)
            return websocket
        finished = asyncio.Event()
        self._sessions.add(finished)
        session = _Session(
            self.command,
            extra_env=self.env,
            write_bytes=websocket.send_bytes,
            write_str=websocket.send_str,
            close=websocket.close,
            download_manager=self.download_manager,
            debug=self.debug,
        )
        waiters: list[asyncio.Future[Any]] = []
        try:
            await session.start(width, height)
            waiters = [
                asyncio.ensure_future(self._process_messages(websocket, session)),
                asyncio.ensure_future(session.ended.wait()),
                asyncio.ensure_future(self._stopping.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except Exception:
            log.exception("a dashboard session failed")
        finally:
            code = WSCloseCode.GOING_AWAY if self._stopping.is_set() else WSCloseCode.OK
            await asyncio.gather(session.end(SESSION_QUIT_GRACE), _close(websocket, code), return_exceptions=True)
            for waiter in waiters:
                waiter.cancel()
            for outcome in await asyncio.gather(*waiters, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("a dashboard session's websocket failed: %r", outcome)
            await self.download_manager.cancel_app_downloads(app_service_id=session.app_service_id)
            finished.set()
            self._sessions.discard(finished)
        return websocket

    async def on_shutdown(self, app: web.Application) -> None:
        # open websockets would hold aiohttp's shutdown until their heartbeat failed
        # (about 20 s); every session is ended here instead, its process group with it
        self._stopping.set()
        if self._sessions:
            waits = [asyncio.ensure_future(done.wait()) for done in self._sessions]
            _, pending = await asyncio.wait(waits, timeout=3 * SESSION_QUIT_GRACE + _WS_CLOSE_TIMEOUT + 1)
            for waiter in pending:
                waiter.cancel()

    def request_exit(self) -> None:
        # a second Ctrl+C while the sessions are ended would cut that short and orphan them
        if not self._stopping.is_set():
            self._stopping.set()
            super().request_exit()

    def bind(self) -> list[socket.socket]:
        """Bind the listening sockets (see :func:`bind_sockets`) and settle the port and URL."""
        socks = bind_sockets(self.host, self.port)
        self.port = socks[0].getsockname()[1]
        self.public_url = base_url(shown_host(self.host), self.port)
        self.url = dashboard_url(shown_host(self.host), self.port, self.secret)
        return socks

    def serve(
        self,
        debug: bool = False,
        *,
        sockets: list[socket.socket] | None = None,
        on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
    ) -> None:
        """textual-serve's ``serve()``, on sockets bound first (``sockets``, else :meth:`bind` now).

        A port in use or a host that does not resolve raises :class:`OSError`
        before anything is printed; the URL is printed once the server listens,
        with the port actually bound (the one the system chose for port 0).
        Returns after SIGINT or SIGTERM, once every session has ended.
        ``on_loop`` is called with the server's event loop before it runs:
        signal handlers it adds there replace those two (which call
        :meth:`request_exit`).
        """
        socks = self.bind() if sockets is None else sockets
        try:
            self.debug = debug
            self.initialize_logging()
            loop = asyncio.new_event_loop()
            try:
                loop.add_signal_handler(signal.SIGINT, self.request_exit)
                loop.add_signal_handler(signal.SIGTERM, self.request_exit)
            except NotImplementedError:
                pass
            if on_loop is not None:
                on_loop(loop)
            # aiohttp calls ``print`` once every socket listens
            web.run_app(
                self._make_app(), sock=socks, handle_signals=False, loop=loop, print=self._listening,
                shutdown_timeout=_SHUTDOWN_TIMEOUT,
            )
        finally:
            for sock in socks:
                sock.close()

    def _listening(self, *_: object) -> None:
        print(f"taskwatch web: open {self.url}  (Ctrl+C to quit)", flush=True)
        if is_wildcard_host(self.host):
            print(
                f"taskwatch web: listening on every interface ({self.host}), not just this machine; from "
                f"elsewhere use any address of this machine in place of {shown_host(self.host)}; the URL "
                "is the only key and the connection is unencrypted",
                file=sys.stderr,
                flush=True,
            )
        elif not is_loopback_host(self.host):
            print(
                f"taskwatch web: listening on {self.host}, not just this machine; the URL is the only "
                "key and the connection is unencrypted",
                file=sys.stderr,
                flush=True,
            )

    def initialize_logging(self) -> None:
        """textual-serve's logging, without what would leak the secret or a session's token.

        Its handler prints tracebacks with every frame's local variables: a malformed
        request's raw bytes (the secret path), a session's environment (the token).
        Here tracebacks show no locals, and any record that still holds the secret
        is written with it masked.
        """
        # log lines on stderr: stdout carries the URL line that bg.dashboard() reads
        self.console = Console(stderr=True)
        handler = RichHandler(
            show_path=False,
            show_time=False,
            rich_tracebacks=True,
            tracebacks_show_locals=False,
            console=self.console,
        )
        handler.addFilter(_Masked(self.secret))
        logging.basicConfig(
            level="DEBUG" if self.debug else "INFO", format="%(message)s", handlers=[handler], force=True
        )
        # aiohttp's access log writes every request line, secret included
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    async def on_startup(self, app: web.Application) -> None:
        # runs before the sockets listen: the URL is printed by _listening, once they do
        # (textual-serve's own banner, which this replaces, is not shown)
        return None


class _Masked(logging.Filter):
    """Writes a record that holds ``secret`` anywhere (message, arguments, exception) as plain
    text with the secret masked, its traceback included: the URL is the dashboard's only key."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self._plain = logging.Formatter("%(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        cached = record.exc_text
        text = self._plain.format(record)
        record.exc_text = cached  # format() caches the traceback's text, which the handler would then append
        if self.secret in text:
            record.msg = text.replace(self.secret, "<secret>")
            record.args = None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


async def _close(websocket: web.WebSocketResponse, code: int) -> None:
    # bounded: a browser that stopped reading would hold the close on a full socket
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(websocket.close(code=code), 2 * _WS_CLOSE_TIMEOUT)


async def _private_headers(request: web.Request, response: web.StreamResponse) -> None:
    # the page loads nothing from elsewhere; should that change, the secret URL stays out of Referer
    response.headers["Referrer-Policy"] = "no-referrer"


def serve(
    command: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    secret: str | None = None,
    title: str = "taskwatch",
) -> None:
    """Serve ``command`` (run once per browser session) until SIGINT/SIGTERM.

    The secret is ``secret``, else ``$TASKWATCH_WEB_SECRET``, else a new one.
    The variable is removed from this process's environment so the sessions,
    which inherit it, do not see it.
    """
    from_env = take_secret()
    DashboardServer(command, secret=secret or from_env, host=host, port=port, title=title).serve()


def exit_when_stdin_closes() -> None:
    """SIGTERM this process (so it ends its sessions and exits) once its stdin reaches EOF.

    ``bg.dashboard()`` starts the server with a pipe on stdin that it never
    writes to: the pipe closes when that process dies, however it dies
    (SIGKILL, a notebook kernel killed), and the server must not outlive it
    holding the port and a secret URL.
    """

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass  # no stdin at all: nothing to watch for, and nothing holds this process
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="taskwatch-web-parent", daemon=True).start()


@contextlib.contextmanager
def private_directory() -> Iterator[str]:
    """A new directory only this user can enter, removed on exit, named with this process's pid.

    A server killed outright (SIGKILL, the OOM killer) cannot remove its own: each
    one first removes those a dead server left (:func:`remove_abandoned_directories`).
    """
    remove_abandoned_directories()
    with tempfile.TemporaryDirectory(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-") as path:
        yield path


def remove_abandoned_directories(parent: str | None = None) -> list[str]:
    """Remove this user's private directories (in ``parent``, default the temp dir) whose
    server has gone; the paths removed.

    Gone means both: no process has the pid in the name, and nothing answers on the
    engine socket inside (a /tmp shared with another PID namespace, or a reused pid,
    keeps a directory rather than losing a live one).
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent or tempfile.gettempdir()))
    except OSError:
        return removed
    for entry in entries:
        match = _PRIVATE_RE.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if _running(int(match[1])) or _answers(os.path.join(entry.path, ENGINE_SOCKET)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _answers(path: str) -> bool:
    """Whether something listens on the Unix socket ``path`` (unsure counts as yes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True
    return True


def take_secret() -> str:
    """``$TASKWATCH_WEB_SECRET``, else a new secret; the variable is removed from the
    environment, which sessions inherit."""
    return os.environ.pop(SECRET_ENV, None) or new_secret()
