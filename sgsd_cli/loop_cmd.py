"""`sgsd loop` (options generated from LoopConfig; the other tables come from the recipe) and `sgsd step-problems`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli import progress
from sgsd_cli.common import UTILS, app, cli_errors, console, out, progress_bars
from sgsd_cli.options import stage_command
from stages import loop, report
from stages.engine.config import deprecated

PrintConfig = Annotated[bool, typer.Option("--print-config", metavar="", hidden=True, help="Deprecated: --dry-run.")]
Force = Annotated[bool, typer.Option("--force", metavar="", help="Accept a run directory that was started with another config.")]


@stage_command("loop", loop.LoopConfig, section="loop")
def loop_cmd(sections, source, dry_run: bool = False, print_config: PrintConfig = False, force: Force = False) -> None:
    """The on-policy loop: rollout -> score-teachers -> polarize -> train (-> eval, skill updates) per step, model resident; restartable at any point.

    --config names a TOML recipe with loop, rollout, score_teachers, polarize, train and optional eval,
    update_skills tables (see configs/); every [loop] key is also an option below, and --set section.key=value
    overrides any table.  Many GPUs: torchrun --nproc_per_node N --no-python sgsd loop --config ... (every rank
    generates and scores its share of each step's prompts; the ranks train together; rank 0 prints)."""
    if int(os.environ.get("RANK", "0")) != 0:
        progress.QUIET = True  # under torchrun rank 0 draws the bars and prints the summary
    if print_config:
        deprecated("sgsd loop --print-config", "--dry-run")
        dry_run = True
    if dry_run:  # the run's own config resolution and input checks; stdout: the resolved config (JSON)
        from stages import loop_plan
        from stages.engine.atomic import to_jsonable

        resolved, lines = loop_plan.check(sections, source, force=force)
        out.print_json(json.dumps(to_jsonable(resolved)))
        for line in lines:
            console.print(f"dry run: {line}", highlight=False, markup=False, soft_wrap=True)
        console.print("dry run: every input checked; nothing was run", highlight=False, markup=False)
        return
    with progress_bars() as bars:
        path = loop.run(sections, source=source, force=force, progress=bars,
                        log=lambda s: console.print(s, highlight=False, markup=False))
    if int(os.environ.get("RANK", "0")) == 0:
        out.print(f"metrics: {path}")
        out.print(report.end_of_run(Path(path).parent))


@app.command("step-problems", rich_help_panel=UTILS)
@cli_errors
def step_problems_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Training pool: benchmark name or problems file (id, problem, answer).")],
    step: Annotated[int, typer.Option("--step", help="Loop step, 1-based as `sgsd loop` numbers them (step_0001 is step 1).")],
    per_step: Annotated[int, typer.Option("--per-step", min=1, help="Prompts per step.")],
    out_path: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="The loop's seed.")] = 0,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Folder holding benchmark files.")] = None,
) -> None:
    """Write the problems `sgsd loop` gives one step (its seeded sampler): the shell recipes use it."""
    out.print(str(loop.write_step_problems(pool, step, per_step, seed, out_path, data_dir)))
