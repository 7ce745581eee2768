"""Progress output of the CLI: one live rich display in a terminal, periodic plain log lines elsewhere.

* terminal (stderr is a tty): one rich display per command; a finished bar is dropped when the next one
  starts, so a 100-step loop keeps a handful of lines, not 400; ``Bars.note(text)`` sets a header line
  (e.g. the loop's step number).
* not a terminal (slurm, nohup, ``2> log``): one plain line per task every ``LOG_EVERY_S`` seconds (and at
  its end): ``rollout: 12/48 (25%) 3.10/s elapsed 0:00:04 ETA 0:00:12``.
* ``QUIET = True`` (the CLI's ``--quiet``) or ``SGSD_PROGRESS=0``: nothing.  ``SGSD_PROGRESS=bars`` / ``log``
  forces one of the two forms; ``SGSD_PROGRESS_EVERY=SECONDS`` sets the log interval (default 30).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

QUIET = False  # module-level switch: the CLI sets it from --quiet
LOG_EVERY_S = 30.0
QUIET_BELOW_S = 2.0  # a task that ends sooner than this, with no line printed yet, prints nothing (short runs and
                     # one-line errors stay one line)


def _hms(s: float) -> str:
    s = int(max(0, round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def log_line(description: str, done: float, total: float | None, elapsed: float) -> str:
    """``desc: done/total (pct%) rate/s elapsed h:mm:ss ETA h:mm:ss`` (rate and ETA once something is done)."""
    d = int(done)
    parts = [f"{description}: {d}/{int(total)}" if total else f"{description}: {d}"]
    if total:
        parts.append(f"({100.0 * done / total:.0f}%)")
    rate = done / elapsed if elapsed > 0 else 0.0
    if done > 0 and elapsed > 0:
        parts.append(f"{rate:.2f}/s" if rate >= 0.1 else f"{elapsed / done:.1f} s/it")
    parts.append(f"elapsed {_hms(elapsed)}")
    if total and done > 0 and done < total and rate > 0:
        parts.append(f"ETA {_hms((total - done) / rate)}")
    return " ".join(parts)


class LogProgress:
    """The part of rich's Progress interface sgsd uses, printing plain lines for non-terminal output."""

    def __init__(self, console: Console, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.console, self.every_s, self.clock = console, every_s, clock
        self.tasks: dict[int, dict] = {}
        self._next = 0
        self.header = ""
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "LogProgress":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """A clock thread calls :meth:`tick`, so the line comes every ``every_s`` even while no work item
        finishes (one long decode batch reports nothing until it ends)."""
        if self._beat is None:
            self._halt.clear()
            self._beat = threading.Thread(target=self._run_beat, name="sgsd-progress", daemon=True)
            self._beat.start()

    def _run_beat(self) -> None:
        while not self._halt.wait(max(0.05, min(1.0, self.every_s / 4))):
            self.tick()

    def tick(self) -> None:
        """A line for every unfinished task whose last line is ``every_s`` old, whether or not it advanced."""
        with self._lock:
            now = self.clock()
            for tid, t in list(self.tasks.items()):
                finished = t["total"] is not None and t["completed"] >= t["total"]
                if not finished and not t["ended"] and now - t["last"] >= self.every_s:
                    self._emit(tid)

    def stop(self) -> None:
        self._halt.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
            self._beat = None
        for tid in list(self.tasks):
            t = self.tasks[tid]
            if not t["ended"] and t["completed"] > t["last_done"] and self.clock() - t["start"] >= QUIET_BELOW_S:
                self._emit(tid)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        tid = self._next
        self._next += 1
        now = self.clock()
        self.tasks[tid] = {"description": description, "total": total, "completed": completed, "start": now,
                           "last": now, "last_done": completed, "ended": False}
        return tid

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_) -> None:
        with self._lock:
            self._update(task, total, completed, advance, description)

    def _update(self, task, total, completed, advance, description) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        now = self.clock()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished and not t["ended"]:
            if now - t["start"] >= QUIET_BELOW_S or t["last"] > t["start"]:
                self._emit(task)
            t["ended"] = True
        elif not finished and now - t["last"] >= self.every_s:
            self._emit(task)

    def remove_task(self, task: int) -> None:
        with self._lock:
            self.tasks.pop(task, None)

    def finished_tasks(self) -> list[int]:
        return [i for i, t in self.tasks.items() if t["total"] is not None and t["completed"] >= t["total"]]

    def note(self, text: str) -> None:
        if text != self.header:
            self.header = text
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def _emit(self, task: int) -> None:
        t = self.tasks[task]
        now = self.clock()
        t["last"], t["last_done"] = now, t["completed"]
        prefix = f"{self.header} | " if self.header else ""
        self.console.print(prefix + log_line(t["description"], t["completed"], t["total"], now - t["start"]),
                           highlight=False, markup=False, soft_wrap=True)


class LiveProgress(Progress):
    """rich Progress with an optional header line above the bars (one live display)."""

    header: str = ""

    def get_renderables(self):
        if self.header:
            yield Text(self.header, style="bold")
        yield self.make_tasks_table(self.tasks)

    def note(self, text: str) -> None:
        self.header = text
        self.refresh()

    def finished_tasks(self) -> list:
        return [t.id for t in self.tasks if t.finished]


def mode(console: Console) -> str:
    """'off', 'bars' or 'log' for this process."""
    env = os.environ.get("SGSD_PROGRESS", "").strip().lower()
    if QUIET or env in ("0", "off", "no", "false"):
        return "off"
    if env in ("bars", "rich", "1"):
        return "bars"
    if env == "log":
        return "log"
    return "bars" if console.is_terminal else "log"


def make_progress(console: Console):
    m = mode(console)
    if m == "log":
        every = float(os.environ.get("SGSD_PROGRESS_EVERY", LOG_EVERY_S))
        return LogProgress(console, every_s=every)
    p = LiveProgress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=m == "off", transient=False,
    )
    return p


class Bars:
    """``bars(description, total) -> advance(n)``, the callback factory every stage takes; finished bars are
    dropped when the next one starts.  ``bars.note(text)`` sets the header (e.g. ``step 3/100``)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, description: str, total: int):
        for tid in self.p.finished_tasks():
            self.p.remove_task(tid)
        task = self.p.add_task(description, total=total)
        return lambda n=1: self.p.advance(task, n)

    def note(self, text: str) -> None:
        self.p.note(text)
