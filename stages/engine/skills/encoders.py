"""Sentence encoders for embedding retrieval: sentence-transformers, or mean pooling over a transformers model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from stages.engine.errors import InputError


DEFAULT_ENCODER = "Qwen/Qwen3-Embedding-0.6B"


class Encoder:
    """Texts -> L2-normalised float32 embeddings.  ``query=True`` applies the model's query prompt (a
    sentence-transformers "query" prompt; retrieval asks for it only with ``query_prompt``: the reference
    encodes the raw problem, skill_memory.py:179-184)."""

    name: str
    kind: str

    def encode(self, texts: Sequence[str], *, query: bool = False, batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEncoder(Encoder):
    kind = "sentence-transformers"

    def __init__(self, name: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(name, device=device)
        prompts = getattr(self.model, "prompts", None) or {}
        self.query_prompt = "query" if prompts.get("query") else None

    def encode(self, texts, *, query=False, batch_size=32):
        if len(texts) == 0:
            return np.zeros((0, self.model.get_sentence_embedding_dimension() or 0), dtype=np.float32)
        kw = {"prompt_name": self.query_prompt} if query and self.query_prompt else {}
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False, **kw)
        return np.asarray(emb, dtype=np.float32)


class MeanPoolEncoder(Encoder):
    """Any HF encoder through transformers AutoModel: attention-masked mean of the last hidden states."""

    kind = "hf-mean-pool"

    def __init__(self, name: str, device: str = "cpu", max_length: int = 512):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name, dtype=torch.float32).to(self.device).eval()
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)

    def encode(self, texts, *, query=False, batch_size=32):
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def _has_st_config(name: str) -> bool:
    p = Path(name)
    return (p / "modules.json").exists() or (p / "config_sentence_transformers.json").exists()


def load_encoder(name: str, device: str = "cpu", backend: str = "auto") -> Encoder:
    """``backend``: auto (sentence-transformers for a hub id or a folder with its config, refused when the
    package is missing; transformers mean pooling for a plain folder), ``sentence-transformers`` or ``hf``
    (mean pooling, asked for explicitly).  Loaded encoders are cached."""
    return _load_encoder(str(name), str(device), backend or "auto")


load_encoder.cache_clear = lambda: _load_encoder.cache_clear()  # type: ignore[attr-defined]


@lru_cache(maxsize=4)
def _load_encoder(name: str, device: str, backend: str) -> Encoder:
    if backend not in ("auto", "sentence-transformers", "hf"):
        raise InputError(None, f"unknown encoder backend '{backend}' (use auto, sentence-transformers or hf)")
    p = Path(name)
    if (p.exists() or name.startswith((".", "/", "~"))) and not p.is_dir():
        raise InputError(name, "encoder path is not a folder" if p.exists() else "encoder folder does not exist")
    if backend == "auto":
        try:
            import sentence_transformers  # noqa: F401

            have_st = True
        except ImportError:
            have_st = False
        st_model = not p.is_dir() or _has_st_config(name)  # a hub id (e.g. the paper's) or a folder with its config
        if st_model and not have_st:
            # mean pooling of a model built for another pooling (Qwen3-Embedding: last token, query prompts)
            # retrieves other teachers: refuse rather than change the method silently
            raise InputError(name, "this encoder needs sentence-transformers, which is not installed (pip install "
                                   "'sgsd[embed]'); mean pooling over transformers would retrieve other teachers "
                                   "(to use it anyway: sgsd build-index --encoder-backend hf, then score with that index)")
        backend = "sentence-transformers" if st_model else "hf"
    try:
        if backend == "sentence-transformers":
            return SentenceTransformerEncoder(name, device)
        return MeanPoolEncoder(name, device)
    except ImportError as e:
        raise InputError(name, f"cannot load encoder ({e}; pip install 'sgsd[embed]')") from None
    except Exception as e:  # OSError, ValueError, hub errors offline ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(name, f"cannot load encoder ({msg[:200]})") from None
