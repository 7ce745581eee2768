"""The typer app: it only registers commands that live in their own modules."""

from __future__ import annotations

import importlib

import typer

from sgsd_cli import progress
from sgsd_cli.common import app, out, report_error
from stages.engine.paths import SGSD_VERSION

# each module registers its command(s) on `app` when imported, in --help order
COMMAND_MODULES = [
    "sgsd_cli.mine_skills_cmd",
    "sgsd_cli.build_index_cmd",
    "sgsd_cli.rollout_cmd",
    "sgsd_cli.score_teachers_cmd",
    "sgsd_cli.polarize_cmd",
    "sgsd_cli.train_cmd",
    "sgsd_cli.eval_cmd",
    "sgsd_cli.loop_cmd",
    "sgsd_cli.sft_cmd",
    "sgsd_cli.export_cmd",
    "sgsd_cli.skills_cmd",
    "sgsd_cli.utils_cmd",
    "sgsd_cli.inspect_cmd",
    "sgsd_cli.report_cmd",
    "sgsd_cli.world_cmd",
]

def _plain_help_flag() -> None:
    """Typer labels its own --help flag with its bool type (``--help  <bool>``); our flags carry no label."""
    try:
        from typer._click.core import Command
    except ImportError:  # another typer layout: keep its default label
        return
    if getattr(Command.get_help_option, "_sgsd_plain", False):
        return
    original = Command.get_help_option

    def get_help_option(self, ctx):
        opt = original(self, ctx)
        if opt is not None and getattr(opt, "metavar", "") is None:
            opt.metavar = ""
        return opt

    get_help_option._sgsd_plain = True
    Command.get_help_option = get_help_option


_plain_help_flag()


def _version(value: bool) -> None:
    if value:
        out.print(f"sgsd {SGSD_VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help="No progress output (bars or log lines)."),
) -> None:
    """Skill-Conditioned Gated Self-Distillation: mine skills, roll out, score with skill-conditioned teachers,
    polarize, train and evaluate LLMs on math reasoning. Every stage reads and writes Parquet under --run-dir,
    records a manifest, and resumes."""
    progress.QUIET = quiet


def _register() -> None:
    for m in COMMAND_MODULES:
        importlib.import_module(m)


def _run_dir_arg(argv: list[str]) -> str | None:
    """The run directory a command line names (``--run-dir X``, ``--run-dir=X``, ``--set [section.]run_dir=X``, or
    the ``run_dir`` of the command's table in its ``--config`` recipe), read without importing any stage."""
    found = None
    cfg = None
    for i, a in enumerate(argv):
        val = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--run-dir" and val is not None:
            found = val
        elif a.startswith("--run-dir="):
            found = a.split("=", 1)[1]
        elif a == "--set" and val is not None and val.split("=", 1)[0].split(".")[-1] == "run_dir" and "=" in val:
            v = val.split("=", 1)[1].strip()
            found = v.strip("'\"") if v[:1] in "'\"" else v
        elif a == "--config" and val is not None:
            cfg = val
    command = next((a for a in argv if not a.startswith("-")), None)
    if found is None and cfg is not None and command:
        try:
            import tomllib

            with open(cfg, "rb") as f:
                table = tomllib.load(f).get(command.replace("-", "_"), {})
            found = table.get("run_dir") if isinstance(table, dict) and isinstance(table.get("run_dir"), str) else None
        except (OSError, ValueError):
            return None  # the command itself reports a bad recipe
    return found


# the commands that lock their --run-dir (the stages, the loop, the online skill update)
LOCKING_COMMANDS = {"rollout", "score-teachers", "polarize", "train", "eval", "loop", "sft", "mine-skills",
                    "build-index", "skills update"}


def _refuse_busy_run_dir(argv: list[str]) -> None:
    """A run directory another process holds is refused now, in one line, before the stages' heavy imports
    (torch, transformers: many seconds); the stage takes the lock itself later."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if not words or (words[0] not in LOCKING_COMMANDS and " ".join(words) not in LOCKING_COMMANDS):
        return  # a command that only reads (inspect, report, skills show ...) may look at a busy run directory
    run_dir = _run_dir_arg(argv)
    if not run_dir or "--help" in argv or "--dry-run" in argv:
        return
    from stages.engine.locks import run_dir_in_use

    err = run_dir_in_use(run_dir)
    if err is not None:
        report_error(err)
        raise SystemExit(2)


def main() -> None:
    import sys

    _refuse_busy_run_dir(sys.argv[1:])
    _register()
    app()


if __name__ == "__main__":
    main()
