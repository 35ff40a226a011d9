"""Progress of long loops where nobody watches a terminal (a log file, nohup, a SLURM job): a log line at least
every `INTERVAL_S` seconds. On a terminal, rich's progress bar shows it instead.

`tracked` wraps the image loops of eval and predict; retinaseg.runs.callbacks.LogProgress does the same for training.
"""

import logging
import sys
import time
from collections.abc import Iterator, Sequence

from rich.progress import track

log = logging.getLogger(__name__)

INTERVAL_S = 30.0


def on_terminal() -> bool:
    """Whether stdout is a terminal (where a progress bar redraws itself in place)."""
    return sys.stdout.isatty()


def duration(seconds: float) -> str:
    """`1:02:03`, `2:03`: hours, minutes and seconds, as a progress bar shows them."""
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{s:02d}" if hours else f"{minutes}:{s:02d}"


class Pace:
    """Counts units of work done from now on, of `total` (None: no known end): whether a progress line is due
    (`interval_s` since the last), and the rate and time left so far."""

    def __init__(self, total: int | None, interval_s: float = INTERVAL_S, done: int = 0):
        self.total, self.interval_s, self.first = total, interval_s, done
        self.start = self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.interval_s

    def report(self, done: int, unit: str) -> str:
        """`12/40 images, 0.51 images/s, 0:55 left`, and starts a new interval."""
        self.last = time.perf_counter()
        rate = (done - self.first) / max(self.last - self.start, 1e-9)
        if self.total is None:
            return f"{done} {unit}, {rate:.3g} {unit}/s"
        left = duration((self.total - done) / rate) if rate > 0 else "?"
        return f"{done}/{self.total} {unit}, {rate:.3g} {unit}/s, {left} left"


def tracked(items: Sequence, description: str, unit: str = "images", interval_s: float = INTERVAL_S) -> Iterator:
    """The items of `items`, with rich's progress bar on a terminal; elsewhere a log line
    `<description>: 12/40 images, 0.51 images/s, 0:55 left` at least every `interval_s` seconds and at the end."""
    if on_terminal():
        yield from track(items, description=description, transient=True)
        return
    pace = Pace(len(items), interval_s)
    for done, item in enumerate(items, start=1):
        yield item
        if pace.due() or done == len(items):
            log.info("%s: %s", description, pace.report(done, unit))
