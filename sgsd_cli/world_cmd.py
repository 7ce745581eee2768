"""`sgsd world build|calibrate|compare|demo`: the skill world (docs/SKILL_WORLD.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import UTILS, app, cli_errors, console, out, progress_bars

world_app = typer.Typer(help="The skill world: a controlled task family where skill quality is known; build the "
                             "base model, calibrate, compare objectives, demo.", no_args_is_help=True)
app.add_typer(world_app, name="world", rich_help_panel=UTILS)

Config = Annotated[Path | None, typer.Option("--config", help="TOML with a \\[world] table (families, rules, seen, unseen_spread, ...) and an \\[experiment] table (steps, seeds, levels, p_values, lr, ...); see configs/world.toml.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override one setting: world.key=value or experiment.key=value (TOML literal), e.g. --set world.rules=4 --set experiment.seeds=[0]; repeatable.")]
Out = Annotated[Path | None, typer.Option("--out", help="Output folder (overrides experiment.out; default runs/world).")]
Rebuild = Annotated[bool, typer.Option("--rebuild-base", metavar="", help="Build (SFT), calibrate and check the base here even when the shipped base (data/world_base) matches the settings, or a base is cached in the output folder.")]


def _cfg(config: Path | None, sets: list[str] | None, out_dir: Path | None):
    from stages.experiments import world
    from stages.engine.config import load_toml, merge, parse_sets

    data = load_toml(config) if config else {}
    over = parse_sets(sets or [], "experiment")
    cli = {"experiment": {"out": str(out_dir)}} if out_dir else {}
    return world.config_from_sections(merge(data, over, cli), str(config) if config else "--set")


def _log(s: str) -> None:
    console.print(s, highlight=False, markup=False)


@world_app.command("build")
@cli_errors
def build_cmd(config: Config = None, set_: Sets = None, out_dir: Out = None, rebuild: Rebuild = False) -> None:
    """Write the world's files and the base model: the shipped one when its settings match, else built here
    (tiny Qwen3, SFT on the world corpus), calibrated and refused (exit 2) outside the documented bands; cached."""
    from stages.experiments import world

    cfg = _cfg(config, set_, out_dir)
    with progress_bars() as bars:
        P = world.build(cfg, log=_log, progress=bars, rebuild=rebuild)
    out.print(f"base model: {P.base}")


@world_app.command("calibrate")
@cli_errors
def calibrate_cmd(config: Config = None, set_: Sets = None, out_dir: Out = None,
                  force: Annotated[bool, typer.Option("--force", metavar="", help="Measure again even if the calibration is cached.")] = False,
                  rebuild: Rebuild = False) -> None:
    """Measure and print the base's properties and the |Delta| distribution at the rule token per sharpness level."""
    from stages.experiments import world

    cfg = _cfg(config, set_, out_dir)
    with progress_bars() as bars:
        world.calibrate(cfg, log=_log, progress=bars, force=force, rebuild=rebuild)
    out.print(f"calibration: {world.Paths(cfg.out).calib / 'calibration.json'}")


@world_app.command("compare")
@cli_errors
def compare_cmd(config: Config = None, set_: Sets = None, out_dir: Out = None,
                results: Annotated[Path | None, typer.Option("--results", help="Also write the results file (markdown: command, date, machine, versions, base hashes, tuning, per-base tables, pooled figures, claims), e.g. bench/SKILL_WORLD_RESULTS.md.")] = None,
                rebuild: Rebuild = False) -> None:
    """Tune every objective alike (lr grid, GRPO group size, OPSD KL temperature), then run every objective x bank x seed on every base with `sgsd loop`; tables, claims, results.json, PNGs."""
    import sys

    from stages.experiments import world
    from stages.engine.atomic import atomic_write_text

    cfg = _cfg(config, set_, out_dir)
    with progress_bars() as bars:
        res = world.compare(cfg, log=_log, progress=bars, rebuild=rebuild)
    if results:
        atomic_write_text(results, world.results_markdown(res, "sgsd " + " ".join(sys.argv[1:])))
    out.print(f"results: {world.Paths(cfg.out).compare / 'results.json'}  plot: {res['png']}")


@world_app.command("demo")
@cli_errors
def demo_cmd(config: Config = None, set_: Sets = None, out_dir: Out = None, rebuild: Rebuild = False) -> None:
    """The first run: the world and its base model (shipped, or built), train SGSD, print before/after accuracy and the plot path."""
    from stages.experiments import world

    cfg = _cfg(config, set_, out_dir)
    with progress_bars() as bars:
        world.demo(cfg, log=_log, progress=bars, rebuild=rebuild)  # logs the before/after table and the plot's path


@world_app.command("steps")
@cli_errors
def steps_cmd(config: Annotated[list[Path], typer.Option("--config", help="One world config per L, in the order of the table's columns (repeatable), e.g. configs/world_L1.toml, configs/world_L2.toml, configs/world_L3.toml.")],
              set_: Annotated[list[str] | None, typer.Option("--set", help="Override one setting in every config: world.key=value or experiment.key=value (TOML literal), e.g. --set experiment.seeds=[0] for a reduced run (the results file then says REDUCED); repeatable.")] = None,
              results: Annotated[Path | None, typer.Option("--results", help="Write the step sweep's results file (markdown: per L the base, tuning, every method's unseen accuracy, SGSD - GRPO, the misleading half, partial against full skills, calibration groups), e.g. bench/SKILL_WORLD_STEPS.md.")] = None) -> None:
    """The multi-step sweep: `world compare` for each config (one world per L, each tuned on its own base), side by side."""
    import sys

    from stages.experiments import world

    cfgs = [_cfg(c, set_, None) for c in config]
    if len({c.out for c in cfgs}) != len(cfgs):
        from stages.engine.errors import InputError
        raise InputError(str(config[0]), "every config of the step sweep needs its own experiment.out")
    with progress_bars() as bars:
        res = world.steps_sweep(cfgs, log=_log, progress=bars)
    if results:
        world.write_steps_results(res, results, "sgsd " + " ".join(sys.argv[1:]))
        out.print(f"results: {results}")
