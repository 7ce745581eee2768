"""The skill index written by ``sgsd build-index``: item embeddings tied to one bank version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from stages.engine.errors import InputError
from stages.engine.tableio import read_table
from stages.engine.skills.bank import KINDS, SkillBank


@dataclass
class Index:
    path: Path
    bank_version: str
    encoder: str | None
    mode: str
    skill_embeddings: np.ndarray | None
    mistake_embeddings: np.ndarray | None
    encoder_backend: str = "auto"  # how the item embeddings were computed (sentence-transformers / hf-mean-pool)

    @property
    def has_embeddings(self) -> bool:
        return self.skill_embeddings is not None


def read_index(path: str | os.PathLike, bank: SkillBank | None = None) -> Index:
    """Load an index; with ``bank``, check it was built from that bank version and holds its items."""
    path = Path(path)
    df = read_table(path, {"kind": str, "position": int, "item_id": str, "bank_version": str, "mode": str},
                    allow_empty=True)
    versions = df["bank_version"].unique().to_list()
    modes = df["mode"].unique().to_list()
    if len(versions) > 1 or len(modes) > 1:
        raise InputError(path, "index mixes several bank versions or modes")
    if df.height == 0:
        if bank is not None and (bank.skills or bank.mistakes):
            raise InputError(path, "index is empty but the bank has items")
        return Index(path, bank.version if bank else "", None, "lexical", None, None)
    version, mode = versions[0], modes[0]
    if bank is not None:
        if version != bank.version:
            raise InputError(path, f"index was built from bank version {version}, not {bank.version}")
        for kind, (_, fields) in KINDS.items():
            ids = df.filter(pl.col("kind") == kind).sort("position")["item_id"].to_list()
            if ids != [it[fields[0]] for it in bank.items(kind)]:
                raise InputError(path, f"index {kind} ids do not match the bank's")
    encoder = df["encoder"][0] if "encoder" in df.columns else None
    sk = mk = None
    if mode in ("embedding", "hybrid"):
        if "embedding" not in df.columns or df["embedding"].null_count():
            raise InputError(path, f"index in '{mode}' mode has rows without an embedding")
        mats = []
        for kind in KINDS:
            part = df.filter(pl.col("kind") == kind).sort("position")["embedding"].to_list()
            dim = len(df["embedding"][0])
            mats.append(np.asarray(part, dtype=np.float32).reshape(len(part), dim))
        sk, mk = mats
    kind = df["encoder_backend"][0] if "encoder_backend" in df.columns and df["encoder_backend"][0] else "auto"
    backend = {"hf-mean-pool": "hf", "sentence-transformers": "sentence-transformers"}.get(kind, "auto")
    return Index(path, version, encoder, mode, sk, mk, backend)
