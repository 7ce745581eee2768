"""A hub id that cannot be loaded fails at once with one line (no minutes of retries)."""

from __future__ import annotations

import time

import pytest

from stages.engine.errors import InputError
from stages.engine.models import ModelSpec


def test_uncached_hub_id_offline_is_one_line_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        ModelSpec.parse("sgsd-test/no-such-model-xyz").check()
    assert time.time() - t0 < 5


def test_missing_repo_and_unreachable_hub(monkeypatch):
    import huggingface_hub as hh
    from huggingface_hub.utils import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hh, "try_to_load_from_cache", lambda *a, **k: None)

    def missing(*a, **k):  # what the hub answers for a repository that does not exist (built without a response)
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(hh, "model_info", missing)
    with pytest.raises(InputError, match="no such model on the Hugging Face hub"):
        ModelSpec.parse("sgsd-test/typo-model").check()

    def down(*a, **k):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(hh, "model_info", down)
    with pytest.raises(InputError, match="hub is unreachable"):
        ModelSpec.parse("sgsd-test/typo-model").check()


def test_cached_hub_id_passes(monkeypatch):
    import huggingface_hub as hh

    monkeypatch.setattr(hh, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    ModelSpec.parse("Qwen/Qwen3-1.7B").check()  # no request made
