"""Progress reporting that reads well both in a terminal and in a log file.

In a terminal it is a rich progress bar (count, rate, ETA). When output goes to a
file or a pipe (DVC, Prefect, CI) live bars turn into noise, so it prints a plain
status line every ``interval`` seconds instead, with the same figures."""

from __future__ import annotations

import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class ProgressReporter:
    """``with ProgressReporter("data", total=n, unit="docs") as p: p.advance(1, bytes=...)``.

    ``total`` may be None when unknown (no ETA then). ``extra`` figures passed to
    :meth:`advance` are summed and shown (bytes are formatted as sizes)."""

    def __init__(self, label: str, total: float | None, unit: str = "items", interval: float = 5.0,
                 stream=None, force_plain: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0.0
        self.extra: dict[str, float] = {}
        plain = force_plain if force_plain is not None else not self.stream.isatty()
        self._bar: Progress | None = None
        if not plain:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=total, info="")

    def __enter__(self) -> "ProgressReporter":
        self.start = self._last = self.clock()
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _info(self) -> str:
        parts = []
        elapsed = max(self.clock() - self.start, 1e-9)
        for key, value in self.extra.items():
            if key == "bytes":
                parts.append(f"{human_bytes(value)} ({human_bytes(value / elapsed)}/s)")
            else:
                parts.append(f"{value:,.0f} {key}")
        return ", ".join(parts)

    def status_line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        line = f"{self.label}: {count} {self.unit}"
        if self.total:
            line += f" ({100 * self.done / self.total:.0f}%)"
        info = self._info()
        if info:
            line += f", {info}"
        line += f", {rate:,.1f} {self.unit}/s, elapsed {human_seconds(elapsed)}"
        if self.total and rate > 0:
            line += f", eta {human_seconds((self.total - self.done) / rate)}"
        return line

    def advance(self, n: float = 1, **extra: float) -> None:
        self.done += n
        for key, value in extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + value
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self._info())
            return
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            print(self.status_line(), file=self.stream, flush=True)
