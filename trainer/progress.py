"""Progress that shows wherever the trainer runs.

On a terminal (stdout and stderr both TTYs) this is a tqdm bar.  Under cron, systemd or a
pipe, a bar prints nothing useful, so a log line is written instead, at most every
``INTERVAL_SECONDS``::

    progress features (train) 1200/4800 img (25%) 3.9 img/s, ETA 15m23s
    progress unfrozen epoch 3/8 40/120 batch (33%) 1.2 batch/s, ETA 1m07s

The caller still logs the end of each step (``features ready``, ``epoch 3/8 ...``), so
nothing here is printed for steps shorter than the interval.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol, TypeVar

log = logging.getLogger("trainer.progress")

INTERVAL_SECONDS = 30.0

T = TypeVar("T")


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


def on_terminal() -> bool:
    """True when a bar can be drawn: stdout and stderr are both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class LogProgress:
    """Counts work done and logs one line at most every ``interval`` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "it",
                 interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.interval = INTERVAL_SECONDS if interval is None else interval
        self.clock = clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.done = 0
        self.started = clock()
        self.last = self.started

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (f", ETA {format_seconds((self.total - self.done) / rate)}"
               if rate > 0 and self.total else "")
        return (f"progress {self.desc} {self.done}/{self.total} {self.unit}{share} "
                f"{rate:.3g} {self.unit}/s{eta}")

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.emit(self.line(now))

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it") -> Bar:
    """A tqdm bar on a terminal, else a :class:`LogProgress`; use as a context manager."""
    if on_terminal():
        from tqdm import tqdm

        bar: Bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        return bar
    return LogProgress(total, desc, unit)


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate over ``items`` while counting them (``for x in track(...)``)."""
    bar = progress(total, desc, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


__all__ = ["INTERVAL_SECONDS", "LogProgress", "format_seconds", "on_terminal", "progress",
           "track"]
