"""`sgsd build-index`: options generated from BuildIndexConfig."""

from __future__ import annotations

from dataclasses import replace

from sgsd_cli.common import Force, RunDir, out, progress_bars
from sgsd_cli.options import stage_command
from stages import build_index
from stages.engine.models import pick_device
from stages.engine.skills.index import read_index


@stage_command("build-index", build_index.BuildIndexConfig, section="build_index")
def build_index_cmd(cfg: build_index.BuildIndexConfig, run_dir: RunDir, force: Force = False) -> None:
    """Embed every bank item once; writes RUN_DIR/index.parquet recording the bank version and encoder."""
    cfg = replace(cfg, device=str(pick_device(cfg.device)))
    with progress_bars() as bars:
        path = build_index.run(cfg, run_dir, force=force, progress=bars)
    idx = read_index(path)
    out.print(f"index: {path} (bank version {idx.bank_version}, mode {idx.mode}, encoder {idx.encoder or '-'})")
