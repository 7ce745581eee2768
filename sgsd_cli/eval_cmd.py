"""`sgsd eval`: the paper's evaluation protocol on registered benchmarks or a problems file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import Force, out, progress_bars
from sgsd_cli.options import stage_command
from stages import eval as ev
from stages import report
from stages.engine.io import InputError

_BENCH_HELP = ("Benchmark name, repeatable: aime24, aime25, hmmt25, math500 (local files or hub), amc23, minerva "
               "(hub only), train, or 'all' (aime24, aime25, hmmt25, math500).")


def print_compare(runs: list[Path], metric: str, paper: bool) -> None:
    """Runs beside the paper's rows, with each row's protocol, n and problem count (readable at 80 columns)."""
    meta, _ = ev.paper_results() if paper else ({}, None)
    out.print(report.compare_view(runs, metric=metric, with_paper=paper))
    if paper and metric == "avg_at_n":
        over = ", ".join(meta.get("benches", []))
        out.print(f"mean = mean over {over} (rows missing one have none); paper rows: {meta.get('model')} "
                  f"avg@{meta.get('n')} as published (DESIGN 1.6); probs = problems scored per row")


Runs = Annotated[list[Path] | None, typer.Argument(help="With --compare: run directories whose eval summaries to compare.", show_default=False)]
EvalRunDir = Annotated[Path | None, typer.Option("--run-dir", help="Run directory: writes eval/<bench>.parquet, eval/summary.parquet and manifests (required unless --compare).")]
Compare = Annotated[bool, typer.Option("--compare", metavar="", help="Print the summaries of the given RUN directories side by side with the paper's rows, and exit.", rich_help_panel="Compare")]
Metric = Annotated[str, typer.Option("--metric", help="With --compare: summary column to compare (avg_at_n, pass_at_n, maj_at_n, pass_at_1, format_rate).", rich_help_panel="Compare")]
Paper = Annotated[bool, typer.Option("--paper/--no-paper", metavar="", help="With --compare: show the paper's rows.", rich_help_panel="Compare")]


@stage_command("eval", ev.EvalConfig, section="eval")
def eval_cmd(make_cfg, runs: Runs = None, run_dir: EvalRunDir = None, compare: Compare = False, metric: Metric = "avg_at_n",
             paper: Paper = True, force: Force = False) -> None:
    """Evaluate a model with the paper's protocol: avg@n, pass@1/pass@n, maj@n, format and truncation rates."""
    if compare:
        if not runs:
            raise InputError(None, "--compare needs one or more run directories: sgsd eval --compare RUN_A RUN_B")
        print_compare(list(runs), metric, paper)
        return
    if runs:
        raise InputError(None, f"unexpected argument '{runs[0]}' (run directories are only taken with --compare)")
    cfg = make_cfg()
    if run_dir is None:
        raise InputError(None, "--run-dir is required")
    with progress_bars() as bars:
        path = ev.run(cfg, run_dir, force=force, progress=bars)
    out.print(report.eval_summary(path))
    out.print(f"summary: {path}")
    out.print(f"report: {report.write_report([run_dir], Path(run_dir) / 'report')}")
