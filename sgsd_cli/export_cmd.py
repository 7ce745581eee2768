"""`sgsd export CHECKPOINT OUT`: options generated from ExportConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import UTILS, console, out, progress_bars
from sgsd_cli.options import stage_command
from stages import export

Checkpoint = Annotated[Path, typer.Argument(help="Checkpoint folder of `sgsd train` / `sgsd sft` (full model or LoRA adapter), a run directory (its newest checkpoint), or a model / LoRA adapter folder.", show_default=False)]
OutDir = Annotated[Path, typer.Argument(help="Folder to write the Hugging Face model to (must be absent or empty unless --force).", show_default=False)]
ExportForce = Annotated[bool, typer.Option("--force", metavar="", help="Replace a non-empty OUT folder (swapped in only once the new export is complete and checked).")]


@stage_command("export", export.ExportConfig, section="export", panel=UTILS)
def export_cmd(cfg: export.ExportConfig, checkpoint: Checkpoint, out_dir: OutDir, force: ExportForce = False) -> None:
    """Write a plain Hugging Face model folder from a checkpoint: LoRA merged into the weights (checked), tokenizer, chat template, generation config, sgsd_export.json; loads in transformers and vLLM, and as --model everywhere."""
    with progress_bars() as bars:
        m = export.run(cfg, checkpoint, out_dir, force=force, progress=bars,
                       log=lambda s: console.print(s, highlight=False, markup=False))
    merge = m["merge"]
    what = "LoRA merged" if merge["adapter"] else "full model"
    extra = ""
    if merge["adapter"]:
        extra = (f", {merge.get('checked', 0)}/{merge.get('lora_weights', 0)} LoRA weights checked on disk, "
                 f"change lost to rounding {merge.get('lost_share', 0.0):.2%}")
        if "probe_max_abs_dlogp" in merge:
            extra += f", probe max |dlogp| {merge['probe_max_abs_dlogp']:.2g}"
    step = m.get("policy_step")
    out.print(f"export: {out_dir}  (from {m['source']}: {what}, {m['dtype']}"
              + (f", policy step {step}" if step is not None else "") + f"{extra})")
