"""The typer app: it only registers commands that live in their own modules."""

from __future__ import annotations

import importlib

from sgsd_cli.common import app

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
    "sgsd_cli.skills_cmd",
    "sgsd_cli.utils_cmd",
    "sgsd_cli.inspect_cmd",
    "sgsd_cli.report_cmd",
    "sgsd_cli.world_cmd",
]

def _register() -> None:
    for m in COMMAND_MODULES:
        importlib.import_module(m)


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    main()
