"""LeaderBadge: this node's role in leader election, at a glance."""

from __future__ import annotations

from pathlib import Path

from rich.cells import cell_len
from rich.text import Text
from taskwatch.engine import Leadership
from textual.geometry import Size
from textual.reactive import reactive
from textual.widget import Widget

from ._format import clip, fmt_duration, printable

#: cells of the header line the badge leaves to what follows it (the store badge) while it
#: is disconnected: a reason can be longer than the line (a long socket path)
ROOM_LEFT = 12


class LeaderBadge(Widget):
    """Node id, leader/follower, term (the fencing token), lease expiry and uptime.

    ``connected=False`` replaces all of it with a DISCONNECTED state: the
    dashboard may be watching a remote engine whose connection dropped;
    ``reason`` says why the last attempt to reconnect failed.
    ``silent_for`` (seconds) says the engine is connected but not answering (a
    hung process, a network path gone silent): what the badge knew is shown as
    last seen, not as live.
    """

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    # layout=True: the badge is as wide as what it says, so a change may resize it
    node_id: reactive[str] = reactive("", layout=True)
    is_leader: reactive[bool] = reactive(False, layout=True)
    holder: reactive[str | None] = reactive(None, layout=True)
    term: reactive[int] = reactive(0, layout=True)
    #: seconds until the lease expires; None when there is no lease (permanent leader)
    expires_in: reactive[float | None] = reactive(None, layout=True)
    #: seconds since the engine started; None when unknown
    uptime: reactive[float | None] = reactive(None, layout=True)
    connected: reactive[bool] = reactive(True, layout=True)
    #: where the watched engine lives (shown while disconnected), e.g. "tcp://host:7400"
    where: reactive[str | None] = reactive(None, layout=True)
    #: False until the first update, so an empty badge says so instead of "follower"
    known: reactive[bool] = reactive(False, layout=True)
    #: why the dashboard stopped trying to connect for good (None while it still tries)
    failure: reactive[str | None] = reactive(None, layout=True)
    #: whole seconds the connected engine has not answered (None while it answers)
    silent_for: reactive[int | None] = reactive(None, layout=True)
    #: why the last attempt to connect failed (shown while disconnected; None: not known)
    reason: reactive[str | None] = reactive(None, layout=True)

    def update(
        self,
        leadership: Leadership,
        started_at: float | None,
        now: float,
        connected: bool = True,
        silent_for: float | None = None,
        reason: str | None = None,
    ) -> None:
        self.node_id = leadership.node_id
        self.is_leader = leadership.is_leader
        self.holder = leadership.holder
        self.term = leadership.term
        # Rounded so the badge repaints at most ten times a second, not on every call.
        self.expires_in = None if leadership.expires_at is None else round(leadership.expires_at - now, 1)
        self.uptime = None if started_at is None else float(int(now - started_at))
        self.connected = connected
        # whole seconds: the count repaints once a second
        self.silent_for = None if silent_for is None else int(silent_for)
        self.reason = reason
        self.known = True

    def update_failed(self, failure: str) -> None:
        """Show that connecting failed for good (no more retries), and why."""
        self.failure = failure
        self.connected = False

    def update_disconnected(self, where: str | None = None, reason: str | None = None) -> None:
        """Show the DISCONNECTED state (keeping the last known node and term);
        ``where`` names the engine being reconnected to, ``reason`` why the last attempt failed."""
        self.where = where
        self.reason = reason
        self.connected = False

    @property
    def state(self) -> str:
        """"leader", "follower", "unresponsive", "disconnected", "failed" or "unknown"."""
        if self.failure is not None:
            return "failed"
        if not self.connected:
            return "disconnected"
        if not self.known:
            return "unknown"
        if self.silent_for is not None:
            return "unresponsive"
        return "leader" if self.is_leader else "follower"

    def on_mount(self) -> None:
        self._update_classes()

    def watch_connected(self) -> None:
        self._update_classes()

    def watch_is_leader(self) -> None:
        self._update_classes()

    def watch_known(self) -> None:
        self._update_classes()

    def watch_failure(self) -> None:
        self._update_classes()

    def watch_silent_for(self) -> None:
        self._update_classes()

    def get_content_width(self, container: Size, viewport: Size) -> int:
        if self.state != "disconnected":
            return super().get_content_width(container, viewport)
        # fitted to the line anew (what render drew was fitted to the width the badge had
        # before), and as wide as what that fitting keeps: parts of it give way, not the store badge
        room = container.width - self.styles.gutter.width - ROOM_LEFT
        return max(1, self._disconnected(max(1, room)).cell_len)

    def _disconnected(self, width: int | None) -> Text:
        """The DISCONNECTED line, within ``width`` cells (None: all of it). What gives way
        first when it is short: the last term, the last node seen, the address, then the
        end of the reason."""
        head = Text("✖ DISCONNECTED — reconnecting…", style="bold red", no_wrap=True, overflow="ellipsis")
        # the address and the reason may quote what the user typed and what answered there:
        # escaped, and drawn as text, never read as markup
        where = f" to {printable(self.where)}" if self.where else ""
        reason = printable(self.reason) if self.reason else ""
        last: list[str] = []
        if self.node_id:
            last.append(f"  last seen {printable(self.node_id)}")
        if self.term:
            last.append(f"  last term {self.term}")
        if width is not None:
            def length() -> int:
                return (head.cell_len + cell_len(where) + (cell_len(reason) + 3 if reason else 0)
                        + sum(cell_len(part) for part in last))

            while length() > width and (last or where):
                if last:
                    last.pop()
                else:
                    where = ""
            room = width - head.cell_len - 3  # " (" and ")"
            if reason and cell_len(reason) > room:
                # its end cut; in fewer than 8 cells none of it would say anything: left out
                reason = clip(reason, room) if room >= 8 else ""
        if where:
            head.append(where, style="red")
        if reason:
            head.append(f" ({reason})", style="red")
        for part in last:
            head.append(part, style="dim")
        if width is not None:
            head.truncate(width, overflow="ellipsis")
        return head

    def _update_classes(self) -> None:
        state = self.state
        self.set_class(state == "leader", "-leader")
        self.set_class(state == "follower", "-follower")
        self.set_class(state in ("disconnected", "failed", "unresponsive"), "-disconnected")

    def render(self) -> Text:
        # node ids, the holder, the address and the failure come from other processes (a
        # remote engine, the lease store): escaped, so none can send the terminal a command
        node = printable(self.node_id) or "?"
        state = self.state
        if state == "failed":
            return Text.assemble(("✖ NOT CONNECTED  ", "bold red"), (printable(self.failure or ""), "red"))
        if state == "disconnected":
            return self._disconnected(self.content_region.width or None)
        if state == "unknown":
            return Text("… connecting", style="dim italic")
        if state == "unresponsive":
            silent = self.silent_for or 0
            text = Text(f"⚠ NOT RESPONDING for {silent}s" if silent < 60 else f"⚠ NOT RESPONDING for {fmt_duration(silent)}",
                        style="bold red")
            text.append(f"  {node}", style="bold")
            role = "leader" if self.is_leader else "follower"
            text.append(f"  last seen {role}, term {self.term}", style="dim")
            return text
        if state == "leader":
            text = Text.assemble(("● LEADER", "bold green"), "  ", (node, "bold"))
        else:
            holder = printable(self.holder or "nobody")
            text = Text.assemble(
                ("○ follower", "bold yellow"), "  ", (node, "bold"), ("  leader ", "dim"), holder
            )
        text.append("  term ", style="dim")
        text.append(str(self.term))
        expires_in = self.expires_in
        # a leader without a lease (a single node) leads for good: nothing to count down
        if expires_in is not None:
            text.append("  lease ", style="dim")
        if expires_in is None:
            pass
        elif expires_in <= 0:
            text.append("expired", style="bold red")
        else:
            text.append(f"{expires_in:.1f}s", style="red" if expires_in < 2 else "")
        if self.uptime is not None:
            text.append("  up ", style="dim")
            text.append(fmt_duration(self.uptime))
        return text
