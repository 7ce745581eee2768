"""`sgsd mine-skills`: options generated from MineSkillsConfig (its writer and mining parameters included)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sgsd_cli.common import Force, RunDir, out, progress_bars
from sgsd_cli.options import stage_command
from stages.engine.errors import InputError
from stages.mine_skills import MineSkillsConfig


def json_object(text: str) -> dict:
    """``--writer-extra``: a JSON object merged into each writer request body."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(None, f"--writer-extra is not valid JSON ({e.msg})") from None
    if not isinstance(body, dict):
        raise InputError(None, "--writer-extra must be a JSON object")
    return body


WRITER_CONVERTERS = {"writer.extra_body": json_object}


def writer_on_stage_device(cfg):
    """A local writer runs on the stage's device and dtype."""
    return replace(cfg, writer=replace(cfg.writer, device=cfg.device, dtype=cfg.dtype))


Rollouts = Annotated[Path | None, typer.Option("--rollouts", help="Rollout table of training problems (from `sgsd rollout`; graded or not). Unset: sample one with --model.", rich_help_panel="Inputs")]
Grades = Annotated[Path | None, typer.Option("--grades", help="Grade table with rollout_id, correct (e.g. polarize_rollouts.parquet) when --rollouts has no 'correct' column.", rich_help_panel="Inputs")]


@stage_command("mine-skills", MineSkillsConfig, section="mine_skills", converters=WRITER_CONVERTERS)
def mine_skills_cmd(cfg: MineSkillsConfig, run_dir: RunDir, rollouts: Rollouts = None, grades: Grades = None,
                    force: Force = False) -> None:
    """Mine a skill bank from graded attempts: memories -> writer candidates -> hierarchical merge.

    Writes memories.parquet, candidates.parquet, skill_bank.parquet and skill_bank.json under --run-dir;
    a rerun resumes after the last finished step."""
    from stages import mine_skills

    cfg = writer_on_stage_device(cfg)
    with progress_bars() as bars:
        res = mine_skills.run(cfg, run_dir, rollouts=rollouts, grades=grades, force=force, progress=bars)
    s = res.summary
    t = Table(title="mine-skills", show_header=True)
    t.add_column("step")
    t.add_column("result")
    m, c, b = s["memories"], s["candidates"], s["bank"]
    t.add_row("memories", f"{m['attempts']} attempts, {m['successes']} successes ({res.memories.name})")
    status = ", ".join(f"{k} {v}" for k, v in sorted(c["parse_status"].items()))
    t.add_row("candidates", f"{c['skills']} skills, {c['mistakes']} mistakes from {c['replies']} replies [{status}] ({res.candidates.name})")
    t.add_row("bank", f"{b['skills']} skills, {b['mistakes']} mistakes, version {b['version']}; merge failures "
                      f"{b['merge_failures']}, duplicates removed {b['exact_duplicates_removed']} exact + "
                      f"{b['near_duplicates_removed']} near")
    out.print(t)
