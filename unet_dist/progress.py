"""Progress of long commands: a tqdm bar on a terminal, a line now and then in a log file.

A batch job's log (SLURM's, `horovodrun | tee`) is no terminal, and tqdm turns its bar off there,
so without `LogLines` a long convert or predict said nothing until its summary. Imports nothing of
unet_dist's, nor TensorFlow: data/convert.py uses it, and logs.py, which imports data/convert.py.
"""

from __future__ import annotations

import datetime
import sys
import time

# How often a long command without a terminal says how far it is.
LOG_INTERVAL_S = 60.0


def time_left(seconds: float, done: int, left: int) -> str:
    """H:MM:SS for `left` more units at the rate of `done` in `seconds`."""
    return str(datetime.timedelta(seconds=round(seconds / max(done, 1) * left)))


def terminal_bar(shown: bool, iterable=None, **kwargs):
    """A tqdm progress bar on stderr where `shown` and stderr is a terminal (none in a log file);
    kwargs go to tqdm. Lines printed meanwhile should go through `tqdm.write`, which keeps the bar
    below them."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, disable=None if shown else True,
                **kwargs)


class LogLines:
    """Progress where there is no terminal for a bar: a line on stderr at most every `interval`
    seconds, with the count, the rate and the time left; none for the last unit, since the
    command's own summary follows. Used as tqdm is here: iterated over `iterable`, or `update()`d
    towards `total`, optionally in a `with`."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float = LOG_INTERVAL_S):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = 0
        self._start = self._last = time.time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self._last < self.interval or (self.total is not None and self.n >= self.total):
            return
        self._last = now
        elapsed = now - self._start
        of = "" if self.total is None else f"/{self.total}"
        eta = "" if self.total is None else f", eta {time_left(elapsed, self.n, self.total - self.n)}"
        print(f"{self.desc}: {self.n}{of} {self.unit} ({self.n / max(elapsed, 1e-9):.1f} {self.unit}/s{eta})",
              file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", shown: bool = True):
    """Where `shown`: a `terminal_bar` on a terminal, else `LogLines` (every LOG_INTERVAL_S, read
    now). Not shown: a silent pass-through (a disabled bar)."""
    if shown and not sys.stderr.isatty():
        return LogLines(iterable, total, desc, unit, interval=LOG_INTERVAL_S)
    return terminal_bar(shown, iterable, total=total, desc=desc, unit=unit)
