"""Progress output (sgsd_cli/progress.py): plain log lines off a terminal, one live display in one, --quiet."""

from __future__ import annotations

import io

from rich.console import Console

from sgsd_cli import progress as P


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_line_hand_values():
    assert P.log_line("rollout", 25, 100, 10.0) == "rollout: 25/100 (25%) 2.50/s elapsed 0:00:10 ETA 0:00:30"
    assert P.log_line("eval", 0, 8, 0.0) == "eval: 0/8 (0%) elapsed 0:00:00"
    # slow items: seconds per item; 1 of 4 done in 100 s -> 300 s left
    assert P.log_line("train", 1, 4, 100.0) == "train: 1/4 (25%) 100.0 s/it elapsed 0:01:40 ETA 0:05:00"
    assert P.log_line("x", 3, 3, 3661.0) == "x: 3/3 (100%) 1220.3 s/it elapsed 1:01:01"


def test_plain_lines_every_interval_and_at_the_end():
    buf, clock = io.StringIO(), Clock()
    p = P.LogProgress(Console(file=buf, width=200), every_s=10, clock=clock)
    bars = P.Bars(p)
    adv = bars("rollout", 100)
    clock.t = 5
    adv(10)  # before the interval: silent
    assert buf.getvalue() == ""
    clock.t = 10
    adv(15)
    clock.t = 12
    adv(5)  # 2 s after the last line: silent
    clock.t = 20
    adv(70)  # done: a final line
    lines = buf.getvalue().splitlines()
    assert lines == ["rollout: 25/100 (25%) 2.50/s elapsed 0:00:10 ETA 0:00:30",
                     "rollout: 100/100 (100%) 5.00/s elapsed 0:00:20"]
    bars.note("step 2/5")
    adv2 = bars("train", 2)
    assert len(p.tasks) == 1  # the finished rollout task was dropped
    clock.t = 30
    adv2(2)
    assert buf.getvalue().splitlines()[-2:] == ["step 2/5", "step 2/5 | train: 2/2 (100%) 0.20/s elapsed 0:00:10"]


def test_modes(monkeypatch):
    non_tty = Console(file=io.StringIO())
    monkeypatch.delenv("SGSD_PROGRESS", raising=False)
    assert P.mode(non_tty) == "log"
    assert P.mode(Console(file=io.StringIO(), force_terminal=True)) == "bars"
    monkeypatch.setenv("SGSD_PROGRESS", "0")
    assert P.mode(non_tty) == "off"
    monkeypatch.setenv("SGSD_PROGRESS", "bars")
    assert P.mode(non_tty) == "bars"
    monkeypatch.delenv("SGSD_PROGRESS")
    monkeypatch.setattr(P, "QUIET", True)
    assert P.mode(Console(file=io.StringIO(), force_terminal=True)) == "off"


def test_live_display_drops_finished_bars_and_quiet_prints_nothing(monkeypatch):
    monkeypatch.delenv("SGSD_PROGRESS", raising=False)
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=100)
    p = P.make_progress(con)
    assert isinstance(p, P.LiveProgress)
    with p:
        bars = P.Bars(p)
        for stage in ("rollout", "score_teachers", "polarize", "train") * 3:  # 3 loop steps, 4 bars each
            a = bars(stage, 2)
            a(2)
        bars.note("step 3/3")
        assert len(p.tasks) == 1
    monkeypatch.setattr(P, "QUIET", True)
    buf2 = io.StringIO()
    q = P.make_progress(Console(file=buf2, force_terminal=True))
    with q:
        P.Bars(q)("rollout", 3)(3)
    assert buf2.getvalue() == ""


def test_common_progress_bars_is_this_display(monkeypatch):
    from sgsd_cli import common

    from sgsd_cli import progress as P

    buf = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=buf, width=200))
    monkeypatch.delenv("SGSD_PROGRESS", raising=False)
    with common.progress_bars() as bars:  # a task done at once prints nothing: one-line errors stay one line
        bars("grade", 4)(4)
    assert buf.getvalue() == ""
    monkeypatch.setattr(P, "QUIET_BELOW_S", 0.0)
    with common.progress_bars() as bars:
        bars("grade", 4)(4)
    assert buf.getvalue().startswith("grade: 4/4 (100%)")


def test_plain_line_comes_on_time_inside_a_long_batch():
    """No work item finishes for 25 s (one long decode batch): the clock still brings a line every interval."""
    buf, clock = io.StringIO(), Clock()
    p = P.LogProgress(Console(file=buf, width=200), every_s=10, clock=clock)
    P.Bars(p)("rollout", 64)
    for t in (4, 9.5):
        clock.t = t
        p.tick()
    assert buf.getvalue() == ""
    clock.t = 10
    p.tick()
    clock.t = 20.5
    p.tick()
    assert buf.getvalue().splitlines() == ["rollout: 0/64 (0%) elapsed 0:00:10", "rollout: 0/64 (0%) elapsed 0:00:20"]


def test_the_clock_thread_ticks_without_any_advance():
    import time

    buf = io.StringIO()
    with P.LogProgress(Console(file=buf, width=200), every_s=0.2) as p:
        P.Bars(p)("decode", 8)
        time.sleep(0.9)
    assert len(buf.getvalue().splitlines()) >= 2 and "decode: 0/8" in buf.getvalue()
