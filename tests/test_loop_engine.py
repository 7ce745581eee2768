"""One resident generation engine per loop process: rollout, periodic eval and the online skill update's writer all
generate with it (issue 10).  The writer's replies are replaced by a fixed JSON reply *after* it generated with
the engine, so an update must happen; the new bank version and its items are checked."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from test_loop import _cfg, _run

REPLY = json.dumps({
    "general_skills": [{"title": "Check small cases", "principle": "Try n = 1, 2, 3 before generalising.",
                        "when_to_apply": "Sequences and recurrences."}],
    "common_mistakes": [{"description": "Dropping a boundary case", "why_it_happens": "Rushing the casework",
                         "how_to_avoid": "List every case before solving any"}],
})

EXTRA = """
[eval]
protocol = "quick"
problems = ["{problems}"]
limit = 2
n = 1
max_new_tokens = 4
grade_workers = 1

[update_skills]
success_threshold = 1.0

[update_skills.writer]
max_new_tokens = 4
batch_size = 4
"""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_eval_and_skill_updates_use_the_loop_engine(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import DEMO_PROBLEMS
    from stages import eval as eval_stage
    from stages.engine.generation import fast, hf
    from stages.engine.skills import writer as writer_mod
    from stages.engine.skills.bank import load_bank
    from stages.engine.skills.versions import bank_versions

    built, used = [], []
    for cls in (hf.HFBackend, fast.FastHFBackend):
        orig_init, orig_gen = cls.__init__, cls.generate

        def init(self, *a, _orig=orig_init, **k):
            built.append(self)
            _orig(self, *a, **k)

        def gen(self, *a, _orig=orig_gen, **k):
            used.append(self)
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", init)
        monkeypatch.setattr(cls, "generate", gen)
    writer_engines, eval_engines = [], []
    orig_complete = writer_mod.LocalWriter.complete

    def complete(self, prompts, on_done=None):
        writer_engines.append(self.backend)
        orig_complete(self, prompts, on_done=on_done)  # generates with the engine it was given
        return [REPLY] * len(prompts)

    monkeypatch.setattr(writer_mod.LocalWriter, "complete", complete)
    orig_get = eval_stage._Generator.get

    def get(self):
        out = orig_get(self)
        eval_engines.append(out[0])
        return out

    monkeypatch.setattr(eval_stage._Generator, "get", get)

    cfg = _cfg(tmp_path, tiny_model_dir, steps=2, extra=EXTRA.format(problems=DEMO_PROBLEMS))
    _run(cfg, ["loop.eval_every=1", "loop.skill_update_every=1"])
    run = tmp_path / "run"

    assert len(built) == 1, f"{len(built)} generation engines were built"
    engine = built[0]
    assert eval_engines and all(e is engine for e in eval_engines)
    assert writer_engines and all(e is engine for e in writer_engines)
    assert used.count(engine) == len(used) and len(used) > 4  # rollouts, evals and writer calls
    # step 1: the update must happen (success rate 0 < 1, the writer returns one new skill and one new mistake)
    u1 = json.loads((run / "step_0001" / "skills_update.json").read_text())
    assert u1["decision"] == "updated" and u1["version"] == "v0001"
    labels = [v.label for v in bank_versions(run)]
    assert labels[:2] == ["v0000", "v0001"]
    v0, v1 = load_bank(run / "bank" / "v0000.json"), load_bank(run / "bank" / "v0001.json")
    new_mistakes = [m for m in v1.mistakes if m.get("origin") == "dynamic"]
    assert [(m["description"], m["how_to_avoid"], m["added_in"]) for m in new_mistakes] == [
        ("Dropping a boundary case", "List every case before solving any", "v0001")]
    assert len(v1.mistakes) == len(v0.mistakes) + 1 and v1.version != v0.version
    # step 2 scores its teachers on the updated bank
    man = json.loads((run / "step_0002" / "score_teachers.manifest.json").read_text())
    assert man["config"]["bank"].endswith("v0001.json")
    # step 2: the same reply adds nothing new
    u2 = json.loads((run / "step_0002" / "skills_update.json").read_text())
    assert u2["decision"] == "unchanged"
    for n in (1, 2):
        assert (run / f"step_{n:04d}" / "eval" / "summary.parquet").exists()
        assert set(pl.read_parquet(run / f"step_{n:04d}" / "rollout.parquet")["backend"]) == {"hf"}
