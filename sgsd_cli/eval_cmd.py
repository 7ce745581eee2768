"""`sgsd eval`: the paper's evaluation protocol on registered benchmarks or a problems file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.table import Table

from sgsd_cli.common import Force, out, progress_bars
from sgsd_cli.options import stage_command
from stages import eval as ev
from stages import report
from stages.engine.errors import InputError

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
EvalRunDir = Annotated[Path | None, typer.Option("--run-dir", help="Run directory: writes eval/<bench>.parquet, eval/summary.parquet and manifests; with --checkpoints also select/ (validation curve, choice, test of the chosen step). Required unless --compare.")]
Compare = Annotated[bool, typer.Option("--compare", metavar="", help="Print the summaries of the given RUN directories side by side with the paper's rows, and exit.", rich_help_panel="Compare")]
Metric = Annotated[str, typer.Option("--metric", help="With --compare: summary column to compare (avg_at_n, pass_at_n, maj_at_n, pass_at_1, format_rate).", rich_help_panel="Compare")]
Paper = Annotated[bool, typer.Option("--paper/--no-paper", metavar="", help="With --compare: show the paper's rows.", rich_help_panel="Compare")]


@stage_command("eval", ev.EvalConfig, section="eval")
def eval_cmd(make_cfg, runs: Runs = None, run_dir: EvalRunDir = None, compare: Compare = False, metric: Metric = "avg_at_n",
             paper: Paper = True, force: Force = False) -> None:
    """Evaluate a model with the paper's protocol: avg@n, pass@1/pass@n, maj@n, format and truncation rates.

    With --checkpoints RUN: every saved checkpoint of a training run on --val, the one picked by --select,
    then only that one on the test sets (--bench/--problems)."""
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
    if cfg.checkpoints:
        with progress_bars() as bars:
            paths = ev.run_checkpoints(cfg, run_dir, force=force, progress=bars, log=out.print)
        out.print(curve_view(pl.read_parquet(paths["validation"]), pl.read_parquet(paths["choice"])))
        if "summary" in paths:
            out.print(report.eval_summary(paths["summary"]))
            print_seed_spread(pl.read_parquet(paths["summary"]))
        else:
            out.print("no test sets given (--bench/--problems): only the choice was made")
        out.print(f"choice: {paths['choice']}")
        out.print(f"report: {report.write_report([run_dir], Path(run_dir) / 'report')}")
        return
    with progress_bars() as bars:
        path = ev.run(cfg, run_dir, force=force, progress=bars)
    out.print(report.eval_summary(path))
    print_seed_spread(pl.read_parquet(path))
    out.print(f"summary: {path}")
    out.print(f"report: {report.write_report([run_dir], Path(run_dir) / 'report')}")


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def print_seed_spread(summary: pl.DataFrame) -> None:
    """With several sampling seeds: avg@n ± se beside the spread of the seeds' avg@n (std, min, max), in %."""
    if "seeds" not in summary.columns or (summary["seeds"].max() or 1) <= 1:
        return
    t = Table(title=f"avg@n over {summary['seeds'][0]} sampling seeds, %", title_justify="left", padding=(0, 1),
              pad_edge=False)
    for h in ("bench", "avg@n", "±se", "seed sd", "seed min", "seed max"):
        t.add_column(h, justify="left" if h == "bench" else "right", overflow="fold")
    for r in summary.iter_rows(named=True):
        t.add_row(str(r["bench"]), _pct(r["avg_at_n"]), _pct(r["avg_at_n_se"]), _pct(r["seed_std"]),
                  _pct(r["seed_min"]), _pct(r["seed_max"]))
    out.print(t)


def curve_view(validation: pl.DataFrame, choice: pl.DataFrame) -> Table:
    """The validation curve (one row per saved step) with the chosen step marked."""
    c = choice.row(0, named=True)
    v = validation.filter(pl.col("bench") == c["val_bench"]).sort("step")
    t = Table(title=f"validation {c['val_bench']} avg@n per checkpoint, % (rule {c['rule']})",
              title_justify="left", padding=(0, 1), pad_edge=False)
    for h in ("step", "loop step", "avg@n", "±se", "seed sd", ""):
        t.add_column(h, justify="right" if h else "left")
    for r in v.iter_rows(named=True):
        t.add_row(str(r["step"]), "-" if r["loop_step"] is None else str(r["loop_step"]), _pct(r["avg_at_n"]),
                  _pct(r["avg_at_n_se"]), _pct(r["seed_std"]), "<- chosen" if r["step"] == c["step"] else "")
    return t
