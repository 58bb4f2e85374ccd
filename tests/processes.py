"""A child process that reports what it does as JSON lines, read on a thread of the test.

The base of the crash tests' children (``test_durable.Child``) and of the
lease nodes (``lease_nodes.LeaseNode``): every complete line is kept, with
the wall-clock time it was read (``seen``), and tests wait on them with a
bounded timeout instead of sleeping.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

Line = dict[str, Any]


class JsonLineProcess:
    def __init__(self, cmd: Sequence[str], name: str, default_timeout: float) -> None:
        self.name = name
        self.default_timeout = default_timeout
        self.proc = subprocess.Popen(
            list(cmd), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.lines: list[Line] = []
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{name}-{self.proc.pid}")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a line cut short by SIGKILL was never a complete report
            line["seen"] = time.time()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Line], bool], timeout: float | None = None, *, start: int = 0) -> Line:
        """The first line from index ``start`` on matching ``pred``, waiting up to ``timeout`` s for it."""
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "exited" if self.eof else f"printed nothing matching within {timeout} s"
                    raise AssertionError(
                        f"{self.name} (pid {self.proc.pid}) {why} (rc={self.proc.poll()}); last lines: {self.lines[-5:]}"
                    )
                self._cond.wait(left)

    def event(self, ev: str, timeout: float | None = None) -> Line:
        return self.wait_for(lambda line: line.get("ev") == ev, timeout)

    def mark(self) -> int:
        """An index for ``wait_for(start=...)``: only lines printed from now on."""
        with self._cond:
            return len(self.lines)

    def of(self, ev: str, **match: Any) -> list[Line]:
        """The ``ev`` lines printed so far whose fields equal ``match``."""
        return self.since(0, ev, **match)

    def since(self, mark: int, ev: str, **match: Any) -> list[Line]:
        """The ``ev`` lines (matching ``match``) printed from index ``mark`` on."""
        with self._cond:
            lines = self.lines[mark:]
        return [line for line in lines if line.get("ev") == ev and all(line.get(k) == v for k, v in match.items())]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Kill the child if it still runs, and let go of its reader and pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def send(self, text: str) -> None:
        """One line on the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
