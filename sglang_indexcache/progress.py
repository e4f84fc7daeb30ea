"""Progress of long work, in one place for every command.

On a terminal: a tqdm bar. When stderr is not a terminal (a log file, CI, a pipe): one line at
least every ``LOG_INTERVAL`` seconds (``desc: done/total unit (pct), elapsed, about ETA left``),
logged as ``sglang_indexcache.progress`` at INFO, written by a timer so that a slow single item
still shows the run is alive. ``--quiet`` (``QUIET = True``) turns both off.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

QUIET = False
LOG_INTERVAL = 30.0
log = logging.getLogger(__name__)


def enabled() -> bool:
    """True when a terminal bar is shown (libraries' own bars follow this)."""
    return not QUIET and sys.stderr.isatty()


def bar(iterable=None, log_lines: bool = True, **kwargs):
    """A tqdm-like bar: tqdm on a terminal, :class:`LogBar` in a log, silent with ``QUIET``.

    ``log_lines=False``: no lines of its own in a log (an inner bar already reports the same work).
    """
    if not QUIET and not sys.stderr.isatty():
        return LogBar(iterable, interval=None if log_lines else 0, **kwargs)
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", QUIET)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LogBar:
    """The subset of tqdm's interface the project uses, reporting by log lines on a timer."""

    def __init__(self, iterable=None, total=None, initial=0, desc="", unit="it", interval=None, **_ignored):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial = total, initial, initial
        self.postfix = ""
        self.started = time.monotonic()
        self.lines = 0
        self._stop = threading.Event()
        if interval != 0:  # 0: silent (its work is reported by another bar)
            threading.Thread(target=self._tick, args=(interval or LOG_INTERVAL,), daemon=True).start()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.n - self.initial
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {self.n} {self.unit}"
        text += f", {duration(elapsed)} elapsed"
        if self.total and done > 0 and self.n < self.total:
            text += f", about {duration(elapsed / done * (self.total - self.n))} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.lines += 1
            log.info("%s", self.line())

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self.lines and self.total and self.n >= self.total:  # a long run reports its end (not a stop)
            log.info("%s (done)", self.line())

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
