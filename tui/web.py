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

Used by ``taskwatch web`` and, in a subprocess, by ``BackgroundEngine.dashboard()``,
which hands the secret over in ``$TASKWATCH_WEB_SECRET`` so it never shows in ``ps``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from textual_serve.server import Server

log = logging.getLogger("taskwatch.web")

#: how a parent process hands the secret to the web server (argv would show it in ``ps``)
SECRET_ENV = "TASKWATCH_WEB_SECRET"
#: the secret is a path segment: URL-safe characters only, and long enough not to be guessed
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{22,}")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

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
    (``localhost`` vs ``127.0.0.1``) are the same machine -- textual-serve's page
    points its websocket at the bind address, which may differ from what the
    user typed. ``null`` and non-http(s) origins never match.
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


class DashboardServer(Server):
    """textual-serve's :class:`~textual_serve.server.Server`, reachable only under ``/<secret>/``.

    Relies on these textual-serve details (checked by tests/test_web_security.py):
    ``Server._make_app()`` builds the aiohttp app that ``serve()`` runs, and its
    index page makes its websocket and static URLs with ``request.app.router[name].url_for()``,
    so mounting that app as a sub-application under ``/<secret>`` puts the secret
    in every URL the page uses. The secret goes in the path, not the query,
    because textual-serve's JavaScript appends ``?width=..&height=..`` to the
    websocket URL. ``/download/{key}`` (``App.deliver_*``, which taskwatch does
    not use) is fetched from the site root by that JavaScript and so stays refused.
    """

    def __init__(
        self,
        command: str,
        *,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        title: str = "taskwatch",
    ) -> None:
        super().__init__(
            command, host=host, port=port, title=title, public_url=base_url(host, port),
            # our copy of the page, whose font comes from this server instead of Google's
            templates_path=Path(__file__).with_name("templates"),
        )
        self.secret = check_secret(secret)
        self.url = dashboard_url(host, port, self.secret)

    async def _make_app(self) -> web.Application:
        inner = await super()._make_app()
        outer = web.Application(middlewares=[self._guard])
        outer.add_subapp(f"/{self.secret}", inner)
        outer.on_response_prepare.append(_private_headers)
        return outer

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # middlewares run for unmatched paths too, so this answers every request
        first = request.path.lstrip("/").partition("/")[0]
        if not hmac.compare_digest(first.encode(), self.secret.encode()):
            raise web.HTTPForbidden(text="taskwatch web: open the URL printed when the server started\n")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not same_origin(origin, request.host):
            log.warning("refused a request from origin %r (served as %r)", origin, request.host)
            raise web.HTTPForbidden(text="taskwatch web: cross-origin request refused\n")
        return await handler(request)

    def serve(self, debug: bool = False) -> None:
        """textual-serve's ``serve()``, on sockets bound first.

        A port in use or a host that does not resolve raises :class:`OSError`
        before anything is printed; the URL is printed once the server listens,
        with the port actually bound (the one the system chose for port 0).
        """
        socks = bind_sockets(self.host, self.port)
        try:
            self.port = socks[0].getsockname()[1]
            self.public_url = base_url(self.host, self.port)
            self.url = dashboard_url(self.host, self.port, self.secret)
            self.debug = debug
            self.initialize_logging()
            loop = asyncio.new_event_loop()
            try:
                loop.add_signal_handler(signal.SIGINT, self.request_exit)
                loop.add_signal_handler(signal.SIGTERM, self.request_exit)
            except NotImplementedError:
                pass
            # aiohttp calls ``print`` once every socket listens
            web.run_app(self._make_app(), sock=socks, handle_signals=False, loop=loop, print=self._listening)
        finally:
            for sock in socks:
                sock.close()

    def _listening(self, *_: object) -> None:
        print(f"taskwatch web: open {self.url}  (Ctrl+C to quit)", flush=True)
        if not is_loopback_host(self.host):
            print(
                f"taskwatch web: listening on {self.host}, not just this machine; the URL is the only "
                "key and the connection is unencrypted",
                file=sys.stderr,
                flush=True,
            )

    def initialize_logging(self) -> None:
        super().initialize_logging()
        # aiohttp's access log writes every request line, secret included
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    async def on_startup(self, app: web.Application) -> None:
        # runs before the sockets listen: the URL is printed by _listening, once they do
        # (textual-serve's own banner, which this replaces, is not shown)
        return None


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
    from_env = os.environ.pop(SECRET_ENV, None)
    DashboardServer(command, secret=secret or from_env or new_secret(), host=host, port=port, title=title).serve()
