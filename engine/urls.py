"""URLs as shown to people: in logs, errors, events and dashboards, never with their secrets."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

#: what may follow the '@' that ends a URL's user part, up to its path, query or fragment: a
#: host (a name, an address, [an IPv6 address]) and a port, or several (PostgreSQL's
#: db1:5432,db2:5432), or nothing (redis-py's unix://user:pw@/path.sock)
_HOST = re.compile(r"[\w.~%\[\]:,-]*(?=[/?#]|\Z)")

#: where urlsplit ends a URL's host and port, and where it starts its query or fragment
_AUTHORITY_END = re.compile(r"[/?#]")
_QUERY_START = re.compile(r"[?#]")
_AT = re.compile("@")


def _secret_option(name: str) -> bool:
    """Whether a query option carries a secret: redis-py and libpq both take ``?password=``
    (libpq also ``sslpassword``, redis-py ``sentinel_password`` and the like)."""
    return "password" in unquote_plus(name).lower()


def _plain_host(hostport: str) -> bool:
    """Whether what urlsplit takes for a URL's host and port is one (a port alone, or one that
    is no number, is the rest of a password that held a '/', '?' or '#')."""
    if hostport.startswith(":"):
        return False
    try:
        urlsplit("//" + hostport).port
    except ValueError:
        return False
    return True


def _password_end(url: str) -> int | None:
    """Where in ``url`` the '@' ending a user part with a password is (None: no password there).

    The user part runs from '://' to the last '@' before the host. urlsplit ends it (and
    the host) at the first '/', '?' or '#', which a generated password often holds: the
    password's rest would be taken for a port, a path or a query, and shown. Only where
    urlsplit's own host and port read as such, an '@' in what reads as a query option's
    value is taken for the value's (``?application_name=me@corp``).
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    head = _AUTHORITY_END.search(url, start)
    netloc = url[start : head.start() if head else len(url)]
    ends = [m.start() for m in _AT.finditer(url, start) if _HOST.match(url, m.end())]
    if _plain_host(netloc.rpartition("@")[2]):
        query = _QUERY_START.search(url, start)
        if query is not None:
            ends = [at for at in ends if at < query.start() or "=" not in url[query.start() : at]]
    if not ends or ":" not in url[start : ends[-1]]:
        return None
    return ends[-1]


def redact_url(url: str) -> str:
    """``url`` without its password, for logs, errors and ``leadership().backend``: the one in
    the user part (whatever it holds, a '/', '?' or '#' not percent-encoded too) and any given
    as a query option (``redis://host/0?password=...``)."""
    at = _password_end(url)
    if at is not None:
        start = url.index("://") + 3
        user = url[start:at].partition(":")[0]
        # the rest as any URL without a user part: its query may hold a password too
        rest = _redact_plain(url[:start] + url[at + 1 :]).partition("://")[2]
        return url[:start] + (f"{user}:***@" if user else "***@") + rest
    return _redact_plain(url)


def _redact_plain(url: str) -> str:
    """:func:`redact_url` for a URL whose user part, if any, urlsplit reads as it is meant."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        # host and port as written (hostname would lose an IPv6 address's brackets)
        host = netloc.rpartition("@")[2]
        netloc = (f"{parts.username}:***@" if parts.username else "***@") + host
    # the query is rewritten option by option, so everything else stays exactly as written
    options = parts.query.split("&") if parts.query else []
    query = "&".join(
        f"{option.split('=', 1)[0]}=***" if _secret_option(option.split("=", 1)[0]) else option
        for option in options
    )
    if netloc == parts.netloc and query == parts.query:
        return url
    # by hand: urlunsplit drops the "//" of a URL without a host (unix:///path, postgresql:///db)
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def password_problem(url: str) -> str | None:
    """Why ``url`` cannot be used as written, if its password holds a '/', '?' or '#' that is
    not percent-encoded (None if it does not); the password is not quoted.

    Every driver (redis-py, asyncpg, libpq) ends the user part there and reads the rest
    of the password as a port, a path or a query: a connection to the wrong place, or an
    error quoting part of the password. Prefix it with where the URL was given.
    """
    at = _password_end(url)
    if at is None or not _AUTHORITY_END.search(url, url.index("://") + 3, at):
        return None
    return (
        "its password holds a '/', '?' or '#' that is not percent-encoded, which ends the user part "
        "there for every driver (the rest would be read as a port, a path or a query); "
        "percent-encode the password: urllib.parse.quote(password, safe='') writes '/' as %2F, "
        "'?' as %3F and '#' as %23"
    )


def shown_url(text: str) -> str:
    """``text`` as a message may echo it: :func:`redact_url`, and for a text too malformed to
    find its password in, only its scheme (``mysql://…``), since the secret could be anywhere."""
    try:
        return redact_url(text)
    except ValueError:  # urlsplit refuses an unbalanced "[" of an IPv6 host
        return text.partition("://")[0] + "://…" if "://" in text else text
