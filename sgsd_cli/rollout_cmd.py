"""`sgsd rollout`: options generated from RolloutConfig."""

from __future__ import annotations

from sgsd_cli.common import Force, RunDir, out, parse_shard, progress_bars
from sgsd_cli.options import stage_command
from stages import rollout


@stage_command("rollout", rollout.RolloutConfig, section="rollout", converters={"shard": parse_shard})
def rollout_cmd(cfg: rollout.RolloutConfig, run_dir: RunDir, force: Force = False) -> None:
    """Sample student completions: one row per (problem, sample) with token ids and sampling log-probs."""
    with progress_bars() as bars:
        path = rollout.run(cfg, run_dir, force=force, progress=bars)
    out.print(f"rollouts: {path}")
