"""PlainApp: what the dashboard apps share: messages drawn as written, and a terminal driver
that lets the app end when its terminal is closed."""

from __future__ import annotations

from textual.app import App
from textual.driver import Driver
from textual.notifications import SeverityLevel

from taskwatch.widgets import printable, printable_lines

from .terminal import hangup_safe


class PlainApp(App[None]):
    """An App whose messages are never read as markup, and which a closed terminal ends."""

    def get_driver_class(self) -> type[Driver]:
        # a terminal closed under it must not leave the dashboard, and its engine, hanging
        return hangup_safe(super().get_driver_class())

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every message is drawn as written, whatever ``markup`` says: the dashboards'
        messages quote task names, trigger keys, run ids and errors from engines and
        databases, where a "[/x]" stopped the app (a toast's markup is parsed when it is
        drawn, and raises there) and a "[b]" was eaten; none of them means markup. No escape
        sequence in them may reach the terminal either."""
        super().notify(
            printable_lines(message), title=printable(title), severity=severity, timeout=timeout, markup=False
        )

    def action_help_quit(self) -> None:
        # Textual's own word on ctrl+c, which it writes in markup: said plainly (see notify)
        for key, active in self.active_bindings.items():
            if active.binding.action in ("quit", "app.quit"):
                self.notify(f"Press {key} to quit the app", title="Do you want to quit?")
                return
