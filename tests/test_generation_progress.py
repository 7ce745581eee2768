"""The transformers backend reports progress per finished sequence, not per batch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hf_backend_reports_each_sequence_as_it_finishes(tiny):
    from stages.engine.generation.base import SamplingConfig
    from stages.engine.generation.hf import HFBackend

    model, tok, _ = tiny
    backend = HFBackend(model, tok)
    prompts = [tok.encode(f"problem {i}: add {i} and {i + 1}") for i in range(6)]
    vocab = len(tok)
    # every third token id stops a sequence: sequences of one batch finish at different steps
    cfg = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12, seed=3, batch_size=12,
                         stop_token_ids=tuple(range(0, vocab, 3)))
    calls = []
    comps = backend.generate(prompts, cfg, on_done=calls.append)
    assert sum(calls) == len(comps) == 12          # every sequence is counted exactly once
    assert all(c >= 1 for c in calls)
    stop_steps = {len(c.token_ids) for c in comps}
    assert len(calls) == len(stop_steps)           # one report per step at which some sequences ended
