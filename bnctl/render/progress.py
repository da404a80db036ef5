"""Progress on the terminal (stderr): nothing when output is not a terminal."""

from __future__ import annotations

from typing import Any


class _Progress:
    """A rich progress bar over samples with samples/s, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("recalibrating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} samples/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, total: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task("samples", total=total, rate="-")

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)
            task = self.bar.tasks[0]
            speed = task.speed
            self.bar.update(self.task, rate=f"{speed:.0f}" if speed else "-")


def sample_progress(enabled: bool) -> _Progress:
    """Context manager for the recalibration progress bar (``start(total)``, ``advance(n)``)."""
    return _Progress(enabled)


class _Stages:
    """One status line on stderr naming the stage a long command is in (a spinner on a
    terminal), or nothing when disabled: piped and JSON output stay clean."""

    def __init__(self, enabled: bool):
        self.enabled, self.status = enabled, None

    def __enter__(self) -> "_Stages":
        if self.enabled:
            from rich.console import Console

            self.status = Console(stderr=True).status("starting")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def __call__(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)


def stages(enabled: bool) -> _Stages:
    """Context manager whose value, called with a text, shows the stage a command is in."""
    return _Stages(enabled)
