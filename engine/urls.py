"""URLs as shown to people: in logs, errors, events and dashboards, never with their secrets."""

from __future__ import annotations

from urllib.parse import unquote_plus, urlsplit


def _secret_option(name: str) -> bool:
    """Whether a query option carries a secret: redis-py and libpq both take ``?password=``
    (libpq also ``sslpassword``, redis-py ``sentinel_password`` and the like)."""
    return "password" in unquote_plus(name).lower()


def redact_url(url: str) -> str:
    """``url`` without its password, for logs, errors and ``leadership().backend``: the one in
    the user part and any given as a query option (``redis://host/0?password=...``)."""
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


def shown_url(text: str) -> str:
    """``text`` as a message may echo it: :func:`redact_url`, and for a text too malformed to
    find its password in, only its scheme (``mysql://…``), since the secret could be anywhere."""
    try:
        return redact_url(text)
    except ValueError:  # urlsplit refuses an unbalanced "[" of an IPv6 host
        return text.partition("://")[0] + "://…" if "://" in text else text
