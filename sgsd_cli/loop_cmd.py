"""`sgsd loop`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, app, cli_errors, console, out, progress_bars
from stages import loop
from stages.engine.config import resolve


@app.command("loop", rich_help_panel=PIPELINE)
@cli_errors
def loop_cmd(
    config: Annotated[Path, typer.Option("--config", help="TOML recipe with loop, rollout, score_teachers, polarize, train and optional eval, update_skills tables (see configs/).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one option: section.key=value (TOML literal), e.g. --set train.lr=1e-5 --set loop.steps=3; repeatable.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (overrides loop.run_dir).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Initial policy (overrides loop.model).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Loop steps (overrides loop.steps).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="torch device (overrides loop.device).")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config of every stage as JSON and exit.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Accept a run directory that was started with another config.")] = False,
) -> None:
    """The on-policy loop: rollout -> score-teachers -> polarize -> train (-> eval, skill updates) per step, model resident; restartable at any point."""
    cli = {"loop": {"run_dir": str(run_dir) if run_dir else None, "model": model, "steps": steps, "device": device}}
    sections, source = resolve(config, set_ or [], cli)
    if print_config:
        out.print_json(json.dumps(loop.build_sections(sections, source).resolved()))
        return
    with progress_bars() as bars:
        path = loop.run(sections, source=source, force=force, progress=bars,
                        log=lambda s: console.print(s, highlight=False, markup=False))
    out.print(f"metrics: {path}")
