"""`sgsd build-index`."""

from __future__ import annotations

from typing import Annotated

import typer

from sgsd_cli.common import PIPELINE, Force, RunDir, app, cli_errors, out, progress_bars
from stages.engine.skills.encoders import DEFAULT_ENCODER


@app.command("build-index", rich_help_panel=PIPELINE)
@cli_errors
def build_index_cmd(
    run_dir: RunDir,
    bank: Annotated[str, typer.Option("--bank", help="Skill bank: .json (shared format), .parquet, or a run's bank/ folder (its latest version).")],
    encoder: Annotated[str, typer.Option("--encoder", help="Sentence encoder: any sentence-transformers model or HF encoder (folder or hub id).")] = DEFAULT_ENCODER,
    mode: Annotated[str, typer.Option("--mode", help="embedding | lexical | hybrid (lexical needs no encoder).")] = "embedding",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items encoded together.")] = 32,
    device: Annotated[str, typer.Option("--device", help="Encoder device: cpu, cuda, auto.")] = "cpu",
    encoder_backend: Annotated[str, typer.Option("--encoder-backend", help="auto (sentence-transformers when the model has its config, else transformers mean pooling), sentence-transformers, hf.")] = "auto",
    force: Force = False,
) -> None:
    """Embed every bank item once; writes RUN_DIR/index.parquet recording the bank version and encoder."""
    from stages import build_index
    from stages.engine.models import pick_device

    dev = str(pick_device(device))
    cfg = build_index.BuildIndexConfig(bank=bank, encoder=encoder, mode=mode, batch_size=batch_size, device=dev,
                                  encoder_backend=encoder_backend)
    with progress_bars() as bars:
        path = build_index.run(cfg, run_dir, force=force, progress=bars)
    from stages.engine.skills.index import read_index

    idx = read_index(path)
    out.print(f"index: {path} (bank version {idx.bank_version}, mode {idx.mode}, encoder {idx.encoder or '-'})")
