"""`sgsd world build|calibrate|compare|demo`: the skill world experiment.  docs/SKILL_WORLD.md.

* ``build``      the world's files (stages.engine.world), a tiny Qwen3 model with a tokenizer trained on the
                 world's text, the SFT corpus, ``sgsd sft`` -> ``<out>/base`` (cached: rerunning is a no-op)
* ``calibrate``  the base's properties on held-out problems (plain accuracy seen / unseen, rule
                 probabilities, guidance following, ignoring other families, the OPSD prompt) and, per
                 sharpness level, the |Delta| distribution at the decision (rule) token of real
                 rollout -> score-teachers -> polarize stages with the level's bank
* ``compare``    ordinary ``stages.loop.run`` runs per (objective, bank p, level, seed) at the same budget of
                 generated rollouts, ``stages.eval.run`` before and after (greedy and avg@n), the table,
                 learning curves (PNG) and ``compare/results.json``
* ``demo``       build (cached) -> base eval -> one SGSD run at the calibrated level -> before/after table

Nothing here changes a stage: the world is data (problems JSONL, skill-bank JSON) and a model folder.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from stages.engine.io import InputError, atomic_write_json, atomic_write_text
from stages.engine.world import LEVELS, World, WorldConfig, bank_key, check_level, check_p

OBJECTIVE_RUNS = ("sgsd", "grpo", "opsd", "imitate")  # imitate = sgsd with train.polarity = "imitate" (ablation)
Log = Callable[[str], None]
Progress = Callable[[str, int], Callable[[int], None]] | None


@dataclass
class WorldRunConfig:
    out: str = "runs/world"
    world: WorldConfig = field(default_factory=WorldConfig)
    # base model
    hidden_size: int = 128
    layers: int = 2
    vocab_size: int = 1000
    sft_steps: int = 1500
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    # experiment (fixed before comparing objectives)
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVE_RUNS))
    p_values: list[float] = field(default_factory=lambda: [0.0, 0.5])
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    calibrated_level: str = "medium"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rollouts_per_step: int = 16  # generated rollouts per loop step for every objective (GRPO: 2 prompts x 8)
    group_size: int = 8
    steps: int = 40
    lr: float = 5e-4
    max_grad_norm: float = 1.0
    k_teachers: int = 4
    temperature: float = 1.1
    eval_every: int = 5
    eval_n: int = 4
    final_eval_n: int = 8
    base_skills: bool = True  # also evaluate base+skills (bank guidance in the eval prompt)
    threads: int = 0  # torch intra-op threads per process; 0 = the machine's cores divided by the processes at work
    jobs: int = 2  # compare: runs at once, each in its own process (build, calibrate and demo are one process)

    def check(self) -> "WorldRunConfig":
        self.world.check()
        for p in self.p_values:
            check_p(p)
        for lv in self.levels + [self.calibrated_level]:
            check_level(lv)
        for o in self.objectives:
            if o not in OBJECTIVE_RUNS:
                raise InputError(None, f"unknown objective '{o}' (use {', '.join(OBJECTIVE_RUNS)})")
        for ok, msg in [
            (self.rollouts_per_step >= self.group_size >= 2, "rollouts_per_step must be >= group_size >= 2"),
            (self.rollouts_per_step % self.group_size == 0, "rollouts_per_step must be a multiple of group_size"),
            (self.steps >= 1 and self.eval_every >= 1, "steps and eval_every must be at least 1"),
            (self.eval_n >= 1 and self.final_eval_n >= 1, "eval_n and final_eval_n must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a positive number"),
            (self.k_teachers >= 1, "k_teachers must be at least 1"),
            (bool(self.seeds), "seeds must name at least one seed"),
            (self.jobs >= 1 and self.threads >= 0, "jobs must be at least 1 and threads at least 0"),
        ]:
            if not ok:
                raise InputError(None, msg)
        return self


def config_from_sections(sections: dict, where: str = "world") -> WorldRunConfig:
    """[world] (WorldConfig) and [experiment] (the rest) tables -> WorldRunConfig (unknown keys refused)."""
    from stages.engine.config import build

    known = {"world", "experiment"}
    for k in sections:
        if k not in known:
            raise InputError(where, f"unknown section '{k}' (use [world] and [experiment])")
    wc = build(WorldConfig, sections.get("world", {}), "world", where)
    wc.check(where)
    rc = build(WorldRunConfig, {k: v for k, v in sections.get("experiment", {}).items()}, "experiment", where, world=wc)
    try:
        return rc.check()
    except InputError as e:
        raise InputError(where, e.problem) from None


# --------------------------------------------------------------------------------------------------
# paths


class Paths:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.world = self.out / "world"
        self.init = self.out / "init_model"
        self.sft = self.out / "sft"
        self.base = self.out / "base"
        self.index = self.out / "index"
        self.calib = self.out / "calibration"
        self.compare = self.out / "compare"

    def bank(self, p: float, level: str) -> Path:
        return self.world / f"{bank_key(p, level)}.json"


# --------------------------------------------------------------------------------------------------
# build


def _threads(cfg: WorldRunConfig, jobs: int = 1) -> int:
    """Set torch's intra-op threads: ``threads``, or the cores shared among ``jobs`` processes."""
    import os

    import torch

    n = cfg.threads if cfg.threads > 0 else max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(n)
    return n


def build(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None) -> Paths:
    """World files + base model (cached on the world config and the SFT manifest)."""
    from stages import build_index, sft
    from stages.engine.models import load_model, make_tiny_model, save_model

    cfg.check()
    _threads(cfg)
    P = Paths(cfg.out)
    P.out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    stamp = json.loads(json.dumps({"world": asdict(cfg.world), "model": [cfg.hidden_size, cfg.layers, cfg.vocab_size],
                                   "sft": [cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr]}))
    stamp_path = P.out / "build.json"
    if (P.base / "config.json").exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        log(f"world: base model {P.base} is up to date (cached)")
        return P
    if stamp_path.exists() and json.loads(stamp_path.read_text()) != stamp:
        log("world: settings changed since the last build: rebuilding")
        for d in (P.world, P.init, P.sft, P.base, P.index, P.calib):
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    levels = tuple(dict.fromkeys(cfg.levels + [cfg.calibrated_level]))
    files = world.write_files(P.world, p_values=tuple(dict.fromkeys(cfg.p_values + [0.0])), levels=levels)
    log(f"world: {len(world.families)} families ({len(world.seen)} seen, {len(world.unseen)} unseen), "
        f"{len(world.rules)} rules; files in {P.world}")
    for key, path in files.items():
        if key.startswith("bank_"):
            build_index.run(build_index.BuildIndexConfig(bank=str(path), mode="lexical"), P.index / key)
    if not (P.init / "config.json").exists():
        make_tiny_model(P.init, seed=cfg.world.seed, hidden_size=cfg.hidden_size, layers=cfg.layers,
                        vocab_size=cfg.vocab_size, corpus=world.vocabulary_texts())
    log(f"world: SFT of the tiny Qwen3 model on {cfg.world.corpus_size} examples, {cfg.sft_steps} steps")
    sft.run(sft.SFTConfig(model=str(P.init), data=str(files["sft"]), steps=cfg.sft_steps,
                          batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.world.seed, device="cpu",
                          save_every=max(50, cfg.sft_steps // 4), keep_last=1, log_every=100),
            P.sft, progress=progress, log=log)
    model, tok, _ = load_model(str(P.sft / "checkpoint"), device="cpu")
    save_model(model, tok, P.base)  # a plain model folder: the stages start a fresh optimizer from it
    atomic_write_json(stamp_path, stamp)
    log(f"world: base model {P.base} built in {time.time() - t0:.0f}s "
        f"({sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters)")
    return P


# --------------------------------------------------------------------------------------------------
# calibration


def gate_grad(d: float, tau: float = 1.0) -> float:
    """|d l / d Delta| of the gated loss l(D) = log 2 - softplus(-D^2 / 2 tau): D sigmoid(-D^2/2tau) / tau."""
    return abs(d) / (1.0 + math.exp(d * d / (2 * tau))) / tau


def gate_band(tau: float = 1.0, frac: float = 0.5) -> tuple[float, float, float]:
    """(lo, peak, hi): the |Delta| range where the gate passes at least ``frac`` of its peak gradient."""
    xs = [i / 1000 for i in range(1, 8000)]
    g = [gate_grad(x, tau) for x in xs]
    gm = max(g)
    peak = xs[g.index(gm)]
    inside = [x for x, v in zip(xs, g) if v >= frac * gm]
    return inside[0], peak, inside[-1]


def rule_probs(model, tok, prompts: list[list[int]], rules: list[str], a_b: list[tuple[int, int]]) -> list[dict]:
    """Exact p(rule token | prompt, "rule:") for every rule: one scored completion per (prompt, rule)."""
    import torch

    from stages.engine.scoring import Segment, score_segments
    from stages.engine.world import decision_index

    segs, pos = [], []
    for ids, (a, b) in zip(prompts, a_b):
        for r in rules:
            c = tok(World.completion(r, a, b), add_special_tokens=False)["input_ids"]
            segs.append(Segment.of(ids, c))
            pos.append(decision_index(tok, c))
    with torch.no_grad():
        lps = score_segments(model, segs)
    out = []
    R = len(rules)
    for i in range(len(prompts)):
        vals = [math.exp(float(lps[i * R + j][pos[i * R + j]])) for j in range(R)]
        out.append(dict(zip(rules, vals)))
    return out


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p[k] - q.get(k, 0.0)) for k in p)


def calibrate(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None, force: bool = False) -> dict:
    """Measure and save the world's calibration (``<out>/calibration/calibration.json``); print it."""
    import random

    from stages import polarize, rollout, score_teachers
    from stages.engine.models import load_model
    from stages.engine.prompts import chat_prompt_ids, opsd_teacher_prompt, student_prompt, teacher_prompt
    from stages.engine.world import apply_rule

    P = build(cfg, log=log, progress=progress)
    out_json = P.calib / "calibration.json"
    stamp = json.loads((P.out / "build.json").read_text())
    if force:  # measure everything again (the eval / rollout stages inside would refuse a changed config)
        shutil.rmtree(P.calib, ignore_errors=True)
    if out_json.exists():
        c = json.loads(out_json.read_text())
        if c.get("build") == stamp and c.get("levels") == sorted(set(cfg.levels + [cfg.calibrated_level])):
            print_calibration(c, log)
            return c
    world = World(cfg.world)
    model, tok, spec = load_model(str(P.base), device="cpu")
    rng = random.Random(17)
    res: dict[str, Any] = {"build": stamp, "levels": sorted(set(cfg.levels + [cfg.calibrated_level])),
                           "chance": 1.0 / len(world.rules)}

    # base accuracy through the real eval stage (greedy and avg@n)
    res["base_eval"] = evaluate(cfg, P, str(P.base), P.calib / "base_eval", log=log, progress=progress)

    # exact rule probabilities at the decision token, held-out problems
    def enc(text: str, teacher: bool = True) -> list[int]:
        return chat_prompt_ids(tok, text, teacher and cfg.world.teacher_thinking)

    probs: dict[str, Any] = {}
    for split, fams in (("seen", world.seen), ("unseen", world.unseen)):
        rows = world.problems(fams, "eval")
        ab = [tuple(int(x) for x in r["id"].split("-")[1:]) for r in rows]
        fam = [r["family"] for r in rows]
        plain = rule_probs(model, tok, [enc(student_prompt(r["problem"]), False) for r in rows], world.rules, ab)
        p_right = [d[world.rule_of[f]] for d, f in zip(plain, fam)]
        # guidance: own-family sharp skill naming the right rule / a wrong rule; other-family guidance
        right_pr, wrong_pr, other_pr, opsd_pr, law_tv = [], [], [], [], {lv: [] for lv in LEVELS}
        for (a, b), f, r, d0 in zip(ab, fam, rows, plain):
            others = [g for g in world.families if g != f]
            right = world.rule_of[f]
            wrong = rng.choice([x for x in world.rules if x != right])
            g2 = rng.choice(others)
            mi_other = world.mistake_item(g2, rng.choice(world.rules), "always", "x")
            sk_r = world.skill_item(f, [right], "always", "x")
            sk_w = world.skill_item(f, [wrong], "always", "x")
            sk_o = world.skill_item(rng.choice(others), [rng.choice(world.rules)], "always", "x")
            ans = apply_rule(rng.choice(world.rules), a, b)
            ok = [x for x in world.rules if apply_rule(x, a, b) == ans]
            texts = [teacher_prompt(r["problem"], sk_r, mi_other), teacher_prompt(r["problem"], sk_w, mi_other),
                     teacher_prompt(r["problem"], sk_o, mi_other), opsd_teacher_prompt(r["problem"], str(ans))]
            lv_items = []
            for lv in LEVELS.values():
                k = min(lv.k, len(world.rules) - 1)
                S = [right] + rng.sample([x for x in world.rules if x != right], k - 1)
                sk = world.skill_item(f, S, lv.hedge, "x")
                mi = world.mistake_item(f, rng.choice([x for x in world.rules if x != right]), lv.hedge, "x")
                texts.append(teacher_prompt(r["problem"], sk, mi))
                lv_items.append((lv.name, world.guided_distribution(f, sk["world"], mi["world"])))
            ds = rule_probs(model, tok, [enc(t) for t in texts], world.rules, [(a, b)] * len(texts))
            right_pr.append(ds[0][right])
            wrong_pr.append(ds[1][wrong])
            other_pr.append(_tv(ds[2], d0))
            opsd_pr.append(sum(ds[3][x] for x in ok))
            for (name, law), d in zip(lv_items, ds[4:]):
                law_tv[name].append(_tv(d, law))
        mean = statistics.fmean
        probs[split] = {
            "p_right_rule_plain": mean(p_right),
            "p_right_rule_plain_min": min(p_right),
            "p_right_rule_plain_quantiles": _quantiles(p_right),
            "follows_right_guidance": mean(right_pr),
            "follows_wrong_guidance": mean(wrong_pr),
            "tv_other_family_guidance_vs_plain": mean(other_pr),
            "opsd_consistent_rule": mean(opsd_pr),
            "tv_model_vs_world_law": {k: mean(v) for k, v in law_tv.items()},
        }
    res["rule_probs"] = probs

    # |Delta| at the decision token through the real rollout -> score-teachers -> polarize stages
    lo, peak, hi = gate_band()
    res["gate_band"] = {"lo": lo, "peak": peak, "hi": hi, "meaning": "|Delta| where the gate passes >= 1/2 of its peak gradient"}
    # probe: training-pool problems, mostly of unseen families (where the rule is learned), some seen ones
    unseen_rows, seen_rows = world.problems(world.unseen, "train"), world.problems(world.seen, "train")
    rng.shuffle(unseen_rows)
    rng.shuffle(seen_rows)
    train_rows = unseen_rows[:160] + seen_rows[:32]
    probe = P.calib / "probe_problems.jsonl"
    atomic_write_text(probe, "".join(json.dumps(r) + "\n" for r in train_rows))
    rdir = P.calib / "rollouts"
    rcfg = rollout.RolloutConfig(model=str(P.base), problems=str(probe), n=1, temperature=cfg.temperature,
                                 max_new_tokens=16, backend="hf", batch_size=192, seed=3, device="cpu")
    rollout.run(rcfg, rdir, progress=progress, loaded=(model, tok, spec))
    fam_of = {r["id"]: r["family"] for r in train_rows}
    deltas: dict[str, Any] = {}
    for lv in res["levels"]:
        for p in sorted(set(cfg.p_values + [0.0])):
            key = bank_key(p, lv)
            sd = P.calib / key
            sd.mkdir(parents=True, exist_ok=True)
            for f in ("rollout.parquet", "rollout.manifest.json"):
                shutil.copy2(rdir / f, sd / f)
            scfg = score_teachers.ScoreTeachersConfig(model=str(P.base), bank=str(P.bank(p, lv)), k=cfg.k_teachers,
                                                      index=str(P.index / key / "index.parquet"), retrieval="lexical",
                                                      teacher_thinking=_thinking(cfg), device="cpu")
            score_teachers.run(scfg, sd, progress=progress, loaded=(model, tok, spec))
            polarize.run(polarize.PolarizeConfig(model=str(P.base)), sd, tokenizer=tok)
            deltas[key] = delta_stats(sd, tok, world, fam_of, (lo, hi))
    res["delta"] = deltas
    atomic_write_json(out_json, res)
    print_calibration(res, log)
    return res


def _quantiles(xs: list[float]) -> dict:
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9)}


DELTA_GROUPS = ("unseen_own_correct", "unseen_own_wrong", "seen_own", "other_family")


def delta_stats(sd: Path, tok, world: World, fam_of: dict, band: tuple[float, float]) -> dict:
    """Delta at the rule token per (rollout, teacher), in groups: unseen-family rollouts whose teacher's skill
    is about their family, right or wrong (where learning happens), seen-family rollouts with own-family
    teachers (Delta ~ 0 by design), and teachers about another family (~ 0: ignored).  Mean (signed),
    |Delta| quantiles, the share inside the gate's band, and the polarity categories per group."""
    from stages.engine.world import decision_index

    st = pl.read_parquet(sd / "score_teachers.parquet")
    pt = pl.read_parquet(sd / "polarize.parquet").select("rollout_id", "teacher_rank", "correct", "category")
    ro = pl.read_parquet(sd / "rollout.parquet").select("rollout_id", "completion_ids")
    j = st.join(pt, on=["rollout_id", "teacher_rank"]).join(ro, on="rollout_id")
    groups: dict[str, list[tuple[float, str]]] = {g: [] for g in DELTA_GROUPS}
    for r in j.iter_rows(named=True):
        i = decision_index(tok, r["completion_ids"])
        if i is None:
            continue
        d = r["teacher_logprobs"][i] - r["student_logprobs"][i]
        fam = fam_of[r["problem_id"]]
        own = r["skill_id"].split("-")[1] == fam
        if not own:
            g = "other_family"
        elif fam in world.seen:
            g = "seen_own"
        else:
            g = "unseen_own_correct" if r["correct"] else "unseen_own_wrong"
        groups[g].append((d, r["category"]))
    lo, hi = band
    out: dict[str, Any] = {}
    for g, v in groups.items():
        if not v:
            continue
        a = [abs(x) for x, _ in v]
        cats: dict[str, int] = {}
        for _, c in v:
            cats[c] = cats.get(c, 0) + 1
        out[g] = {"n": len(v), "mean": statistics.fmean(x for x, _ in v), "abs_quantiles": _quantiles(a),
                  "in_band": sum(lo <= x <= hi for x in a) / len(a), "gated_out": sum(x > hi for x in a) / len(a),
                  "categories": cats}
    cats = pt["category"].value_counts()
    out["categories"] = {c: int(n) for c, n in cats.iter_rows()}
    out["accuracy"] = float(pt.unique("rollout_id")["correct"].mean())
    return out


def print_calibration(c: dict, log: Log) -> None:
    log("calibration (held-out problems):")
    for split, e in c["base_eval"].items():
        log(f"  base plain accuracy {split:>7}: greedy {e['greedy']:.2f}  avg@{e['n']} {e['avg']:.2f}"
            f"  (chance {c['chance']:.2f})")
    for split, d in c["rule_probs"].items():
        log(f"  {split:>6}: p(right rule | plain) {d['p_right_rule_plain']:.2f} (min {d['p_right_rule_plain_min']:.2f});"
            f" follows right guidance {d['follows_right_guidance']:.2f}, wrong guidance {d['follows_wrong_guidance']:.2f};"
            f" other-family guidance TV {d['tv_other_family_guidance_vs_plain']:.2f}; OPSD prompt {d['opsd_consistent_rule']:.2f}")
        log("          model vs world law (TV) per level: " + ", ".join(f"{k} {v:.2f}" for k, v in d["tv_model_vs_world_law"].items()))
    b = c["gate_band"]
    log(f"  gate band |Delta| in [{b['lo']:.2f}, {b['hi']:.2f}] (peak {b['peak']:.2f}); |Delta| at the rule token:")
    for key, d in c["delta"].items():
        log(f"    {key} (rollout accuracy {d['accuracy']:.2f}):")
        for g in DELTA_GROUPS:
            if g in d:
                q = d[g]["abs_quantiles"]
                cats = ", ".join(f"{c} {n}" for c, n in sorted(d[g]["categories"].items()))
                log(f"      {g:<19} n={d[g]['n']:<4} mean {d[g]['mean']:+.2f}  |D| p10/p50/p90 {q['p10']:.2f}/{q['p50']:.2f}/"
                    f"{q['p90']:.2f}  in band {d[g]['in_band']:.2f}  ({cats})")


# --------------------------------------------------------------------------------------------------
# evaluation through stages.eval


def _eval_cfg(cfg: WorldRunConfig, P: Paths, model: str, greedy: bool, n: int, bank: str | None = None):
    from stages.eval import EvalConfig

    return EvalConfig(model=model, problems=[str(P.world / "eval_unseen.jsonl"), str(P.world / "eval_seen.jsonl")],
                      protocol="quick", n=1 if greedy else n, temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0,
                      max_new_tokens=16, thinking=False, backend="hf", batch_size=96, seed=11, device="cpu",
                      guidance_bank=bank)


def evaluate(cfg: WorldRunConfig, P: Paths, model: str, out: Path, *, bank: str | None = None, loaded=None,
             log: Log = print, progress: Progress = None) -> dict:
    """Plain-prompt (or +skills) greedy and avg@n accuracy on held-out unseen / seen problems."""
    from stages import eval as eval_stage

    res: dict[str, dict] = {}
    for greedy in (True, False):
        sub = out / ("greedy" if greedy else f"avg{cfg.final_eval_n}")
        path = eval_stage.run(_eval_cfg(cfg, P, model, greedy, cfg.final_eval_n, bank), sub, progress=progress,
                              loaded=loaded)
        s = pl.read_parquet(path)
        for b, v in zip(s["bench"].to_list(), s["avg_at_n"].to_list()):
            if b == "mean":
                continue
            split = b.replace("eval_", "")
            res.setdefault(split, {"n": cfg.final_eval_n})["greedy" if greedy else "avg"] = float(v)
    return res


# --------------------------------------------------------------------------------------------------
# compare


@dataclass
class RunSpec:
    objective: str  # sgsd | grpo | opsd | imitate
    p: float | None
    level: str | None
    seed: int

    @property
    def name(self) -> str:
        if self.objective in ("sgsd", "imitate"):
            return f"{self.objective}_{bank_key(self.p, self.level)[5:]}_s{self.seed}"
        return f"{self.objective}_s{self.seed}"


def run_specs(cfg: WorldRunConfig) -> list[RunSpec]:
    specs = []
    for o in cfg.objectives:
        for s in cfg.seeds:
            if o in ("sgsd", "imitate"):
                specs += [RunSpec(o, p, lv, s) for p in cfg.p_values for lv in cfg.levels]
            else:
                specs.append(RunSpec(o, None, None, s))
    return specs


def loop_sections(cfg: WorldRunConfig, P: Paths, spec: RunSpec, run_dir: Path) -> dict:
    """The recipe of one run: an ordinary `sgsd loop` config on the world's files."""
    grpo = spec.objective == "grpo"
    objective = "sgsd" if spec.objective == "imitate" else spec.objective
    R = cfg.rollouts_per_step
    level = spec.level or cfg.calibrated_level
    p = spec.p if spec.p is not None else 0.0
    train = {"lr": cfg.lr, "batch_size": R, "micro_batch_size": R, "max_grad_norm": cfg.max_grad_norm,
             "precision": "fp32"}
    if objective == "opsd":
        train["teacher_thinking"] = _thinking(cfg)
    if objective == "sgsd":
        train["polarity"] = "imitate" if spec.objective == "imitate" else "verifier"
    return {
        "loop": {"run_dir": str(run_dir), "objective": objective, "model": str(P.base),
                 "problems": str(P.world / "train.jsonl"), "bank": str(P.bank(p, level)), "steps": cfg.steps,
                 "prompts_per_step": R // cfg.group_size if grpo else R, "seed": spec.seed, "device": "cpu",
                 "backend": "hf", "eval_every": cfg.eval_every, "keep_last": 1},
        "rollout": {"n": cfg.group_size if grpo else 1, "temperature": cfg.temperature, "top_p": 1.0, "top_k": 0,
                    "max_new_tokens": 16, "batch_size": 64},
        "score_teachers": {"k": cfg.k_teachers, "retrieval": "lexical", "teacher_thinking": _thinking(cfg),
                           "index": str(P.index / bank_key(p, level) / "index.parquet")},
        "train": train,
        "eval": {"problems": [str(P.world / "eval_unseen.jsonl"), str(P.world / "eval_seen.jsonl")],
                 "protocol": "quick", "n": cfg.eval_n, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                 "max_new_tokens": 16, "thinking": False, "backend": "hf", "batch_size": 96, "seed": 11},
    }


def _thinking(cfg: WorldRunConfig) -> str:
    """The teacher prompts' thinking flag, as the base model's corpus presented them."""
    return "on" if cfg.world.teacher_thinking else "off"


WALL_COLS = ("wall_rollout_s", "wall_score_teachers_s", "wall_polarize_s", "wall_grade_s", "wall_train_s")


def run_one(cfg: WorldRunConfig, P: Paths, spec: RunSpec, *, base_curve: dict, log: Log = print,
            progress: Progress = None) -> dict:
    from stages import loop

    run_dir = P.compare / spec.name
    t0 = time.time()
    metrics = pl.read_parquet(loop.run(loop_sections(cfg, P, spec, run_dir), source=f"world:{spec.name}",
                                       progress=progress, log=None))
    wall = time.time() - t0
    walls = [c for c in WALL_COLS if c in metrics.columns]
    cum_wall = metrics.select(pl.sum_horizontal([pl.col(c).fill_null(0.0) for c in walls])).to_series().cum_sum().to_list()
    curve = {"rollouts": [0], "unseen": [base_curve["unseen"]], "seen": [base_curve["seen"]], "wall": [0.0]}
    for i, row in enumerate(metrics.iter_rows(named=True)):
        if row.get("eval_eval_unseen_avg_at_n") is not None:
            curve["rollouts"].append(int(row["step"]) * cfg.rollouts_per_step)
            curve["unseen"].append(float(row["eval_eval_unseen_avg_at_n"]))
            curve["seen"].append(float(row["eval_eval_seen_avg_at_n"]))
            curve["wall"].append(float(cum_wall[i]))
    final = evaluate(cfg, P, str(loop.step_dir(run_dir, cfg.steps) / "checkpoint"), run_dir / f"final_eval_step{cfg.steps:04d}",
                     log=log, progress=progress)
    row = {"run": spec.name, **asdict(spec), "wall_s": wall, "train_wall_s": float(cum_wall[-1]) if cum_wall else 0.0,
           "rollouts": cfg.steps * cfg.rollouts_per_step, "final": final, "curve": curve,
           "mean_reward": float(metrics["reward"].mean()) if "reward" in metrics.columns else None}
    atomic_write_json(run_dir / "world_result.json", row)
    return row


def _run_in_worker(cfg: WorldRunConfig, spec: RunSpec, base_curve: dict) -> dict:
    """One run in a worker process of ``compare`` (jobs > 1): no progress bars, the result row back."""
    _threads(cfg, cfg.jobs)
    return run_one(cfg, Paths(cfg.out), spec, base_curve=base_curve, log=lambda s: None, progress=None)


def _curve_at(curve: dict, wall: float) -> tuple[float, float]:
    """(unseen, seen) at the last eval point whose cumulative training wall time is <= wall."""
    best = 0
    for i, w in enumerate(curve["wall"]):
        if w <= wall + 1e-9:
            best = i
    return curve["unseen"][best], curve["seen"][best]


def summarize(cfg: WorldRunConfig, base: dict, base_skills: dict, rows: list[dict]) -> tuple[list[dict], str]:
    """Mean and spread over seeds per (objective, p, level), at equal rollouts and at equal wall time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["p"], r["level"]), []).append(r)
    t_eq = min(r["train_wall_s"] for r in rows) if rows else 0.0

    def ms(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = []
    for (o, p, lv), rs in groups.items():
        g_u = ms([r["final"]["unseen"]["greedy"] for r in rs])
        a_u = ms([r["final"]["unseen"]["avg"] for r in rs])
        g_s = ms([r["final"]["seen"]["greedy"] for r in rs])
        a_s = ms([r["final"]["seen"]["avg"] for r in rs])
        w_u = ms([_curve_at(r["curve"], t_eq)[0] for r in rs])
        table.append({"objective": o, "p": p, "level": lv, "seeds": len(rs), "unseen_greedy": g_u, "unseen_avg": a_u,
                      "seen_greedy": g_s, "seen_avg": a_s, "unseen_avg_at_equal_wall": w_u,
                      "gain_unseen_avg": a_u[0] - base["unseen"]["avg"], "wall_s": ms([r["wall_s"] for r in rs])})
    table.sort(key=lambda t: (OBJECTIVE_RUNS.index(t["objective"]), t["p"] or 0, t["level"] or ""))
    n = cfg.final_eval_n
    lines = [f"| method | bank p | sharpness | seeds | unseen greedy | unseen avg@{n} | seen greedy | seen avg@{n} | "
             f"unseen avg@{cfg.eval_n} at equal wall ({t_eq:.0f}s) | gain (unseen avg) | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
    lines.append(f"| base | - | - | - | {base['unseen']['greedy']:.3f} | {base['unseen']['avg']:.3f} | "
                 f"{base['seen']['greedy']:.3f} | {base['seen']['avg']:.3f} | - | 0 | - |")
    for key, bs in base_skills.items():
        lines.append(f"| base+skills | {key} | | - | {bs['unseen']['greedy']:.3f} | {bs['unseen']['avg']:.3f} | "
                     f"{bs['seen']['greedy']:.3f} | {bs['seen']['avg']:.3f} | - | "
                     f"{bs['unseen']['avg'] - base['unseen']['avg']:+.3f} | - |")
    for t in table:
        lines.append(f"| {t['objective']} | {'-' if t['p'] is None else t['p']} | {t['level'] or '-'} | {t['seeds']} | "
                     f"{f(t['unseen_greedy'])} | {f(t['unseen_avg'])} | {f(t['seen_greedy'])} | {f(t['seen_avg'])} | "
                     f"{f(t['unseen_avg_at_equal_wall'])} | {t['gain_unseen_avg']:+.3f} | {t['wall_s'][0]:.0f} |")
    return table, "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = r["objective"] + ("" if r["p"] is None else f" p={r['p']} {r['level']}")
        groups.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in sorted(groups.items()):
        xs = rs[0]["curve"]["rollouts"]
        for ax, split in zip(axes, ("unseen", "seen")):
            ys = [statistics.fmean(r["curve"][split][i] for r in rs) for i in range(len(xs))]
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    for ax, split in zip(axes, ("unseen", "seen")):
        ax.set_xlabel("generated rollouts")
        ax.set_ylabel("plain-prompt avg@n (held-out)")
        ax.set_title(f"{split} families")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None) -> dict:
    """Every run of the experiment (cached per run), then the table, the PNG and compare/results.json."""
    t0 = time.time()
    calib = calibrate(cfg, log=log, progress=progress)
    P = Paths(cfg.out)
    base = calib["base_eval"]
    base_curve = _base_curve(cfg, P, log, progress)
    base_skills = {}
    if cfg.base_skills:
        for p in cfg.p_values:
            for lv in cfg.levels:
                key = bank_key(p, lv)[5:]
                base_skills[key] = evaluate(cfg, P, str(P.base), P.compare / "base_skills" / key,
                                            bank=str(P.bank(p, lv)), log=log, progress=progress)
    specs = run_specs(cfg)
    done: dict[str, dict] = {}
    todo = []
    for spec in specs:
        cached = P.compare / spec.name / "world_result.json"
        if cached.exists():
            done[spec.name] = json.loads(cached.read_text())
        else:
            todo.append(spec)
    if done:
        log(f"compare: {len(done)} of {len(specs)} runs cached")

    def report(r: dict) -> None:
        done[r["run"]] = r
        log(f"[{len(done)}/{len(specs)}] {r['run']}: unseen avg {r['final']['unseen']['avg']:.3f} "
            f"seen avg {r['final']['seen']['avg']:.3f} ({r['wall_s']:.0f}s)")

    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        n = _threads(cfg, cfg.jobs)
        log(f"compare: {len(todo)} runs, {cfg.jobs} at a time ({n} torch thread(s) each)")
        pool = ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn"))
        try:
            futs = [pool.submit(_run_in_worker, cfg, spec, base_curve) for spec in todo]
            for fut in as_completed(futs):
                report(fut.result())
        finally:
            # every result is in (or a run failed): end the workers now; an idle worker's own exit can hang on
            # its verifier pool, and waiting for it would hold up the table
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        for spec in todo:
            report(run_one(cfg, P, spec, base_curve=base_curve, log=log, progress=progress))
    rows = [done[s.name] for s in specs]
    table, md = summarize(cfg, base, base_skills, rows)
    png = plot(rows, P.compare / "learning_curves.png", f"skill world: {cfg.steps * cfg.rollouts_per_step} rollouts per run")
    results = {"config": _jsonable(asdict(cfg)), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "machine": machine(), "wall_s": time.time() - t0, "base": base, "base_skills": base_skills,
               "table": table, "markdown": md, "png": str(png), "runs": rows, "calibration": calib}
    atomic_write_json(P.compare / "results.json", results)
    atomic_write_text(P.compare / "table.md", md + "\n")
    log(md)
    log(f"learning curves: {png}")
    return results


def results_markdown(res: dict, command: str) -> str:
    """The results file (bench/SKILL_WORLD_RESULTS.md): command, date, machine, calibration, table, PNG path."""
    c = res["calibration"]
    m = res["machine"]
    cfg = res["config"]
    lines = ["# Skill world results", "",
             f"- command: `{command}`", f"- date: {res['date']}",
             f"- machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), "
             f"load average at the end {m['loadavg']} (the cores were shared with other jobs)",
             f"- whole comparison wall time: {res['wall_s']:.0f} s; runs: {len(res['runs'])}",
             f"- settings: objectives {cfg['objectives']}, p {cfg['p_values']}, levels {cfg['levels']}, seeds "
             f"{cfg['seeds']}, {cfg['steps']} loop steps x {cfg['rollouts_per_step']} rollouts, lr {cfg['lr']}, "
             f"K = {cfg['k_teachers']} teachers, rollout T = {cfg['temperature']}",
             f"- learning curves: `{res['png']}`", "", "## Calibration (base model, held-out problems)", ""]
    buf: list[str] = []
    print_calibration(c, buf.append)
    lines += ["```"] + buf + ["```", "", "## Comparison", "", res["markdown"], ""]
    return "\n".join(lines)


def _base_curve(cfg: WorldRunConfig, P: Paths, log: Log, progress: Progress) -> dict:
    """The base's avg@eval_n with the loop's eval settings (the curves' first point)."""
    from stages import eval as eval_stage
    from stages.eval import EvalConfig

    sec = loop_sections(cfg, P, RunSpec("sgsd", 0.0, cfg.calibrated_level, 0), P.compare)["eval"]
    path = eval_stage.run(EvalConfig(model=str(P.base), device="cpu", **sec), P.compare / "base_curve", progress=progress)
    s = pl.read_parquet(path)
    d = dict(zip(s["bench"].to_list(), s["avg_at_n"].to_list()))
    return {"unseen": float(d["eval_unseen"]), "seen": float(d["eval_seen"])}


def _jsonable(x):
    from stages.engine.io import to_jsonable

    return to_jsonable(x)


def machine() -> dict:
    import os

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": load,
            "processor": platform.processor() or platform.machine()}


# --------------------------------------------------------------------------------------------------
# demo


def demo(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None) -> dict:
    """The first run a user sees: build (cached), base eval, one SGSD run, before/after table."""
    t0 = time.time()
    P = build(cfg, log=log, progress=progress)
    log("demo: evaluating the base model on held-out problems")
    before = evaluate(cfg, P, str(P.base), P.out / "demo" / "base_eval", log=log, progress=progress)
    spec = RunSpec("sgsd", 0.0, cfg.calibrated_level, cfg.seeds[0])
    P.compare = P.out / "demo"
    log(f"demo: SGSD, {cfg.steps} loop steps x {cfg.rollouts_per_step} rollouts, bank {bank_key(0.0, cfg.calibrated_level)}")
    base_curve = {"unseen": before["unseen"]["avg"], "seen": before["seen"]["avg"]}
    cached = P.compare / spec.name / "world_result.json"
    r = json.loads(cached.read_text()) if cached.exists() else run_one(cfg, P, spec, base_curve=base_curve, log=log,
                                                                        progress=progress)
    after = r["final"]
    png = plot([r], P.compare / "learning_curve.png", "skill world demo: SGSD")
    n = cfg.final_eval_n
    lines = [f"{'held-out problems':<22}{'greedy before':>15}{'greedy after':>14}{f'avg@{n} before':>15}{f'avg@{n} after':>14}"]
    for split in ("unseen", "seen"):
        lines.append(f"{split + ' families':<22}{before[split]['greedy']:>15.3f}{after[split]['greedy']:>14.3f}"
                     f"{before[split]['avg']:>15.3f}{after[split]['avg']:>14.3f}")
    for ln in lines:
        log(ln)
    log(f"learning curve: {png}   (total {time.time() - t0:.0f}s)")
    return {"before": before, "after": after, "png": str(png), "wall_s": time.time() - t0, "table": "\n".join(lines)}
