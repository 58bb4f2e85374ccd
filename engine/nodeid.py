"""The default node id: the same after a restart, different for copies running side by side.

A node id must survive a restart, so the next start recognises its previous
incarnation's runs as orphaned and takes them back at once. Two processes
running at the same time under one id would take each other's runs for a
dead predecessor's: two copies of one script on one host (web workers, say)
would each get the same ``host-app`` default. So the default is held: the
first process takes ``host-app``, a second running beside it ``host-app-2``,
and so on, each holding its id with an advisory lock on a small file that the
operating system lets go of when the process ends, however it ends (``kill
-9`` included). A restarted process so takes the id of the one it replaces.
The locks live in the user's temp directory, so copies that do not share it
(other users, systemd's ``PrivateTmp``) cannot see each other: those need ids
given to them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import tempfile
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the plain default is used
    fcntl = None  # type: ignore[assignment]

#: more copies than this running on one host share the plain default id
MAX_SLOTS = 1_000


def base_node_id() -> str:
    """``host-app``. The app is the running script's name (``python -m pkg`` gives ``pkg``);
    a process id would change on every restart and orphan the previous incarnation's runs."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None):
        app = spec.name.removesuffix(".__main__")
    else:
        app = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python"))[0]
    return f"{socket.gethostname()}-{app or 'python'}"


#: the lock descriptors this process holds: a forked child closes its copies (they would keep
#: the parent's ids held after the parent ended, and its restart would not get its id back)
_HELD: set[int] = set()


def _forget_held() -> None:
    for fd in list(_HELD):
        _HELD.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held)


class _Unusable(Exception):
    """No lock can be taken here (read-only or missing temp dir, say): use the plain id."""


def _lock_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    try:
        path = Path(tempfile.gettempdir()) / f"taskwatch-{uid}"
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:  # FileNotFoundError included: gettempdir found no usable directory
        raise _Unusable from exc
    return path


def _try_hold(directory: Path, node_id: str) -> int | None:
    """An open descriptor holding ``node_id``'s lock, or None if a live process holds it."""
    name = hashlib.sha256(node_id.encode()).hexdigest()[:24] + ".lock"
    try:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _Unusable from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None  # held by a live process
        raise _Unusable from exc
    _HELD.add(fd)
    return fd


def _release(fd: int) -> None:
    if fd in _HELD:  # not already closed by a fork
        _HELD.discard(fd)
        os.close(fd)


def hold_default_node_id(owner: object) -> str:
    """The first of ``host-app``, ``host-app-2``, ... no other live process (or object of
    this one) holds; ``owner`` holds it until it is garbage-collected or the process ends."""
    base = base_node_id()
    if fcntl is None:
        return base
    try:
        directory = _lock_dir()
        for slot in range(1, MAX_SLOTS + 1):
            node_id = base if slot == 1 else f"{base}-{slot}"
            fd = _try_hold(directory, node_id)
            if fd is not None:
                weakref.finalize(owner, _release, fd)
                return node_id
    except _Unusable:
        pass
    return base
