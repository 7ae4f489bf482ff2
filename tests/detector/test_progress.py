"""Progress in a log: a long step whose output goes to a file prints a plain line at least every interval."""

from __future__ import annotations

import io

from detector import progress as progress_module
from detector.progress import PlainProgress, progress, track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_a_terminal_a_bar():
    log = io.StringIO()
    bar = progress(10, "detect", "img", file=log)
    assert isinstance(bar, PlainProgress)
    bar.update(3)
    assert log.getvalue() == ""  # not yet an interval
    bar.interval = 0.0
    bar.set_postfix({"loss": "0.5"})
    bar.update(2)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("detect: 5/10 img (") and lines[0].endswith(", loss 0.5)")
    assert type(progress(10, "detect", "img", file=Terminal())).__name__ == "tqdm"
    assert progress(10, "detect", "img", show=False, file=log) is None


def test_track_yields_everything_and_reports(monkeypatch):
    monkeypatch.setattr(progress_module, "INTERVAL_S", 0.0)
    log = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", log)
    assert list(track(iter(range(4)), 4, "proposals", "img")) == [0, 1, 2, 3]
    assert log.getvalue().splitlines()[-1].startswith("proposals: 4/4 img")
