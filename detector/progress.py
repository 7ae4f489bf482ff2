"""Progress of long steps (training epochs, proposals, batch detection): a tqdm bar on a terminal, and where the
output goes to a file or a pipe a plain line at least every ``INTERVAL_S`` seconds, so that a log shows the run
is alive and how far it is."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

INTERVAL_S = 30.0


class PlainProgress:
    """The part of tqdm's interface the project uses, as lines: ``desc: n/total unit (rate unit/s, elapsed s)``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, file=None,
                 interval: float | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file, self.interval = file or sys.stderr, INTERVAL_S if interval is None else interval
        self.start = self.last = time.monotonic()
        self.start_n, self.postfix, self.printed = initial, {}, False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:.3g} {self.unit}/s, {elapsed:.0f} s{extra})",
              file=self.file, flush=True)
        self.printed = True

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **kwargs) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def write(self, text: str, file=None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        if self.printed:  # a long step: say that it ended
            self._line(time.monotonic())
            self.printed = False


def progress(total: int | None, desc: str, unit: str, initial: int = 0, show: bool = True, file=None):
    """A tqdm bar where ``file`` (stderr) is a terminal, ``PlainProgress`` lines elsewhere; None when not ``show``
    (another rank of a distributed run, a caller that asked for quiet)."""
    if not show:
        return None
    file = file or sys.stderr
    if file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, dynamic_ncols=True, leave=False,
                    smoothing=0.1)
    return PlainProgress(total, desc, unit, initial, file)


def track(items: Iterable, total: int, desc: str, unit: str, show: bool = True) -> Iterator:
    """``items``, reporting progress as ``progress`` does."""
    bar = progress(total, desc, unit, show=show)
    try:
        for item in items:
            yield item
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
