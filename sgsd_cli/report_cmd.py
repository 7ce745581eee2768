"""`sgsd report`: plots of one or several runs from their Parquet logs, PNGs + one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import UTILS, app, cli_errors, out
from stages.engine.errors import InputError


@app.command("report", rich_help_panel=UTILS)
@cli_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (sgsd loop, sgsd train or sgsd eval); several are overlaid.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the PNGs and report.html (default: RUN/report for one run, ./sgsd_report for several).", show_default=False)] = None,
    skills: Annotated[bool, typer.Option("--skills", metavar="", help="Also print, per bank item, how often it was retrieved and its teachers' polarity over each run.")] = False,
) -> None:
    """Plots of one or several runs from their Parquet logs: PNGs and one HTML page.

    Reward / accuracy, loss, polarity fractions, support, clipped fraction, lengths, grad norm, lr, tokens/s,
    wall time per stage, and eval avg@n +- se per benchmark over steps; several runs overlaid."""
    from stages import report

    if not runs:
        raise InputError(None, "give one or more run directories")
    dest = output or (runs[0] / "report" if len(runs) == 1 else Path("sgsd_report"))
    path = report.write_report(runs, dest)
    for r in runs:
        try:
            out.print(report.run_summary(r))
        except InputError:
            pass
        if skills:
            out.print(report.skill_stats_table(report.skill_stats(r)))
    out.print(f"report: {path}")
