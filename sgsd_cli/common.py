"""Shared CLI plumbing: the typer app, the one-line error contract, progress bars, option types."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Annotated, Callable, TypeVar

import typer
from rich.console import Console, RenderHook
from rich.markup import escape

# quiet third-party progress bars and warnings: sgsd shows its own rich progress
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stages.engine.errors import InputError, visible  # noqa: E402


class _Visible:
    """Renders another renderable with every control character of its text made visible (``io.visible``): model
    and bank text never reaches the terminal as escape sequences.  Rich's own control segments pass."""

    def __init__(self, inner):
        self.inner = inner

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        for seg in console.render(self.inner, options):
            yield seg if seg.control else Segment(visible(seg.text), seg.style)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement.get(console, options, self.inner)


class _PlainText(RenderHook):
    def process_renderables(self, renderables):
        return [_Visible(r) for r in renderables]


def _console(stderr: bool = False) -> Console:
    """A rich console; written to a pipe or file (no terminal, no COLUMNS) it does not wrap tables and titles at
    rich's default 80 columns: lines are as long as their content.  Strings are printed as plain text (markup only
    where a call passes ``markup=True``, with the data in it escaped: a table cell, a skill's text or a path is
    never read as markup) and control characters are shown as escapes."""
    import sys

    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty and not os.environ.get("COLUMNS"):
        c = Console(stderr=stderr, width=PIPE_WIDTH, markup=False)
    else:
        c = Console(stderr=stderr, markup=False)
    c.push_render_hook(_PlainText())
    return c


PIPE_WIDTH = 1000
console = _console(stderr=True)
out = _console()

app = typer.Typer(
    name="sgsd",
    help="Skill-Conditioned Gated Self-Distillation: mine skills, roll out, score with skill-conditioned "
    "teachers, polarize, train and evaluate LLMs on math reasoning. Every stage reads and writes Parquet "
    "under --run-dir, records a manifest, and resumes.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

PIPELINE = "Pipeline stages"
UTILS = "Utilities"

F = TypeVar("F", bound=Callable)


def report_error(e: InputError) -> None:
    """The one line of the error contract: ``error: <file>: <problem>`` on stderr."""
    console.print(f"[bold red]error:[/] {escape(e.line())}", soft_wrap=True, highlight=False, markup=True)


def cli_errors(fn: F) -> F:
    """Turn InputError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            report_error(e)
            raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def progress():
    """The progress display of this process (sgsd_cli/progress.py): one live rich display in a terminal, periodic
    plain log lines (done/total, rate, ETA) when stderr is not a terminal, nothing with ``--quiet``."""
    from sgsd_cli.progress import make_progress

    return make_progress(console)


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not shard:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
        assert 0 <= i < n
    except Exception:
        raise InputError(None, f"--shard must look like i/n with 0 <= i < n, got '{shard}'") from None
    return i, n


RunDir = Annotated[Path, typer.Option("--run-dir", help="Run directory: every stage reads and writes its tables and manifests here.")]
Force = Annotated[bool, typer.Option("--force", metavar="", help="Redo the stage even if its manifest matches; overwrite after changed inputs.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffling).")]
Device = Annotated[str, typer.Option("--device", help="torch device: auto, cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str, typer.Option("--dtype", help="Model dtype: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, fp16.")]
GgufFile = Annotated[str | None, typer.Option("--gguf-file", help="GGUF file name inside the --model folder (transformers dequantizes it on load).")]


@contextlib.contextmanager
def progress_bars():
    """Yield ``bars(description, total) -> advance(n)`` backed by one display; ``bars.note(text)`` sets its
    header line (e.g. the loop's step).  A finished bar is dropped when the next one starts."""
    from sgsd_cli.progress import Bars

    with progress() as p:
        yield Bars(p)
