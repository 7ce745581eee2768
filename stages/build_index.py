"""`sgsd build-index`: embed every bank item once so retrieval only encodes queries.  docs/DESIGN.md 1.2.

Output ``<run_dir>/index.parquet``: one row per item (kind, position, item_id, the item text, the
rapidfuzz-processed text of the lexical index, the L2-normalised embedding or null in lexical mode) and,
on every row, the bank version, encoder and mode it was built from.  ``make_retriever`` refuses an
index whose bank version differs from the bank it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import polars as pl

from stages.engine.config import Checked, opt
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.skills.bank import load_bank, require_pairs
from stages.engine.skills.encoders import DEFAULT_ENCODER, load_encoder
from stages.engine.skills.bank import KINDS, SkillBank, item_text
from dataclasses import dataclass

INDEX_MODES = ("embedding", "lexical", "hybrid")

INDEX_SCHEMA = {
    "kind": pl.String,
    "position": pl.Int64,
    "item_id": pl.String,
    "text": pl.String,
    "lexical_text": pl.String,
    "embedding": pl.List(pl.Float32),
    "bank_version": pl.String,
    "encoder": pl.String,
    "encoder_backend": pl.String,
    "mode": pl.String,
}


@dataclass
class BuildIndexConfig(Checked):
    bank: str = opt(help="Skill bank: .json (shared format), .parquet, or a run's bank/ folder (its latest version).", group="Index")
    encoder: str = opt(DEFAULT_ENCODER, "Sentence encoder: any sentence-transformers model or HF encoder (folder or hub id).", group="Index")
    mode: str = opt("embedding", "embedding | lexical | hybrid (lexical needs no encoder).", group="Index", choices=("embedding", "lexical", "hybrid"), what="index mode")
    batch_size: int = opt(32, "Encode batch: bank items embedded together.", group="Index", ge=1, flag="encode-batch", old=("--batch-size",))
    device: str = opt("cpu", "Encoder device: cpu, cuda, auto.", group="Index", key=False)
    encoder_backend: str = opt("auto", "auto (sentence-transformers for a hub id or a folder with its config, refused if the package is missing; transformers mean pooling for a plain folder), sentence-transformers, hf (mean pooling, explicitly).", group="Index", choices=("auto", "sentence-transformers", "hf"))


def index_table(bank: SkillBank, cfg: BuildIndexConfig, on_done: Callable[[int], None] | None = None) -> pl.DataFrame:
    """The index rows of ``bank`` (skills first, then mistakes, in bank order)."""
    from rapidfuzz import utils

    if cfg.mode not in INDEX_MODES:
        raise InputError(None, f"unknown index mode '{cfg.mode}' (use {', '.join(INDEX_MODES)})")
    rows: dict[str, list] = {k: [] for k in INDEX_SCHEMA}
    embed = cfg.mode in ("embedding", "hybrid")
    enc = load_encoder(cfg.encoder, cfg.device, cfg.encoder_backend) if embed else None
    for kind, (_, fields) in KINDS.items():
        items = bank.items(kind)
        texts = [item_text(kind, it) for it in items]
        embs: list = [None] * len(items)
        if enc is not None and items:
            e = enc.encode(texts, batch_size=cfg.batch_size)
            embs = [row.tolist() for row in e]
        for i, (it, t, e) in enumerate(zip(items, texts, embs)):
            rows["kind"].append(kind)
            rows["position"].append(i)
            rows["item_id"].append(it[fields[0]])
            rows["text"].append(t)
            rows["lexical_text"].append(utils.default_process(t))
            rows["embedding"].append(e)
            rows["bank_version"].append(bank.version)
            rows["encoder"].append(cfg.encoder if embed else None)
            rows["encoder_backend"].append(enc.kind if enc is not None else None)
            rows["mode"].append(cfg.mode)
        if on_done:
            on_done(len(items))
    return pl.DataFrame(rows, schema=INDEX_SCHEMA)


def run(cfg: BuildIndexConfig, run_dir: str | Path, *, force: bool = False,
        progress: ProgressFn | None = None) -> Path:
    """Stage entry point: write ``<run_dir>/index.parquet`` (+ manifest)."""
    bank = load_bank(cfg.bank)
    require_pairs(bank, cfg.bank)
    if cfg.mode not in INDEX_MODES:
        raise InputError(None, f"unknown index mode '{cfg.mode}' (use {', '.join(INDEX_MODES)})")
    stage = StageRun(run_dir, "build_index", cfg, inputs={"bank": cfg.bank}, output_name="index", force=force)
    if stage.done:
        return stage.output
    advance = progress("build-index", len(bank.skills) + len(bank.mistakes)) if progress else None
    df = index_table(bank, cfg, on_done=advance)
    dim = len(df["embedding"][0]) if df.height and df["embedding"][0] is not None else None
    stage.finish(df, extra={"bank_version": bank.version, "encoder": cfg.encoder if cfg.mode != "lexical" else None,
                            "mode": cfg.mode, "dim": dim, "skills": len(bank.skills), "mistakes": len(bank.mistakes)})
    return stage.output
