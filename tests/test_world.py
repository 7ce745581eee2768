"""The skill world: ground truth with hand-computed values, bank properties, validation (one line, exit 2),
and the learning regression test (SGSD raises unseen-family accuracy of a base trained from scratch)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from stages.engine.errors import InputError
from stages.engine.world import LEVELS, World, WorldConfig, apply_rule, check_p


def test_rules_by_hand():
    assert [apply_rule(r, 7, 3) for r in ("sum", "difference", "product", "maximum", "minimum", "remainder")] == \
        [10, 4, 21, 7, 3, 1]
    assert apply_rule("difference", 3, 7) == 4 and apply_rule("remainder", 3, 7) == 3


def test_following_law_by_hand():
    w = World(WorldConfig())
    u = w.unseen[0]
    right = w.rule_of[u]
    other = next(r for r in w.rules if r != right)
    # unseen family, plain: uniform over R = 6
    assert w.plain(u)[right] == pytest.approx(1 / 6)
    # skill naming {right, other}, "usually" (q = 0.7): 0.7 * 1/2 + 0.3 * 1/6 = 0.4
    sk = {"family": u, "rules": [right, other], "hedge": "usually"}
    d = w.guided_distribution(u, sk, None)
    assert d[right] == pytest.approx(0.4) and d[other] == pytest.approx(0.4)
    assert sum(d.values()) == pytest.approx(1.0)
    # + a mistake excluding `other`, "always" is not used when the skill is own: q stays 0.7 -> 0.7 + 0.05
    mi = {"family": u, "rule": other, "hedge": "usually"}
    assert w.guided_distribution(u, sk, mi)[right] == pytest.approx(0.75)
    # guidance about another family is ignored
    g = w.families[0] if w.families[0] != u else w.families[1]
    assert w.guided_distribution(u, {"family": g, "rules": [other], "hedge": "always"}, None) == w.plain(u)
    # seen family: plain is the right rule; a sharp misleading skill moves all mass to the named rule
    s = w.seen[0]
    rs, wrong = w.rule_of[s], next(r for r in w.rules if r != w.rule_of[s])
    assert w.plain(s)[rs] == 1.0
    assert w.guided_distribution(s, {"family": s, "rules": [wrong], "hedge": "always"}, None)[wrong] == 1.0
    # teacher gap at the rule token of a correct rollout, base uniform: log(R q / k + 1 - q)
    for lv in LEVELS.values():
        S = [right] + [r for r in w.rules if r != right][: lv.k - 1]
        t = w.guided_distribution(u, {"family": u, "rules": S, "hedge": lv.hedge}, None)[right]
        assert math.log(t / (1 / 6)) == pytest.approx(math.log(6 * lv.q / lv.k + 1 - lv.q))
    # spread knob: the right rule of an unseen family gets unseen_spread / R
    w2 = World(WorldConfig(unseen_spread=0.5))
    assert w2.plain(u)[w2.rule_of[u]] == pytest.approx(0.5 / 6)


def test_banks_misleading_fraction_and_format(tmp_path):
    from stages.engine.skills.bank import load_bank

    w = World(WorldConfig())
    for p in (0.0, 0.5, 1.0):
        b = w.bank(p, "medium")
        n = len(b["general_skills"])
        assert n == len(w.families) * w.cfg.items_per_family
        bad_s = [s for s in b["general_skills"] if s["misleading"]]
        bad_m = [m for m in b["common_mistakes"] if m["misleading"]]
        assert len(bad_s) == len(bad_m) == round(p * n)
        for s in b["general_skills"]:
            f = s["world"]["family"]
            assert len(s["world"]["rules"]) == 2 and s["world"]["hedge"] == "usually"
            assert (w.rule_of[f] not in s["world"]["rules"]) == s["misleading"]
            assert f in s["principle"] and " or ".join(s["world"]["rules"]) in s["principle"]
        for m in b["common_mistakes"]:
            assert (m["world"]["rule"] == w.rule_of[m["world"]["family"]]) == m["misleading"]
        path = tmp_path / f"b{p}.json"
        path.write_text(json.dumps(b))
        bank = load_bank(path)  # the shared format: loads through the usual path
        assert len(bank.skills) == n


def test_corpus_carries_no_unseen_rule():
    """Plain rows of seen families use the right rule; on unseen families the plain rule is ~uniform."""
    w = World(WorldConfig(corpus_size=6000))
    rows = w.corpus()
    kinds = {r["kind"] for r in rows}
    assert kinds == {"plain", "guidance", "opsd"}
    for r in rows:
        if r["kind"] == "plain" and r["family"] in w.seen:
            assert f"rule: {w.rule_of[r['family']]} " in r["completion"]
    unseen_plain = [r for r in rows if r["kind"] == "plain" and r["family"] in w.unseen]
    hit = sum(f"rule: {w.rule_of[r['family']]} " in r["completion"] for r in unseen_plain) / len(unseen_plain)
    assert abs(hit - 1 / 6) < 0.04
    # held-out problems never appear in the corpus
    held = {w.problem_text(f, a, b) for f in w.families for a, b in w.split[f][1]}
    assert not any(any(h in r["prompt"] for h in held) for r in rows[:2000])


@pytest.mark.parametrize("sets,needle", [
    (["world.rules=1"], "R"),
    (["world.seen=12"], "unseen"),
    (["experiment.p_values=[1.5]"], "p must be in [0, 1]"),
    (["experiment.p_values=[-0.1]"], "p must be in [0, 1]"),
])
def test_bad_world_settings_one_line_exit_2(tmp_path, sets, needle):
    from stages.experiments.world import config_from_sections
    from stages.engine.config import parse_sets

    with pytest.raises(InputError):
        config_from_sections(parse_sets(sets, "experiment"))
    args = [sys.executable, "-m", "sgsd_cli.main", "world", "build", "--out", str(tmp_path / "w")]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "w").exists()


def test_check_p():
    assert check_p(0.5) == 0.5
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(InputError):
            check_p(bad)


def test_gate_by_hand():
    from stages.experiments.world import gate_band, gate_grad

    # |dl/dD| = D sigmoid(-D^2/2): at D = 1, 1 / (1 + e^0.5) = 0.37754
    assert gate_grad(1.0) == pytest.approx(0.377541, abs=1e-6)
    lo, peak, hi = gate_band()
    assert peak == pytest.approx(1.22, abs=0.02)  # docs/DESIGN.md 1.4: the gate's gradient peaks near 1.22
    assert gate_grad(lo) == pytest.approx(0.5 * gate_grad(peak), rel=0.01)
    assert lo < peak < hi


# --------------------------------------------------------------------------------------------------
# the base: shipped with a manifest, rebuilt bases checked against the bands


def test_base_outside_its_bands_is_refused(tmp_path):
    """A base built with far too few SFT steps does not know the seen families: `world build` refuses it with
    one line naming the property and its value, exit 2, and nothing is left where a base would be used."""
    out = tmp_path / "w"
    args = [sys.executable, "-m", "sgsd_cli.main", "world", "build", "--out", str(out),
            "--set", "world.families=4", "--set", "world.rules=2", "--set", "world.seen=2",
            "--set", 'world.rule_set=["maximum", "minimum"]', "--set", "world.heldout_pairs=8",
            "--set", "world.items_per_family=1", "--set", "world.corpus_size=200", "--set", "experiment.hidden_size=64",
            "--set", "experiment.vocab_size=600", "--set", "experiment.sft_steps=3", "--set", "experiment.sft_batch_size=8",
            "--set", 'experiment.levels=["sharp"]', "--set", 'experiment.calibrated_level="sharp"',
            "--set", "experiment.p_values=[0.0]", "--set", "experiment.final_eval_n=2"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]  # the build's progress is logged above it
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    assert "outside the world's bands: seen_accuracy = " in errors[0], errors
    assert not (out / "base").exists() and not (out / "build.json").exists()
    man = json.loads((out / "base.rejected" / "world_base.json").read_text())
    assert man["calibration"]["outside"] and man["calibration"]["properties"]["seen_accuracy"] < 0.95


def test_shipped_base_manifest_and_hashes(tmp_path):
    import shutil

    from stages.engine.atomic import file_hash
    from stages.experiments.world import SHIPPED_BASE, base_stamp, config_from_sections, shipped_base, verify_base
    from stages.engine.config import load_toml
    from pathlib import Path

    cfg = config_from_sections(load_toml(Path(__file__).resolve().parents[1] / "configs" / "world.toml"))
    man = verify_base(SHIPPED_BASE)
    assert man["stamp"] == base_stamp(cfg) and shipped_base(cfg) == SHIPPED_BASE
    # every file listed with its sha256, computed independently here
    import hashlib
    for name, h in man["files"].items():
        assert hashlib.sha256((SHIPPED_BASE / name).read_bytes()).hexdigest() == h == file_hash(SHIPPED_BASE / name)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(man["files"])
    assert man["calibration"]["outside"] == [] and {"torch", "transformers"} <= set(man["versions"])
    # another world seed is not the shipped base's world
    from dataclasses import replace
    assert shipped_base(replace(cfg, world=replace(cfg.world, seed=cfg.world.seed + 1))) is None
    # one changed byte is caught, naming the file
    bad = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, bad)
    p = bad / "config.json"
    p.write_text(p.read_text() + " ")
    with pytest.raises(InputError, match="config.json"):
        verify_base(bad)


@pytest.mark.parametrize("L", [2, 3])
def test_shipped_multi_step_bases_match_their_configs(L):
    """data/world_base_L<L> is the base of configs/world_L<L>.toml: its stamp, every file's sha256 (computed here),
    inside every band of its L (3 per step + 2), and the one shipped_base() picks for that config."""
    import hashlib

    from stages.engine.config import load_toml
    from stages.experiments.world import SHIPPED_BASES, base_bands, base_stamp, config_from_sections, shipped_base, verify_base

    cfg = config_from_sections(load_toml(Path(__file__).resolve().parents[1] / "configs" / f"world_L{L}.toml"))
    path = SHIPPED_BASES[L - 1]
    man = verify_base(path)
    assert man["stamp"] == base_stamp(cfg) and man["stamp"]["world"]["steps"] == L
    assert shipped_base(cfg) == path
    for name, h in man["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == h
    props = man["calibration"]["properties"]
    bands = base_bands(cfg)
    assert man["calibration"]["outside"] == [] and len(bands) == 2 + 6 * L
    for key, _, lo, hi in bands:
        assert lo <= props[key] <= hi, (key, props[key])


# --------------------------------------------------------------------------------------------------
# learning regression: a small world, its base trained from scratch here, SGSD through the ordinary loop


def _unseen_right_prob(P, world, model_dir):
    """Exact mean p(right rule | plain prompt) at the decision token on held-out unseen problems."""
    from stages.engine.models import load_model
    from stages.engine.prompts import chat_prompt_ids, student_prompt
    from stages.experiments.world import rule_probs

    model, tok, _ = load_model(str(model_dir), device="cpu")
    rows = world.problems(world.unseen, "eval")
    ab = [tuple(int(x) for x in r["id"].split("-")[1:]) for r in rows]
    ds = rule_probs(model, tok, [chat_prompt_ids(tok, student_prompt(r["problem"]), False) for r in rows],
                    world.rules, ab)
    return sum(d[world.rule_of[r["family"]]] for d, r in zip(ds, rows)) / len(rows)


# the learning test's run: the demo's recipe (configs/world.toml: medium bank, p = 0, 16 rollouts per step) at
# lr 5e-4 on the shipped base, shortened to LEARN_STEPS loop steps
LEARN_STEPS = 20


@pytest.fixture(scope="module")
def shipped_world(tmp_path_factory):
    from dataclasses import replace
    from pathlib import Path

    from stages.engine.config import load_toml
    from stages.experiments.world import BASE_MANIFEST, config_from_sections, build

    cfg = config_from_sections(load_toml(Path(__file__).resolve().parents[1] / "configs" / "world.toml"))
    cfg = replace(cfg, out=str(tmp_path_factory.mktemp("world") / "w"), steps=LEARN_STEPS, eval_every=LEARN_STEPS, lr=5e-4,
                  eval_n=1, p_values=[0.0], levels=[cfg.calibrated_level])
    logs: list[str] = []
    P = build(cfg, log=logs.append)
    assert any("using the shipped base" in ln for ln in logs), logs  # no SFT here: the shipped base
    assert (P.base / BASE_MANIFEST).exists()
    return cfg, P, World(cfg.world)


def _flip_polarity(monkeypatch):
    import stages.polarize as pz

    monkeypatch.setattr(pz, "polarity", lambda o, sigma: -o * sigma)


def _flip_loss(monkeypatch):
    import stages.engine.objectives.sgsd as tr

    orig = tr.rollout_loss
    monkeypatch.setattr(tr, "rollout_loss", lambda *a, **k: -orig(*a, **k))


def _sgsd_run(cfg, P, monkeypatch, breakage):
    """SGSD through the ordinary loop from the world's base, with the polarity's or the loss's sign flipped when
    ``breakage`` says so; the last step's checkpoint."""
    from stages import loop
    from stages.experiments.world import RunSpec, loop_sections

    if breakage == "polarity":
        _flip_polarity(monkeypatch)
    elif breakage == "loss":
        _flip_loss(monkeypatch)
    spec = RunSpec("sgsd", 0.0, cfg.calibrated_level, 0)
    run_dir = P.compare / f"{spec.name}_{breakage or 'ok'}"
    loop.run(loop_sections(cfg, P, spec, run_dir))
    return loop.step_dir(run_dir, cfg.steps) / "checkpoint"


@pytest.mark.parametrize("breakage", [None, "polarity", "loss"])
def test_sgsd_learns_unseen_families(shipped_world, monkeypatch, breakage):
    """SGSD (verifier polarity), started from the shipped base, raises p(right rule) on held-out unseen families.

    On the shipped base this run (20 steps x 16 rollouts, lr 5e-4) moves the exact mean p(right rule) from 0.181 to
    0.286 (measured 2026-12-06); the assertion asks for +0.06, a little over half of that.  The same run with the
    sign of the polarity (rho = -o sigma) or of the loss flipped must not gain (measured: both fall to 0.018)."""
    cfg, P, world = shipped_world
    before = _unseen_right_prob(P, world, P.base)
    assert abs(before - 0.181) < 0.01  # the shipped base (calibration: p(right rule | plain) 0.18)
    after = _unseen_right_prob(P, world, _sgsd_run(cfg, P, monkeypatch, breakage))
    print(f"\nunseen p(right rule): base {before:.3f} -> SGSD ({breakage or 'as built'}) {after:.3f}")
    if breakage is None:
        assert after > before + 0.06, (before, after)
    else:
        assert after < before + 0.01, (before, after)


# --------------------------------------------------------------------------------------------------
# multi-step worlds (world.steps = L >= 2): hand-valued generator checks


def test_chain_by_hand():
    from stages.engine.world import answer_text, apply_chain

    # step 1: product 7 3 = 21; step 2: difference 21 4 = 17
    assert apply_chain(["product", "difference"], (7, 3, 4)) == [21, 17]
    # step 1: sum 2 5 = 7; step 2: remainder 7 4 = 3; step 3: maximum 3 6 = 6
    assert apply_chain(["sum", "remainder", "maximum"], (2, 5, 4, 6)) == [7, 3, 6]
    assert World.chain_completion(["product", "difference"], (7, 3, 4)) == \
        "step 1: product 7 3 = 21; step 2: difference 21 4 = 17; \\boxed{(21, 17)}"
    assert answer_text([21, 17]) == "(21, 17)" and answer_text([10]) == "10"
    assert World.problem_text("zorb", 7, 3, 4) == "In a zorb problem, combine 7, 3 and 4."
    assert World.problem_text("zorb", 7, 3) == "In a zorb problem, combine 7 and 3."  # the one-step text


def test_two_step_answer_right_only_when_every_step_is():
    """The grader-facing answer is the ordered tuple of the step values: a chain wrong at either step is graded
    wrong, also when its final value is the right one."""
    from stages.engine.verify import grade

    w = World(WorldConfig(steps=2))
    f = next(g for g in w.families if w.chain_of[g] == ["maximum", "product"])  # a family of world seed 0
    row = w.problem_row(f, 3, 2, 4)
    assert row["answer"] == "(3, 12)" and row["id"] == f"{f}-3-2-4"  # max(3, 2) = 3; 3 * 4 = 12

    def ok(rules):
        return grade(w.completion_of(rules, (3, 2, 4)), row["answer"]).correct

    assert ok(["maximum", "product"])
    assert not ok(["sum", "product"])          # step 1 wrong: (5, 20)
    assert not ok(["maximum", "sum"])          # step 2 wrong: (3, 7)
    assert not ok(["minimum", "maximum"])      # both wrong: (2, 4)
    # a wrong step hidden in the final value: step 1 minimum gives 2, then sum 2 4 = 6 ... and a right final value
    # from a wrong chain: difference 3 2 = 1, then product 1 4 = 4 != 12; remainder 3 2 = 1 -> (1, 4): wrong
    assert not ok(["remainder", "product"])
    # (12, 3): the right values in the wrong order is not the answer
    assert not grade("\\boxed{(12, 3)}", row["answer"]).correct


def test_final_value_alone_would_hide_a_wrong_step():
    """Why the answer is the tuple: with maximum at step 2, a wrong step 1 often leaves the final value right."""
    from stages.engine.world import apply_chain

    assert apply_chain(["sum", "maximum"], (2, 3, 9))[-1] == apply_chain(["product", "maximum"], (2, 3, 9))[-1] == 9
    assert apply_chain(["sum", "maximum"], (2, 3, 9)) != apply_chain(["product", "maximum"], (2, 3, 9))


def test_chain_pool_by_hand():
    from stages.engine.world import chain_pool

    pool = set(chain_pool(("sum", "difference", "product", "maximum", "minimum", "remainder"), 2))
    assert (2, 3, 4) in pool          # the largest value of any chain: 2 * 3 * 4 = 24
    assert (9, 8, 2) not in pool      # product, product: 144 > 99
    assert (4, 4, 2) not in pool      # the first two operands differ, as in the one-step world
    assert (3, 9, 3) in pool          # 27 * 3 = 81, 12 * 3 = 36
    assert (4, 9, 3) not in pool      # 36 * 3 = 108
    w = World(WorldConfig(steps=2))
    for f in w.families:
        train, held = w.split[f]
        assert len(held) == 16 and not set(train) & set(held) and len(train) + len(held) == len(pool)


def test_two_step_following_law_by_hand():
    w = World(WorldConfig(steps=2))
    u = w.unseen[0]
    c = w.chain_of[u]
    other = [r for r in w.rules if r not in c][0]
    # plain: uniform over R = 6 at each step
    assert w.plain_step(u, 0)[c[0]] == pytest.approx(1 / 6) and w.plain_step(u, 1)[c[1]] == pytest.approx(1 / 6)
    # full skill naming {right, other} at both steps, usually (q = 0.7): 0.7 / 2 + 0.3 / 6 = 0.4 at each step
    full = {"family": u, "steps": [1, 2], "rules": [[c[0], other], [c[1], other]], "hedge": "usually"}
    assert w.guided_step(u, 0, full, None)[c[0]] == pytest.approx(0.4)
    assert w.guided_step(u, 1, full, None)[c[1]] == pytest.approx(0.4)
    # a first-step-only skill leaves step 2 at the plain law
    first = {"family": u, "steps": [1], "rules": [[c[0]]], "hedge": "always"}
    assert w.guided_step(u, 0, first, None)[c[0]] == pytest.approx(1.0)
    assert w.guided_step(u, 1, first, None) == w.plain_step(u, 1)
    # a mistake at step 2 acts at step 2 only: always avoid `other` -> 1/5 on each remaining rule
    mi = {"family": u, "step": 2, "rule": other, "hedge": "always"}
    assert w.guided_step(u, 1, None, mi)[c[1]] == pytest.approx(1 / 5) and w.guided_step(u, 1, None, mi)[other] == 0
    assert w.guided_step(u, 0, None, mi) == w.plain_step(u, 0)
    # another family's guidance is ignored
    g = next(x for x in w.families if x != u)
    assert w.guided_step(u, 1, {**full, "family": g}, None) == w.plain_step(u, 1)
    # seen family: the base knows every step
    s = w.seen[0]
    assert [max(w.plain_step(s, j), key=w.plain_step(s, j).get) for j in range(2)] == w.chain_of[s]
    # L = 1 is the one-step law: the step form of a one-step item gives guided_distribution's numbers
    w1 = World(WorldConfig())
    u1 = w1.unseen[0]
    sk = {"family": u1, "rules": [w1.rule_of[u1], other], "hedge": "usually"}
    mi1 = {"family": u1, "rule": other, "hedge": "usually"}
    assert w1.guided_step(u1, 0, sk, mi1) == pytest.approx(w1.guided_distribution(u1, sk, mi1))


def test_two_step_banks_by_hand():
    w = World(WorldConfig(steps=2))
    n = len(w.families) * w.cfg.items_per_family
    for part, named in (("full", [1, 2]), ("first", [1]), ("last", [2])):
        for p in (0.0, 0.5):
            b = w.bank(p, "medium", part=part)
            assert b["metadata"]["part"] == part
            bad = [s for s in b["general_skills"] if s["misleading"]]
            assert len(bad) == round(p * n) == len([m for m in b["common_mistakes"] if m["misleading"]])
            for s in b["general_skills"]:
                f, x = s["world"]["family"], s["world"]
                assert x["steps"] == named and all(len(rs) == 2 for rs in x["rules"])
                missing = [st for st, rs in zip(x["steps"], x["rules"]) if w.chain_of[f][st - 1] not in rs]
                # a misleading skill omits the right rule at exactly one step it names; the others name it
                assert missing == ([s["misleading_step"]] if s["misleading"] else [])
                assert all(f"at step {st} by {' or '.join(rs)}" in s["principle"] for st, rs in zip(x["steps"], x["rules"]))
            for m in b["common_mistakes"]:
                f, x = m["world"]["family"], m["world"]
                assert x["step"] in named and (x["rule"] == w.chain_of[f][x["step"] - 1]) == m["misleading"]
                assert f"at step {x['step']}" in m["how_to_avoid"]
    with pytest.raises(InputError, match="multi-step"):
        World(WorldConfig()).bank(0.0, "medium", part="first")


def test_two_step_corpus_follows_the_law():
    """Seen plain rows write the family's whole procedure; unseen plain rows hit it with ~(1/6)^2 at random;
    OPSD rows' completions reach the answer they were given; every value is the chain's."""
    import re

    from stages.engine.world import apply_chain

    w = World(WorldConfig(steps=2, corpus_size=4000))
    rows = w.corpus()
    pat = re.compile(r"step 1: (\w+) (\d+) (\d+) = (\d+); step 2: (\w+) (\d+) (\d+) = (\d+); \\boxed\{\((\d+), (\d+)\)\}$")
    un = []
    for r in rows:
        m = pat.fullmatch(r["completion"])
        assert m, r["completion"]
        r1, a, b, v1, r2, x, c, v2, t1, t2 = m.groups()
        assert apply_chain([r1, r2], (int(a), int(b), int(c))) == [int(v1), int(v2)] == [int(t1), int(t2)] and x == v1
        if r["kind"] == "plain" and r["family"] in w.seen:
            assert [r1, r2] == w.chain_of[r["family"]]
        if r["kind"] == "plain" and r["family"] in w.unseen:
            un.append([r1, r2] == w.chain_of[r["family"]])
        if r["kind"] == "opsd":
            assert f"\\boxed{{({v1}, {v2})}}" in r["prompt"]
    assert abs(sum(un) / len(un) - 1 / 36) < 0.03


def test_one_step_world_files_unchanged():
    """world.steps = 1 writes what the world wrote before multi-step worlds (no `steps` key anywhere)."""
    from stages.engine.world import world_dict

    w = World(WorldConfig())
    assert "steps" not in world_dict(w.cfg) and "steps" in world_dict(WorldConfig(steps=2))
    b = w.bank(0.0, "medium")
    assert "steps" not in b["metadata"]["world"] and "part" not in b["metadata"]
    assert w.problem_row(w.families[0], 7, 3)["id"] == f"{w.families[0]}-7-3"
    assert w.completion_of([w.rule_of[w.families[0]]], (7, 3)).startswith("rule: ")


@pytest.mark.parametrize("sets,needle", [
    (["world.steps=4"], "world.steps (L) must be in [1, 3]"),
    (['experiment.parts=["first"]'], "one-step world"),
    (["world.steps=2", 'experiment.parts=["middle"]'], "unknown skill part"),
])
def test_bad_step_settings(sets, needle):
    from stages.experiments.world import config_from_sections
    from stages.engine.config import parse_sets

    with pytest.raises(InputError, match=needle.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[").replace("]", "\\]")):
        config_from_sections(parse_sets(sets, "experiment"))


# the L = 2 learning test: the shipped two-step base (data/world_base_L2, configs/world_L2.toml), SGSD with the
# full-procedure sharp bank at p = 0 (one rule named per step, "always"), LEARN_STEPS_L2 loop steps x 16 rollouts
# at lr 5e-4
LEARN_STEPS_L2 = 20


@pytest.fixture(scope="module")
def shipped_world_l2(tmp_path_factory):
    from dataclasses import replace
    from pathlib import Path

    from stages.engine.config import load_toml
    from stages.experiments.world import BASE_MANIFEST, build, config_from_sections

    cfg = config_from_sections(load_toml(Path(__file__).resolve().parents[1] / "configs" / "world_L2.toml"))
    cfg = replace(cfg, out=str(tmp_path_factory.mktemp("world_l2") / "w"), steps=LEARN_STEPS_L2,
                  eval_every=LEARN_STEPS_L2, lr=5e-4, eval_n=1, p_values=[0.0], levels=["sharp"],
                  calibrated_level="sharp", parts=["full"])
    logs: list[str] = []
    P = build(cfg, log=logs.append)
    assert any("using the shipped base" in ln for ln in logs), logs
    assert (P.base / BASE_MANIFEST).exists()
    return cfg, P, World(cfg.world)


def _unseen_chain_probs(world, model_dir):
    """Exact mean over held-out unseen problems of p(right rule at step j | plain prompt, right steps before) per
    step, and of the whole chain's probability (their product per problem)."""
    from stages.engine.models import load_model
    from stages.engine.prompts import chat_prompt_ids, student_prompt
    from stages.experiments.world import step_rule_probs

    model, tok, _ = load_model(str(model_dir), device="cpu")
    rows = world.problems(world.unseen, "eval")
    items = [(chat_prompt_ids(tok, student_prompt(r["problem"]), False), tuple(int(x) for x in r["id"].split("-")[1:]),
              world.chain_of[r["family"]]) for r in rows]
    ds = step_rule_probs(model, tok, world, items)
    per_step = [[d[j][world.chain_of[r["family"]][j]] for d, r in zip(ds, rows)] for j in range(world.steps)]
    chain = [math.prod(p[i] for p in per_step) for i in range(len(rows))]
    return [sum(p) / len(p) for p in per_step], sum(chain) / len(chain)


@pytest.mark.parametrize("breakage", [None, "polarity", "loss"])
def test_sgsd_learns_two_step_procedures(shipped_world_l2, monkeypatch, breakage):
    """L = 2: SGSD from the shipped two-step base raises the mean over the two steps of p(right rule | plain prompt,
    right steps before) on held-out unseen families; with the polarity's or the loss's sign flipped it must not.

    Measured 2026-12-06 on the shipped L = 2 base (8cef627e754a): per step 0.171 / 0.166 -> 0.158 / 0.301 (mean
    +0.061; the whole chain's probability 0.028 -> 0.024: step 2 is learned, step 1 is not in 20 steps); polarity
    flipped 0.170 / 0.106 (mean -0.030), loss flipped the same.  The assertion asks for +0.03, half the gain."""
    cfg, P, world = shipped_world_l2
    steps_before, before = _unseen_chain_probs(world, P.base)
    steps_after, after = _unseen_chain_probs(world, _sgsd_run(cfg, P, monkeypatch, breakage))
    print(f"\nL=2 unseen p(right chain): base {before:.4f} (steps {steps_before}) -> SGSD ({breakage or 'as built'}) "
          f"{after:.4f} (steps {steps_after})")
    gain = sum(steps_after) / 2 - sum(steps_before) / 2
    assert abs(steps_before[0] - 0.171) < 0.01 and abs(steps_before[1] - 0.166) < 0.01  # the shipped base
    if breakage is None:
        assert gain > 0.03, (steps_before, steps_after)
    else:
        assert gain < 0.01, (steps_before, steps_after)


def test_step_positions_and_parsing_by_hand():
    """The rule token of each step in the shipped L = 2 tokenizer, and the parser of written steps."""
    from transformers import AutoTokenizer

    from stages.engine.world import decision_indices
    from stages.experiments.world import SHIPPED_BASES, parse_steps

    tok = AutoTokenizer.from_pretrained(str(SHIPPED_BASES[1]))
    text = "step 1: product 7 3 = 21; step 2: difference 21 4 = 17; \\boxed{(21, 17)}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # tokens: 'step' ' 1' ':' ' product' ' 7' ' 3' ' =' ' 21' ';' ' step' ' 2' ':' ' difference' ...
    assert decision_indices(tok, ids, 2) == [3, 12]
    assert tok.decode([ids[3]]) == " product" and tok.decode([ids[12]]) == " difference"
    assert decision_indices(tok, ids[:9], 2) == [3, None]  # a completion cut after step 1
    assert parse_steps(text, 2) == [("product", 21), ("difference", 17)]
    assert parse_steps("step 1: sum 2 3 = 5; \\boxed{5}", 2) == [("sum", 5), None]


def test_reduced_sweep_is_labelled():
    from stages.experiments.world import FULL_SWEEP, _reduced

    assert _reduced(dict(FULL_SWEEP)) == []
    short = _reduced(dict(FULL_SWEEP, seeds=[0], tune=False))
    assert short == ["seeds = [0] (design: [0, 1, 2])", "tune = False (design: True)"]


def test_step_rule_accuracy_by_hand(tmp_path):
    """The dense held-out figure: per step, the share of completions naming the family's rule at that step."""
    import polars as pl

    from stages.engine.world import World, WorldConfig
    from stages.experiments.world import step_rule_accuracy

    w = World(WorldConfig(steps=2))
    fam = w.unseen[0]
    r1, r2 = w.chain_of[fam]
    wrong1 = next(r for r in w.rules if r != r1)
    rows = [  # step 1 right, step 2 right | step 1 right, step 2 wrong | step 1 wrong, step 2 absent | nothing written
        f"step 1: {r1} 2 3 = 9; step 2: {r2} 9 4 = 1; \\boxed{{(9, 1)}}",
        f"step 1: {r1} 2 3 = 9; step 2: {next(r for r in w.rules if r != r2)} 9 4 = 1; \\boxed{{(9, 1)}}",
        f"step 1: {wrong1} 2 3 = 9; \\boxed{{9}}",
        "\\boxed{3}",
    ]
    path = tmp_path / "eval_unseen.parquet"
    pl.DataFrame({"problem_id": [f"{fam}-2-3-4"] * 4, "completion": rows}).write_parquet(path)
    assert step_rule_accuracy(w, path) == [2 / 4, 1 / 4]  # values written are not checked: the rule is the decision
    assert step_rule_accuracy(World(WorldConfig()), path) is None  # a one-step world has no steps to count
    assert step_rule_accuracy(w, tmp_path / "missing.parquet") is None


def test_paired_differences_by_hand():
    """SGSD's margin is taken seed by seed, over the seeds both methods ran (hand values)."""
    from stages.experiments.world import paired_differences

    sgsd = {"seeds_run": [0, 1, 2], "by_seed": [0.30, 0.25, 0.40]}
    grpo = {"seeds_run": [2, 0], "by_seed": [0.10, 0.20]}  # another order, seed 1 missing
    assert paired_differences(sgsd, grpo, "by_seed") == pytest.approx([0.10, 0.30])
    assert paired_differences(grpo, sgsd, "by_seed") == pytest.approx([-0.10, -0.30])
    assert paired_differences(dict(sgsd, steps=[None, 0.2, 0.3]), dict(sgsd, steps=[0.1, None, 0.1]), "steps") \
        == pytest.approx([0.2])
    assert paired_differences(sgsd, None, "by_seed") == [] and paired_differences(sgsd, grpo, "steps") == []


def test_steps_png_copies_are_named_after_the_results_file(tmp_path):
    from stages.experiments.world import steps_png_copies

    res = [{"png": "runs/world_L1/compare/learning_curves.png", "config": {"world": {}}},
           {"png": "runs/x/compare/learning_curves.png", "config": {"world": {"steps": 2}}}, {"png": None}]
    assert steps_png_copies(res, Path("bench/SKILL_WORLD_STEPS.md")) == {
        "runs/world_L1/compare/learning_curves.png": "bench/skill_world/steps_learning_curves_L1.png",
        "runs/x/compare/learning_curves.png": "bench/skill_world/steps_learning_curves_L2.png"}
    assert set(steps_png_copies(res[1:2], Path("bench/SKILL_WORLD_STEPS_L2_LONG.md")).values()) == {
        "bench/skill_world/steps_l2_long_learning_curves_L2.png"}


def test_a_calibration_measured_at_another_avg_n_is_stale():
    """The base's held-out figures are avg@final_eval_n: a saved calibration measured at n = 2 (a quick run) must not
    be reused by a run that reports avg@8 (it was, and the L = 1 column read 0.234 for a base whose avg@8 is 0.204)."""
    from dataclasses import replace

    from stages.experiments.world import WorldRunConfig, base_stamp, calibration_is_current

    cfg = WorldRunConfig(levels=["medium"], calibrated_level="medium", final_eval_n=8)
    stamp = base_stamp(cfg)
    saved = {"build": stamp, "levels": ["medium"],
             "base_eval": {"unseen": {"n": 8, "avg": 0.2}, "seen": {"n": 8, "avg": 1.0}}}
    assert calibration_is_current(saved, cfg, stamp)
    assert not calibration_is_current(dict(saved, base_eval={"unseen": {"n": 2}, "seen": {"n": 2}}), cfg, stamp)
    assert not calibration_is_current(saved, replace(cfg, final_eval_n=2), stamp)
    assert not calibration_is_current(dict(saved, levels=["medium", "sharp"]), cfg, stamp)
    assert not calibration_is_current(saved, cfg, dict(stamp, sft=[1, 2, 3]))
    two = replace(cfg, world=replace(cfg.world, steps=2), parts=["full", "first"])
    assert calibration_is_current(dict(saved, parts=["full", "first"]), two, stamp)
    assert not calibration_is_current(dict(saved, parts=["full"]), two, stamp)
