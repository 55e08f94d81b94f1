"""Progress off a terminal: a few summary lines, never a bar's every refresh."""

from __future__ import annotations

import logging

import pytest

from oscar_common import logs
from oscar_common.logs import LoggedProgress, progress


def test_log_files_get_rate_limited_summaries(caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(0, 10_000, 3))  # every update 3 s after the last
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("OSCAR_PROGRESS", "log")
    with caplog.at_level(logging.INFO, "oscar.progress"):
        bar = progress(range(100), desc="synthesis", unit="img")
        assert isinstance(bar, LoggedProgress)
        assert sum(1 for _ in bar) == 100
    lines = [r.message for r in caplog.records]
    # 100 updates over ~300 s with a 30 s period: about ten lines and one closing line, not 100
    assert 8 <= len(lines) <= 12
    assert lines[-1].startswith("synthesis: 100/100 img in") and lines[-1].endswith("(done)")
    assert all("\r" not in line and "\x1b" not in line for line in lines)


def test_inner_loops_report_nothing_when_they_close(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSCAR_PROGRESS", "log")
    with caplog.at_level(logging.INFO, "oscar.progress"):
        for _ in progress(range(5), desc="epoch 1/3", leave=False):
            pass
    assert caplog.records == []


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSCAR_PROGRESS", "bar")
    bar = progress(total=3, desc="x")
    assert not isinstance(bar, LoggedProgress)
    bar.close()
