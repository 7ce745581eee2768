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

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import polars as pl

from stages.engine.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, commit_dir, file_hash
from stages.engine.errors import InputError
from stages.engine.manifest import versions
from stages.engine.paths import DATA_DIR
from stages.engine.tableio import read_table
from stages.engine.tables import METRICS, POLARIZE, ROLLOUT, SCORE_TEACHERS
from stages.engine.world import (LEVELS, World, WorldConfig, bank_key, check_level, check_p, check_part, decision_indices,
                                 world_dict)

# imitate = sgsd with train.polarity = "imitate" (ABLATION); sgsd-stance = sgsd with train.reversed_tokens = "stance"
# (VARIANT: the reversed term only on tokens whose Delta has the stance's sign; runs at sgsd's tuned lr)
OBJECTIVE_RUNS = ("sgsd", "sgsd-stance", "grpo", "opsd", "imitate")
SGSD_LIKE = ("sgsd", "sgsd-stance", "imitate")
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
    # multi-step worlds: which steps the banks' skills name (full: every step; first / last: that step only)
    parts: list[str] = field(default_factory=lambda: ["full"])
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
    # tuning: every objective gets the same budget on base 0, run seed `sweep_seed`, chosen by its mean training
    # reward over the last half of the steps (never by the held-out eval the table reports)
    tune: bool = True
    lr_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    group_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])  # GRPO, at its tuned lr
    opsd_temperatures: list[float] = field(default_factory=lambda: [0.7, 1.1, 1.5])  # OPSD KL temperature, tuned lr
    sweep_seed: int = 0
    # collapse probe (base 0, sweep seed): sgsd and sgsd-stance at these lrs, p = 0 and each p of p_values; their
    # seen-family accuracy, first alarm and polarity mix go to the results file
    probe_lrs: list[float] = field(default_factory=lambda: [1e-3])
    # more bases: each a table of [world] settings that differ from base 0's (e.g. {seed = 1})
    bases: list[dict] = field(default_factory=list)
    threads: int = 0  # torch intra-op threads per process; 0 = the machine's cores divided by the processes at work
    jobs: int = 2  # compare: runs at once, each in its own process (build, calibrate and demo are one process)

    def check(self) -> "WorldRunConfig":
        self.world.check()
        for p in self.p_values:
            check_p(p)
        for lv in self.levels + [self.calibrated_level]:
            check_level(lv)
        for part in self.parts:
            check_part(part)
        if not self.parts or (self.world.steps == 1 and self.parts != ["full"]):
            raise InputError(None, "parts must name at least one skill part, and a one-step world (world.steps = 1) "
                                   f"has only 'full', got {self.parts}")
        for b in self.bases:
            base_world(self, b)
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
            (all(math.isfinite(x) and x > 0 for x in self.lr_grid + self.opsd_temperatures),
             "lr_grid and opsd_temperatures must hold positive numbers"),
            (all(g >= 2 and self.rollouts_per_step % g == 0 for g in self.group_sizes),
             "every group size must be >= 2 and divide rollouts_per_step"),
            (all(isinstance(b, dict) for b in self.bases), "bases must be a list of [world] tables"),
            (all(math.isfinite(x) and x > 0 for x in self.probe_lrs), "probe_lrs must hold positive numbers"),
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

    def bank(self, p: float, level: str, part: str = "full") -> Path:
        return self.world / f"{bank_key(p, level, part)}.json"


# --------------------------------------------------------------------------------------------------
# build


def _threads(cfg: WorldRunConfig, jobs: int = 1) -> int:
    """Set torch's intra-op threads: ``threads``, or the cores shared among ``jobs`` processes."""
    import os

    import torch

    n = cfg.threads if cfg.threads > 0 else max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(n)
    return n


BASE_MANIFEST = "world_base.json"
SHIPPED_BASE = DATA_DIR / "world_base"  # the base of configs/world.toml, shipped in the wheel (sgsd_data/world_base)
# multi-step bases (configs/world_L<L>.toml): data/world_base_L<L>, in the wheel as sgsd_data/world_base_L<L>
SHIPPED_BASES = (SHIPPED_BASE, DATA_DIR / "world_base_L2", DATA_DIR / "world_base_L3")


def max_new_tokens(cfg: WorldRunConfig) -> int:
    """Generation length of rollouts and evals: 16 at L = 1; a multi-step completion takes 9 tokens a step plus
    8 for the boxed tuple (L = 2: 25 with the shipped tokenizer), with 4 to spare."""
    return 16 if cfg.world.steps == 1 else 9 * cfg.world.steps + 12


def base_stamp(cfg: WorldRunConfig) -> dict:
    """What determines a base model: the world, the model shape and the SFT settings (a one-step world's stamp
    has no ``steps`` key, as before multi-step worlds existed)."""
    return json.loads(json.dumps({"world": world_dict(cfg.world), "model": [cfg.hidden_size, cfg.layers, cfg.vocab_size],
                                  "sft": [cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr]}))


def base_files_hash(base: Path) -> dict[str, str]:
    """sha256 of every file of a base folder except its manifest."""
    return {f.name: file_hash(f) for f in sorted(base.iterdir()) if f.is_file() and f.name != BASE_MANIFEST}


def base_hash(manifest: dict) -> str:
    """One short name for a base: sha256 over its files' hashes (12 hex digits)."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:12]


def verify_base(base: Path) -> dict:
    """The manifest of a base folder, every file checked against its recorded sha256 (InputError otherwise)."""
    mpath = base / BASE_MANIFEST
    try:
        man = json.loads(mpath.read_text())
        files = dict(man["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(mpath, f"not a readable world base manifest ({e.__class__.__name__})") from None
    have = base_files_hash(base)
    for name, h in files.items():
        if have.get(name) != h:
            raise InputError(base / name, "missing, or its sha256 differs from the base manifest's")
    extra = sorted(set(have) - set(files))
    if extra:
        raise InputError(base / extra[0], "a file the base manifest does not list")
    return man


def shipped_base(cfg: WorldRunConfig, where: Path | None = None) -> Path | None:
    """The shipped base folder (``where``, else any of SHIPPED_BASES) whose recorded settings equal ``cfg``'s."""
    for d in ([where] if where is not None else SHIPPED_BASES):
        try:
            man = json.loads((d / BASE_MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if man.get("stamp") == base_stamp(cfg):
            return d
    return None


# The bands a base must sit in to be the world's base (docs/SKILL_WORLD.md "Base checks"): the world's law made
# loose enough for a 0.4M-parameter model, fixed before any comparison.  (name, what, lo, hi)
BASE_BANDS = (
    ("seen_accuracy", "seen-family plain accuracy (avg@n)", 0.95, 1.0),
    ("unseen_right_rule_excess", "unseen p(right rule | plain) minus unseen_spread / R", -0.08, 0.10),
    ("unseen_accuracy_excess", "unseen plain accuracy (avg@n) minus unseen_spread / R", -0.10, 0.20),
    ("follows_right_guidance", "unseen: p(named rule) under an 'always' skill naming the right rule", 0.5, 1.0),
    ("follows_wrong_guidance", "unseen: p(named rule) under an 'always' skill naming a wrong rule", 0.5, 1.0),
    ("other_family_tv_seen", "seen: TV(rule distribution under other-family guidance, plain)", 0.0, 0.2),
    ("other_family_tv_unseen", "unseen: TV(rule distribution under other-family guidance, plain)", 0.0, 0.45),
    ("delta_in_band", "share of |Delta| at the rule token inside the gate's band (own-family teachers of correct "
                      "unseen rollouts, calibrated level, p = 0)", 0.6, 1.0),
)


def base_bands(cfg: WorldRunConfig) -> tuple:
    """The bands of a base: BASE_BANDS at L = 1; a multi-step base's are per step position (docs/SKILL_WORLD.md
    "Multi-step worlds"), fixed before its first build: the chain's plain accuracy on seen families (every step's
    value right) >= 0.9, the unseen chain accuracy near (unseen_spread / R)^L, and at every step j the one-step
    bands of the rule probabilities, the guidance following and the gate's band."""
    L = cfg.world.steps
    if L == 1:
        return BASE_BANDS
    out = [("seen_accuracy", "seen-family plain accuracy (avg@n), every step's value right", 0.9, 1.0),
           ("unseen_accuracy_excess", "unseen plain accuracy (avg@n) minus (unseen_spread / R)^L", -0.05, 0.15)]
    for j in range(1, L + 1):
        out += [
            (f"unseen_right_rule_excess_step{j}", f"step {j}: unseen p(right rule | plain, right steps before) minus "
                                                  "unseen_spread / R", -0.08, 0.10),
            (f"follows_right_guidance_step{j}", f"step {j}: unseen p(named rule) under an 'always' skill naming the "
                                                "right rule at that step", 0.5, 1.0),
            (f"follows_wrong_guidance_step{j}", f"step {j}: unseen p(named rule) under an 'always' skill naming a "
                                                "wrong rule at that step", 0.5, 1.0),
            (f"other_family_tv_seen_step{j}", f"step {j}: seen TV(rule distribution under other-family guidance, "
                                              "plain)", 0.0, 0.2),
            (f"other_family_tv_unseen_step{j}", f"step {j}: unseen TV(rule distribution under other-family guidance, "
                                                "plain)", 0.0, 0.45),
            (f"delta_in_band_step{j}", f"share of |Delta| at step {j}'s rule token inside the gate's band (own-family "
                                       f"full-procedure teachers of unseen rollouts whose step {j} is right, calibrated "
                                       "level, p = 0)", 0.6, 1.0)]
    return tuple(out)


def base_properties(c: dict, cfg: WorldRunConfig) -> dict[str, float]:
    """The banded properties of a calibration (``calibrate``'s dict)."""
    if cfg.world.steps > 1:
        return _step_properties(c, cfg)
    expect = cfg.world.unseen_spread / cfg.world.rules
    rp, ev = c["rule_probs"], c["base_eval"]
    d = c["delta"].get(bank_key(0.0, cfg.calibrated_level), {}).get("unseen_own_correct", {})
    return {"seen_accuracy": ev["seen"]["avg"],
            "unseen_right_rule_excess": rp["unseen"]["p_right_rule_plain"] - expect,
            "unseen_accuracy_excess": ev["unseen"]["avg"] - expect,
            "follows_right_guidance": rp["unseen"]["follows_right_guidance"],
            "follows_wrong_guidance": rp["unseen"]["follows_wrong_guidance"],
            "other_family_tv_seen": rp["seen"]["tv_other_family_guidance_vs_plain"],
            "other_family_tv_unseen": rp["unseen"]["tv_other_family_guidance_vs_plain"],
            "delta_in_band": d.get("in_band", 0.0)}


def _step_properties(c: dict, cfg: WorldRunConfig) -> dict[str, float]:
    R, L = cfg.world.rules, cfg.world.steps
    ev, rp = c["base_eval"], c["rule_probs"]
    d = c["delta"].get(bank_key(0.0, cfg.calibrated_level), {}).get("steps", [{}] * L)
    out = {"seen_accuracy": ev["seen"]["avg"],
           "unseen_accuracy_excess": ev["unseen"]["avg"] - (cfg.world.unseen_spread / R) ** L}
    for j in range(L):
        u, sn = rp["unseen"]["steps"][j], rp["seen"]["steps"][j]
        out |= {f"unseen_right_rule_excess_step{j + 1}": u["p_right_rule_plain"] - cfg.world.unseen_spread / R,
                f"follows_right_guidance_step{j + 1}": u["follows_right_guidance"],
                f"follows_wrong_guidance_step{j + 1}": u["follows_wrong_guidance"],
                f"other_family_tv_seen_step{j + 1}": sn["tv_other_family_guidance_vs_plain"],
                f"other_family_tv_unseen_step{j + 1}": u["tv_other_family_guidance_vs_plain"],
                f"delta_in_band_step{j + 1}": d[j].get("unseen_own_step_right", {}).get("in_band", 0.0)}
    return out


def check_base(c: dict, cfg: WorldRunConfig) -> list[str]:
    """One line per property outside its band (empty: the base is the world's base)."""
    props = base_properties(c, cfg)
    return [f"{name} = {props[name]:.3f} outside [{lo:g}, {hi:g}] ({what})"
            for name, what, lo, hi in base_bands(cfg) if not lo - 1e-9 <= props[name] <= hi + 1e-9]


def build(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None, rebuild: bool = False) -> Paths:
    """World files + base model.  The base is, in this order: the one already in ``<out>/base`` for these
    settings; the shipped one (``data/world_base``) when its recorded settings equal these (``rebuild``
    skips it); else built here (SFT), calibrated and checked against BASE_BANDS (InputError, and the folder
    moved to ``<out>/base.rejected``, when a property is outside its band).  ``<out>/base/world_base.json`` is
    its manifest: settings, package versions, sha256 of every file, calibration summary."""
    from stages import build_index, sft
    from stages.engine.models import load_model, make_tiny_model, save_model

    cfg.check()
    _threads(cfg)
    P = Paths(cfg.out)
    P.out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    stamp = base_stamp(cfg)
    stamp_path = P.out / "build.json"
    recorded = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
    if rebuild or (recorded is not None and recorded.get("stamp", recorded) != stamp):
        log("world: rebuilding the base (--rebuild-base)" if rebuild else
            "world: settings changed since the last build: rebuilding")
        for d in (P.world, P.init, P.sft, P.base, P.index, P.calib):
            shutil.rmtree(d, ignore_errors=True)
        stamp_path.unlink(missing_ok=True)
        recorded = None
    if recorded is not None and (P.base / BASE_MANIFEST).exists():
        man = json.loads((P.base / BASE_MANIFEST).read_text())
        log(f"world: base model {P.base} is up to date (base {base_hash(man)}, cached)")
        return P
    t0 = time.time()
    levels = tuple(dict.fromkeys(cfg.levels + [cfg.calibrated_level]))
    files = world.write_files(P.world, p_values=tuple(dict.fromkeys(cfg.p_values + [0.0])), levels=levels,
                              parts=tuple(dict.fromkeys(["full"] + cfg.parts)))
    log(f"world: {len(world.families)} families ({len(world.seen)} seen, {len(world.unseen)} unseen), "
        f"{len(world.rules)} rules" + (f", {world.steps} steps" if world.steps > 1 else "") + f"; files in {P.world}")
    for key, path in files.items():
        if key.startswith("bank_"):
            build_index.run(build_index.BuildIndexConfig(bank=str(path), mode="lexical"), P.index / key)
    shipped = None if rebuild else shipped_base(cfg)
    if shipped is not None:
        man = verify_base(shipped)
        tmp = Path(tempfile.mkdtemp(prefix=".base.", dir=P.out))
        for f in shipped.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        commit_dir(tmp, P.base)
        atomic_write_json(stamp_path, {"stamp": stamp, "shipped": str(shipped)})
        log(f"world: using the shipped base {shipped} (base {base_hash(man)}, built {man.get('built_at', '?')} with "
            f"torch {man['versions'].get('torch', '?')}); --rebuild-base builds one here")
        return P
    if not (P.init / "config.json").exists():
        make_tiny_model(P.init, seed=cfg.world.seed, hidden_size=cfg.hidden_size, layers=cfg.layers,
                        vocab_size=cfg.vocab_size, corpus=world.vocabulary_texts())
    log(f"world: SFT of the tiny Qwen3 model on {cfg.world.corpus_size} examples, {cfg.sft_steps} steps")
    t_sft = time.time()
    sft.run(sft.SFTConfig(model=str(P.init), data=str(files["sft"]), steps=cfg.sft_steps,
                          batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.world.seed, device="cpu",
                          save_every=max(50, cfg.sft_steps // 4), keep_last=1, log_every=100),
            P.sft, progress=progress, log=log)
    sft_wall = time.time() - t_sft
    model, tok, _ = load_model(str(P.sft / "checkpoint"), device="cpu")
    save_model(model, tok, P.base)  # a plain model folder: the stages start a fresh optimizer from it
    n_params = sum(p.numel() for p in model.parameters())
    log(f"world: base model trained in {sft_wall:.0f}s ({n_params / 1e3:.0f}K parameters); calibrating")
    shutil.rmtree(P.calib, ignore_errors=True)
    calib = _measure(cfg, P, stamp, log=log, progress=progress)
    bad = check_base(calib, cfg)
    man = {"format": 1, "stamp": stamp, "world": world_dict(cfg.world),
           "model": {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "vocab_size": cfg.vocab_size,
                     "parameters": n_params},
           "sft": {"steps": cfg.sft_steps, "batch_size": cfg.sft_batch_size, "lr": cfg.sft_lr, "seed": cfg.world.seed,
                   "wall_s": round(sft_wall, 1)},
           "versions": versions(), "machine": machine(),
           "built_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "build_wall_s": round(time.time() - t0, 1),
           "calibration": {"properties": base_properties(calib, cfg), "bands": [list(b) for b in base_bands(cfg)],
                           "outside": bad, "base_eval": calib["base_eval"]},
           "files": base_files_hash(P.base)}
    if bad:
        rejected = P.out / "base.rejected"
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(P.base, rejected)
        atomic_write_json(rejected / BASE_MANIFEST, man)
        raise InputError(rejected, f"the base is outside the world's bands: {bad[0]}"
                                   + (f" (+{len(bad) - 1} more in {rejected / BASE_MANIFEST})" if len(bad) > 1 else ""))
    atomic_write_json(P.base / BASE_MANIFEST, man)
    atomic_write_json(stamp_path, {"stamp": stamp, "shipped": None})
    log(f"world: base model {P.base} built and checked in {time.time() - t0:.0f}s (base {base_hash(man)})")
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


def calibration_is_current(c: dict, cfg: WorldRunConfig, stamp: dict) -> bool:
    """Whether a saved calibration was measured for these settings: the same base, levels, skill parts (L >= 2) and
    held-out avg@n (the base's figures in every table are avg@final_eval_n; one measured at another n is stale)."""
    return (c.get("build") == stamp and c.get("levels") == sorted(set(cfg.levels + [cfg.calibrated_level]))
            and (cfg.world.steps == 1 or c.get("parts") == list(dict.fromkeys(["full"] + cfg.parts)))
            and all(e.get("n") == cfg.final_eval_n for e in c.get("base_eval", {}).values()))


def calibrate(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None, force: bool = False,
              rebuild: bool = False) -> dict:
    """The world's calibration (``<out>/calibration/calibration.json``, measured once per base), printed; a base
    outside BASE_BANDS is refused (InputError)."""
    P = build(cfg, log=log, progress=progress, rebuild=rebuild)
    out_json = P.calib / "calibration.json"
    stamp = base_stamp(cfg)
    if force:  # measure everything again (the eval / rollout stages inside would refuse a changed config)
        shutil.rmtree(P.calib, ignore_errors=True)
    c = None
    if out_json.exists():
        c = json.loads(out_json.read_text())
        if not calibration_is_current(c, cfg, stamp):
            shutil.rmtree(P.calib, ignore_errors=True)
            c = None
        else:
            print_calibration(c, log)
    if c is None:
        c = _measure(cfg, P, stamp, log=log, progress=progress)
    bad = check_base(c, cfg)
    if bad:
        raise InputError(P.base, f"the base is outside the world's bands: {bad[0]}")
    return c


def _measure(cfg: WorldRunConfig, P: Paths, stamp: dict, *, log: Log = print, progress: Progress = None) -> dict:
    """Measure the base's calibration, save it to ``<out>/calibration/calibration.json`` and print it."""
    import random

    from stages.engine.models import load_model
    from stages.engine.prompts import chat_prompt_ids, opsd_teacher_prompt, student_prompt, teacher_prompt
    from stages.engine.world import apply_rule

    if cfg.world.steps > 1:
        return _measure_steps(cfg, P, stamp, log=log, progress=progress)
    out_json = P.calib / "calibration.json"
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
    _measure_deltas(cfg, P, res, world, (model, tok, spec), rng, n=1, parts=["full"], stats=delta_stats,
                    progress=progress)
    atomic_write_json(out_json, res)
    print_calibration(res, log)
    return res


def _measure_deltas(cfg: WorldRunConfig, P: Paths, res: dict, world: World, loaded, rng, *, n: int, parts: list[str],
                    stats: Callable, progress: Progress = None) -> None:
    """``res["gate_band"]`` and ``res["delta"]``: |Delta| at the decision tokens of ``n`` rollouts per probe
    problem (training-pool problems, mostly of unseen families, where the rule is learned, some seen ones) through
    the real rollout -> score-teachers -> polarize stages, for every level, bank part and p; ``stats`` summarises
    one scored bank (``delta_stats`` at one step, ``step_delta_stats`` per step)."""
    from stages import polarize, rollout, score_teachers

    model, tok, spec = loaded
    lo, peak, hi = gate_band()
    res["gate_band"] = {"lo": lo, "peak": peak, "hi": hi, "meaning": "|Delta| where the gate passes >= 1/2 of its peak gradient"}
    unseen_rows, seen_rows = world.problems(world.unseen, "train"), world.problems(world.seen, "train")
    rng.shuffle(unseen_rows)
    rng.shuffle(seen_rows)
    train_rows = unseen_rows[:160] + seen_rows[:32]
    probe = P.calib / "probe_problems.jsonl"
    atomic_write_text(probe, "".join(json.dumps(r) + "\n" for r in train_rows))
    rdir = P.calib / "rollouts"
    rcfg = rollout.RolloutConfig(model=str(P.base), problems=str(probe), n=n, temperature=cfg.temperature,
                                 max_new_tokens=max_new_tokens(cfg), backend="hf", batch_size=192, seed=3, device="cpu")
    rollout.run(rcfg, rdir, progress=progress, loaded=loaded)
    fam_of = {r["id"]: r["family"] for r in train_rows}
    deltas: dict[str, Any] = {}
    for lv in res["levels"]:
        for part in dict.fromkeys(parts):
            for p in sorted(set(cfg.p_values + [0.0])):
                key = bank_key(p, lv, part)
                sd = P.calib / key
                sd.mkdir(parents=True, exist_ok=True)
                for src, dst in ((ROLLOUT.file(rdir), ROLLOUT.file(sd)), (ROLLOUT.manifest(rdir), ROLLOUT.manifest(sd))):
                    shutil.copy2(src, dst)
                scfg = score_teachers.ScoreTeachersConfig(model=str(P.base), bank=str(P.bank(p, lv, part)),
                                                          k=cfg.k_teachers, index=str(P.index / key / "index.parquet"),
                                                          retrieval="lexical", teacher_thinking=_thinking(cfg), device="cpu")
                score_teachers.run(scfg, sd, progress=progress, loaded=loaded)
                polarize.run(polarize.PolarizeConfig(model=str(P.base)), sd, tokenizer=tok)
                deltas[key] = stats(sd, tok, world, fam_of, (lo, hi))
    res["delta"] = deltas


def step_rule_probs(model, tok, world: World, items: list[tuple[list[int], tuple, list[str]]]) -> list[list[dict]]:
    """Exact p(rule at step j | prompt, the steps before j as in ``chain``) for every step j and rule: one scored
    completion per (item, step, rule).  ``items``: (prompt ids, operands, chain of L rules)."""
    import torch

    from stages.engine.scoring import Segment, score_segments

    L, R = world.steps, len(world.rules)
    segs, pos = [], []
    cache: dict[str, tuple[list[int], list]] = {}
    for ids, ops, chain in items:
        for j in range(L):
            for r in world.rules:
                text = world.completion_of(list(chain[:j]) + [r] + list(chain[j + 1:]), ops)
                if text not in cache:
                    c = tok(text, add_special_tokens=False)["input_ids"]
                    cache[text] = (c, decision_indices(tok, c, L))
                c, idx = cache[text]
                segs.append(Segment.of(ids, c))
                pos.append(idx[j])
    with torch.no_grad():
        lps = score_segments(model, segs)
    out, n = [], 0
    for _ in items:
        per = []
        for j in range(L):
            per.append({r: math.exp(float(lps[n + i][pos[n + i]])) for i, r in enumerate(world.rules)})
            n += R
        out.append(per)
    return out


def _ops(problem_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in problem_id.split("-")[1:])


def _measure_steps(cfg: WorldRunConfig, P: Paths, stamp: dict, *, log: Log = print, progress: Progress = None) -> dict:
    """The calibration of a multi-step base, per step position j: exact p(rule at step j) with the right steps
    before it (plain, guided, other-family, OPSD, the world's law), and |Delta| at every step's rule token through
    the real rollout -> score-teachers -> polarize stages, grouped as at L = 1 with the wrong rollouts split by
    whether step j itself is right."""
    import random

    from stages.engine.models import load_model
    from stages.engine.prompts import chat_prompt_ids, opsd_teacher_prompt, student_prompt, teacher_prompt
    from stages.engine.world import answer_text, apply_chain, apply_rule

    out_json = P.calib / "calibration.json"
    world = World(cfg.world)
    L = world.steps
    model, tok, spec = load_model(str(P.base), device="cpu")
    rng = random.Random(17)
    res: dict[str, Any] = {"build": stamp, "levels": sorted(set(cfg.levels + [cfg.calibrated_level])),
                           "chance": 1.0 / len(world.rules), "steps": L, "parts": list(dict.fromkeys(["full"] + cfg.parts)),
                           "chance_chain": (cfg.world.unseen_spread / len(world.rules)) ** L}
    res["base_eval"] = evaluate(cfg, P, str(P.base), P.calib / "base_eval", log=log, progress=progress)

    def enc(text: str, teacher: bool = True) -> list[int]:
        return chat_prompt_ids(tok, text, teacher and cfg.world.teacher_thinking)

    mean = statistics.fmean
    probs: dict[str, Any] = {}
    for split, fams in (("seen", world.seen), ("unseen", world.unseen)):
        acc: list[dict[str, list]] = [{k: [] for k in ("plain", "right", "wrong", "other", "opsd")} | {
            "law": {lv: [] for lv in LEVELS}} for _ in range(L)]
        for r in world.problems(fams, "eval"):
            f, ops = r["family"], _ops(r["id"])
            chain = world.chain_of[f]
            others = [g for g in world.families if g != f]
            g2 = rng.choice(others)
            mi_other = world.step_mistake_item(g2, rng.randint(1, L), rng.choice(world.rules), "always", "x")
            rand_chain = [rng.choice(world.rules) for _ in range(L)]
            vals = apply_chain(rand_chain, ops)
            items = [(enc(student_prompt(r["problem"]), False), ops, chain),
                     (enc(opsd_teacher_prompt(r["problem"], answer_text(vals))), ops, rand_chain)]
            wrongs = [rng.choice([x for x in world.rules if x != chain[j]]) for j in range(L)]
            for j in range(L):  # sharp skills naming step j only: right, wrong, another family's
                for rule, fam in ((chain[j], f), (wrongs[j], f), (rng.choice(world.rules), rng.choice(others))):
                    sk = world.step_skill_item(fam, [j + 1], [[rule]], "always", "x")
                    items.append((enc(teacher_prompt(r["problem"], sk, mi_other)), ops, chain))
            laws = []
            for lv in LEVELS.values():  # full-procedure skill and a mistake at a random step, per level
                k = min(lv.k, len(world.rules) - 1)
                sets = [[chain[j]] + rng.sample([x for x in world.rules if x != chain[j]], k - 1) for j in range(L)]
                sk = world.step_skill_item(f, list(range(1, L + 1)), sets, lv.hedge, "x")
                ms = rng.randint(1, L)
                mi = world.step_mistake_item(f, ms, rng.choice([x for x in world.rules if x != chain[ms - 1]]),
                                             lv.hedge, "x")
                items.append((enc(teacher_prompt(r["problem"], sk, mi)), ops, chain))
                laws.append((lv.name, [world.guided_step(f, j, sk["world"], mi["world"]) for j in range(L)]))
            ds = step_rule_probs(model, tok, world, items)
            prev = [ops[0]] + vals[:-1]
            for j in range(L):
                a = acc[j]
                d0 = ds[0][j]
                a["plain"].append(d0[chain[j]])
                ok = [x for x in world.rules if apply_rule(x, prev[j], ops[j + 1]) == vals[j]]
                a["opsd"].append(sum(ds[1][j][x] for x in ok))
                base = 2 + 3 * j
                a["right"].append(ds[base][j][chain[j]])
                a["wrong"].append(ds[base + 1][j][wrongs[j]])
                a["other"].append(_tv(ds[base + 2][j], d0))
                for (name, law), d in zip(laws, ds[2 + 3 * L:]):
                    a["law"][name].append(_tv(d[j], law[j]))
        probs[split] = {"steps": [{
            "p_right_rule_plain": mean(a["plain"]), "p_right_rule_plain_min": min(a["plain"]),
            "p_right_rule_plain_quantiles": _quantiles(a["plain"]),
            "follows_right_guidance": mean(a["right"]), "follows_wrong_guidance": mean(a["wrong"]),
            "tv_other_family_guidance_vs_plain": mean(a["other"]), "opsd_consistent_rule": mean(a["opsd"]),
            "tv_model_vs_world_law": {k: mean(v) for k, v in a["law"].items()}} for a in acc]}
    res["rule_probs"] = probs

    _measure_deltas(cfg, P, res, world, (model, tok, spec), rng, n=2, parts=["full"] + cfg.parts,
                    stats=step_delta_stats, progress=progress)
    atomic_write_json(out_json, res)
    print_calibration(res, log)
    return res


STEP_GROUPS = ("unseen_own_correct", "unseen_own_wrong_step_right", "unseen_own_wrong_step_wrong", "unseen_own_step_right",
               "seen_own", "other_family")


def parse_steps(text: str, steps: int) -> list[tuple[str, int] | None]:
    """(rule, value) written at each step of a multi-step completion ("step j: <rule> x c = v"), None if absent."""
    import re

    out: list[tuple[str, int] | None] = [None] * steps
    for m in re.finditer(r"step (\d+): ([a-z]+) -?\d+ -?\d+ = (-?\d+)", text):
        j = int(m.group(1)) - 1
        if 0 <= j < steps and out[j] is None:
            out[j] = (m.group(2), int(m.group(3)))
    return out


def step_rule_accuracy(world: World, completions: Path) -> list[float] | None:
    """The dense view of a multi-step eval: per step position j, the share of the completions in ``completions``
    (an eval Parquet table of one split) whose step j names the family's rule at j, whatever value it writes; a
    step not written counts as wrong.  None for a one-step world or a missing table."""
    if world.steps == 1 or not completions.exists():
        return None
    t = pl.read_parquet(completions, columns=["problem_id", "completion"])
    hits = [0] * world.steps
    for pid, text in zip(t["problem_id"].to_list(), t["completion"].to_list()):
        chain = world.chain_of[pid.split("-", 1)[0]]
        for j, got in enumerate(parse_steps(text or "", world.steps)):
            hits[j] += got is not None and got[0] == chain[j]
    return [h / max(1, t.height) for h in hits]


def _group_stats(v: list[tuple[float, str]], band: tuple[float, float]) -> dict:
    lo, hi = band
    a = [abs(x) for x, _ in v]
    cats: dict[str, int] = {}
    for _, c in v:
        cats[c] = cats.get(c, 0) + 1
    return {"n": len(v), "mean": statistics.fmean(x for x, _ in v), "abs_quantiles": _quantiles(a),
            "in_band": sum(lo <= x <= hi for x in a) / len(a), "gated_out": sum(x > hi for x in a) / len(a),
            "categories": cats}


def step_delta_stats(sd: Path, tok, world: World, fam_of: dict, band: tuple[float, float]) -> dict:
    """delta_stats per step position: Delta at step j's rule token per (rollout, teacher), grouped as at L = 1
    (unseen own-family teachers of correct / wrong rollouts, seen own-family, other family), the wrong rollouts
    split by whether step j's rule is right ("a wrong step hiding behind right ones" is a wrong rollout's right
    step), plus ``unseen_own_step_right`` (every unseen rollout whose step j is right: the gate-band property).
    Also each step's rule and value accuracy over the probe's rollouts."""
    from stages.engine.world import apply_chain

    L = world.steps
    st = read_table(SCORE_TEACHERS.path(sd))
    pt = pl.read_parquet(POLARIZE.file(sd)).select("rollout_id", "teacher_rank", "correct", "category")
    ro = read_table(ROLLOUT.path(sd)).select("rollout_id", "completion_ids")
    j_ = st.join(pt, on=["rollout_id", "teacher_rank"]).join(ro, on="rollout_id")
    groups: list[dict[str, list]] = [{g: [] for g in STEP_GROUPS} for _ in range(L)]
    seen_rollouts: dict[str, list] = {}
    for r in j_.iter_rows(named=True):
        fam = fam_of[r["problem_id"]]
        ops = _ops(r["problem_id"])
        chain = world.chain_of[fam]
        vals = apply_chain(chain, ops)
        if r["rollout_id"] not in seen_rollouts:
            written = parse_steps(tok.decode(r["completion_ids"]), L)
            idx = decision_indices(tok, r["completion_ids"], L)
            seen_rollouts[r["rollout_id"]] = [written, idx, fam, vals, bool(r["correct"])]
        written, idx = seen_rollouts[r["rollout_id"]][:2]
        own = r["skill_id"].split("-")[1] == fam
        for j in range(L):
            i = idx[j]
            if i is None:
                continue
            d = r["teacher_logprobs"][i] - r["student_logprobs"][i]
            step_right = written[j] is not None and written[j][0] == chain[j]
            if not own:
                gs = ["other_family"]
            elif fam in world.seen:
                gs = ["seen_own"]
            elif r["correct"]:
                gs = ["unseen_own_correct"]
            else:
                gs = ["unseen_own_wrong_step_right" if step_right else "unseen_own_wrong_step_wrong"]
            if own and fam in world.unseen and step_right:
                gs.append("unseen_own_step_right")
            for g in gs:
                groups[j][g].append((d, r["category"]))
    out: dict[str, Any] = {"steps": [{g: _group_stats(v, band) for g, v in gr.items() if v} for gr in groups]}
    # per step, over the probe's rollouts: the rule written is the family's (rule), the value is the right chain's
    # value at that step (value: a wrong rule earlier makes it wrong), and the rollout's verdict
    for split in ("unseen", "seen"):
        rs = [v for v in seen_rollouts.values() if (v[2] in world.unseen) == (split == "unseen")]
        if rs:
            out[f"step_accuracy_{split}"] = [
                {"rule": statistics.fmean(float(w[j] is not None and w[j][0] == world.chain_of[f][j]) for w, _, f, _, _ in rs),
                 "value": statistics.fmean(float(w[j] is not None and w[j][1] == vals[j]) for w, _, f, vals, _ in rs)}
                for j in range(L)]
            out[f"accuracy_{split}"] = statistics.fmean(float(c) for *_, c in rs)
    cats = pt["category"].value_counts()
    out["categories"] = {c: int(n) for c, n in cats.iter_rows()}
    out["accuracy"] = float(pt.unique("rollout_id")["correct"].mean())
    return out


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

    st = read_table(SCORE_TEACHERS.path(sd))
    pt = pl.read_parquet(POLARIZE.file(sd)).select("rollout_id", "teacher_rank", "correct", "category")
    ro = read_table(ROLLOUT.path(sd)).select("rollout_id", "completion_ids")
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
    if c.get("steps", 1) > 1:
        return _print_step_calibration(c, log)
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
                log(_group_line(f"{g:<19}", d[g]))


def _group_line(label: str, x: dict) -> str:
    """One |Delta| group of a calibration: size, mean, quantiles of |Delta|, share in the gate's band, categories."""
    q = x["abs_quantiles"]
    cats = ", ".join(f"{k} {n}" for k, n in sorted(x["categories"].items()))
    return (f"      {label} n={x['n']:<4} mean {x['mean']:+.2f}  |D| p10/p50/p90 {q['p10']:.2f}/{q['p50']:.2f}/"
            f"{q['p90']:.2f}  in band {x['in_band']:.2f}  ({cats})")


def _print_step_calibration(c: dict, log: Log) -> None:
    L = c["steps"]
    log(f"calibration of a {L}-step world (held-out problems; the answer is right when every step's value is):")
    for split, e in c["base_eval"].items():
        log(f"  base plain accuracy {split:>7}: greedy {e['greedy']:.2f}  avg@{e['n']} {e['avg']:.2f}"
            f"  (chance per step {c['chance']:.2f}, whole chain {c['chance_chain']:.3f})")
    for split, d in c["rule_probs"].items():
        for j, x in enumerate(d["steps"]):
            log(f"  {split:>6} step {j + 1}: p(right rule | plain, right steps before) {x['p_right_rule_plain']:.2f} "
                f"(min {x['p_right_rule_plain_min']:.2f}); follows right guidance {x['follows_right_guidance']:.2f}, "
                f"wrong {x['follows_wrong_guidance']:.2f}; other-family TV {x['tv_other_family_guidance_vs_plain']:.2f}; "
                f"OPSD prompt {x['opsd_consistent_rule']:.2f}; law TV "
                + ", ".join(f"{k} {v:.2f}" for k, v in x["tv_model_vs_world_law"].items()))
    b = c["gate_band"]
    log(f"  gate band |Delta| in [{b['lo']:.2f}, {b['hi']:.2f}] (peak {b['peak']:.2f}); |Delta| at each step's rule token:")
    for key, d in c["delta"].items():
        sa = d.get("step_accuracy_unseen", [])
        log(f"    {key} (probe rollouts right: unseen {d.get('accuracy_unseen', 0):.3f}, seen {d.get('accuracy_seen', 0):.3f}; "
            "unseen step rule / value right: " + ", ".join(f"step {j + 1} {x['rule']:.2f} / {x['value']:.2f}"
                                                          for j, x in enumerate(sa)) + ")")
        for j, gr in enumerate(d["steps"]):
            for g in STEP_GROUPS:
                if g in gr:
                    log(_group_line(f"step {j + 1} {g:<28}", gr[g]))


# --------------------------------------------------------------------------------------------------
# evaluation through stages.eval


def _eval_cfg(cfg: WorldRunConfig, P: Paths, model: str, greedy: bool, n: int, bank: str | None = None):
    from stages.eval import EvalConfig

    return EvalConfig(model=model, problems=[str(P.world / "eval_unseen.jsonl"), str(P.world / "eval_seen.jsonl")],
                      protocol="quick", n=1 if greedy else n, temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0,
                      max_new_tokens=max_new_tokens(cfg), thinking=False, backend="hf", batch_size=96, seed=11, device="cpu",
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
    objective: str  # OBJECTIVE_RUNS
    p: float | None  # the bank's misleading fraction (sgsd-like objectives)
    level: str | None
    seed: int
    lr: float = 0.0  # 0: the experiment's lr
    group_size: int = 0  # GRPO; 0: the experiment's group_size
    opsd_temperature: float | None = None  # OPSD KL (scoring) temperature; None: the rollout temperature
    part: str = "full"  # multi-step worlds: the steps the bank's skills name (sgsd-like objectives)

    @property
    def name(self) -> str:
        tag = f"_{bank_key(self.p, self.level, self.part)[5:]}" if self.objective in SGSD_LIKE else ""
        tag += f"_lr{self.lr:g}" if self.lr else ""
        tag += f"_G{self.group_size}" if self.group_size else ""
        tag += f"_T{self.opsd_temperature:g}" if self.opsd_temperature is not None else ""
        return f"{self.objective}{tag}_s{self.seed}"


def base_world(cfg: WorldRunConfig, overrides: dict) -> WorldConfig:
    """Base 0's world with ``overrides`` (a [world] table) applied, checked."""
    from stages.engine.world import world_from_dict

    return world_from_dict({**asdict(cfg.world), **overrides}, "experiment.bases")


def base_configs(cfg: WorldRunConfig) -> list[tuple[str, WorldRunConfig]]:
    """(name, config) of every base of the comparison: base 0 (the [world] table, in ``out``), then each of
    ``bases`` in ``out/bases/<name>``, named by its settings (``seed1``, ``families10_rules5_seen4``)."""
    out = [("base0", cfg)]
    for b in cfg.bases:
        name = "_".join(f"{k}{v}" for k, v in sorted(b.items())) or "same"
        out.append((name, replace(cfg, world=base_world(cfg, b), out=str(Path(cfg.out) / "bases" / name), bases=[])))
    return out


def tuned_spec(tuning: dict, objective: str, p: float | None, level: str | None, seed: int,
               part: str = "full") -> RunSpec:
    t = tuning[objective]
    return RunSpec(objective, p, level, seed, lr=t["lr"], group_size=t.get("group_size", 0),
                   opsd_temperature=t.get("opsd_temperature"), part=part)


def run_specs(cfg: WorldRunConfig, tuning: dict) -> list[RunSpec]:
    specs = []
    for o in cfg.objectives:
        for s in cfg.seeds:
            if o in SGSD_LIKE:
                specs += [tuned_spec(tuning, o, p, lv, s, part) for p in cfg.p_values for lv in cfg.levels
                          for part in cfg.parts]
            else:
                specs.append(tuned_spec(tuning, o, None, None, s))
    return specs


def loop_sections(cfg: WorldRunConfig, P: Paths, spec: RunSpec, run_dir: Path) -> dict:
    """The recipe of one run: an ordinary `sgsd loop` config on the world's files."""
    grpo = spec.objective == "grpo"
    objective = "sgsd" if spec.objective in SGSD_LIKE else spec.objective
    R = cfg.rollouts_per_step
    G = spec.group_size or cfg.group_size
    level = spec.level or cfg.calibrated_level
    p = spec.p if spec.p is not None else 0.0
    part = spec.part if spec.objective in SGSD_LIKE else "full"
    train = {"lr": spec.lr or cfg.lr, "batch_size": R, "micro_batch_size": R, "max_grad_norm": cfg.max_grad_norm,
             "precision": "fp32"}
    if objective == "opsd":
        train["teacher_thinking"] = _thinking(cfg)
        if spec.opsd_temperature is not None:
            train["scoring_temperature"] = spec.opsd_temperature
    if objective == "sgsd":
        train["polarity"] = "imitate" if spec.objective == "imitate" else "verifier"
        if spec.objective == "sgsd-stance":
            train["reversed_tokens"] = "stance"
    return {
        "loop": {"run_dir": str(run_dir), "objective": objective, "model": str(P.base),
                 "problems": str(P.world / "train.jsonl"), "bank": str(P.bank(p, level, part)), "steps": cfg.steps,
                 "prompts_per_step": R // G if grpo else R, "seed": spec.seed, "device": "cpu",
                 "backend": "hf", "eval_every": cfg.eval_every, "keep_last": 1},
        "rollout": {"n": G if grpo else 1, "temperature": cfg.temperature, "top_p": 1.0, "top_k": 0,
                    "max_new_tokens": max_new_tokens(cfg), "batch_size": 64},
        "score_teachers": {"k": cfg.k_teachers, "retrieval": "lexical", "teacher_thinking": _thinking(cfg),
                           "index": str(P.index / bank_key(p, level, part) / "index.parquet")},
        "train": train,
        "eval": {"problems": [str(P.world / "eval_unseen.jsonl"), str(P.world / "eval_seen.jsonl")],
                 "protocol": "quick", "n": cfg.eval_n, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                 "max_new_tokens": max_new_tokens(cfg), "thinking": False, "backend": "hf", "batch_size": 96, "seed": 11},
    }


def _thinking(cfg: WorldRunConfig) -> str:
    """The teacher prompts' thinking flag, as the base model's corpus presented them."""
    return "on" if cfg.world.teacher_thinking else "off"


WALL_COLS = ("wall_rollout_s", "wall_score_teachers_s", "wall_polarize_s", "wall_grade_s", "wall_train_s")


def run_one(cfg: WorldRunConfig, P: Paths, spec: RunSpec, *, base_curve: dict | None = None, final_eval: bool = True,
            log: Log = print, progress: Progress = None) -> dict:
    """One loop run (cached in ``<run>/world_result.json``): its curve, training reward, alarms and (unless
    ``final_eval`` is off, as in the sweep) the held-out evaluation."""
    from stages import loop

    run_dir = P.compare / spec.name
    cached = run_dir / "world_result.json"
    prior_wall = 0.0  # a tuning run reused as a table run: its training time counts in its wall
    if cached.exists():
        row = json.loads(cached.read_text())
        if row.get("final") is not None or not final_eval:
            return row
        prior_wall = float(row.get("wall_s") or 0.0)
    t0 = time.time()
    metrics = pl.read_parquet(loop.run(loop_sections(cfg, P, spec, run_dir), source=f"world:{spec.name}",
                                       progress=progress, log=None))
    wall = prior_wall + time.time() - t0
    walls = [c for c in WALL_COLS if c in metrics.columns]
    cum_wall = metrics.select(pl.sum_horizontal([pl.col(c).fill_null(0.0) for c in walls])).to_series().cum_sum().to_list()
    base_curve = base_curve or {"unseen": None, "seen": None}
    curve = {"rollouts": [0], "unseen": [base_curve["unseen"]], "seen": [base_curve["seen"]], "wall": [0.0]}
    for i, row in enumerate(metrics.iter_rows(named=True)):
        if row.get("eval_eval_unseen_avg_at_n") is not None:
            curve["rollouts"].append(int(row["step"]) * cfg.rollouts_per_step)
            curve["unseen"].append(float(row["eval_eval_unseen_avg_at_n"]))
            curve["seen"].append(float(row["eval_eval_seen_avg_at_n"]))
            curve["wall"].append(float(cum_wall[i]))
    rewards = metrics["reward"].to_list() if "reward" in metrics.columns else []
    final = None
    if final_eval:
        final = evaluate(cfg, P, str(loop.step_dir(run_dir, cfg.steps) / "checkpoint"),
                         _final_eval_dir(cfg, run_dir), log=log, progress=progress)
    fracs = {c: metrics[c].to_list() for c in ("frac_helpful", "frac_over_suppressive") if c in metrics.columns}
    row = {"run": spec.name, **asdict(spec), "wall_s": wall, "train_wall_s": float(cum_wall[-1]) if cum_wall else 0.0,
           "rollouts": cfg.steps * cfg.rollouts_per_step, "final": final, "curve": curve,
           "mean_reward": statistics.fmean(rewards) if rewards else None,
           "reward_last_half": statistics.fmean(rewards[len(rewards) // 2:]) if rewards else None,
           "rewards": rewards, "first_alarm": first_alarm(cfg, spec, run_dir), **fracs}
    atomic_write_json(cached, row)
    return row


def _final_eval_dir(cfg: WorldRunConfig, run_dir: Path) -> Path:
    return run_dir / f"final_eval_step{cfg.steps:04d}"


def avg_eval_table(cfg: WorldRunConfig, out: Path, split: str = "unseen") -> Path:
    """The completions of one held-out split of :func:`evaluate`'s sampled (avg@n) pass into ``out``."""
    return out / f"avg{cfg.final_eval_n}" / "eval" / f"eval_{split}.parquet"


def first_alarm(cfg: WorldRunConfig, spec: RunSpec, run_dir: Path) -> tuple[int, str] | None:
    """(step, alarm) of the first collapse alarm of a run, recomputed from its metrics.parquet (stages.engine.alarms;
    runs written before the loop logged ``prompts`` get it from the spec)."""
    from stages.engine.alarms import step_alarms

    path = METRICS.file(run_dir)
    if not path.exists():
        return None
    rows = pl.read_parquet(path).to_dicts()
    prompts = cfg.rollouts_per_step // (spec.group_size or cfg.group_size) if spec.objective == "grpo" else cfg.rollouts_per_step
    for r in rows:
        r.setdefault("prompts", prompts)
    for i in range(len(rows)):
        a = step_alarms(rows, i)
        if a:
            return int(rows[i]["step"]), "; ".join(a)
    return None


def _run_in_worker(cfg: WorldRunConfig, out: str, spec: RunSpec, base_curve: dict | None, final_eval: bool) -> dict:
    """One run in a worker process of ``compare`` (jobs > 1): no progress bars, the result row back."""
    _threads(cfg, cfg.jobs)
    return run_one(cfg, Paths(out), spec, base_curve=base_curve, final_eval=final_eval, log=lambda s: None,
                   progress=None)


def _run_all(jobs: list[tuple[WorldRunConfig, RunSpec, dict | None, bool]], cfg: WorldRunConfig, log: Log,
             progress: Progress, what: str) -> list[dict]:
    """Run (config, spec, base curve, final eval) jobs, ``cfg.jobs`` at a time; rows in input order."""
    rows: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, (c, spec, bc, fe) in enumerate(jobs):
        cached = Paths(c.out).compare / spec.name / "world_result.json"
        if cached.exists():
            r = json.loads(cached.read_text())
            if r.get("final") is not None or not fe:
                rows[i] = r
                continue
        todo.append(i)
    log(f"{what}: {len(jobs)} runs, {len(jobs) - len(todo)} cached")
    n_done = [len(jobs) - len(todo)]

    def report(i: int, r: dict) -> None:
        rows[i] = r
        n_done[0] += 1
        fin = r.get("final")
        res = (f"unseen avg {fin['unseen']['avg']:.3f} seen avg {fin['seen']['avg']:.3f}" if fin else
               f"training reward, last half {r['reward_last_half']:.3f}")
        log(f"[{n_done[0]}/{len(jobs)}] {Path(jobs[i][0].out).name}/{r['run']}: {res} ({r['wall_s']:.0f}s)")

    if cfg.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        n = _threads(cfg, cfg.jobs)
        log(f"{what}: {len(todo)} runs, {cfg.jobs} at a time ({n} torch thread(s) each)")
        pool = ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn"))
        try:
            futs = {pool.submit(_run_in_worker, jobs[i][0], jobs[i][0].out, jobs[i][1], jobs[i][2], jobs[i][3]): i
                    for i in todo}
            for fut in as_completed(futs):
                report(futs[fut], fut.result())
        finally:
            # every result is in (or a run failed): end the workers now; an idle worker's own exit can hang on
            # its verifier pool, and waiting for it would hold up the table
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        for i in todo:
            c, spec, bc, fe = jobs[i]
            report(i, run_one(c, Paths(c.out), spec, base_curve=bc, final_eval=fe, log=log, progress=progress))
    return rows  # type: ignore[return-value]


def tune(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None) -> dict:
    """The same tuning budget for every objective, on base 0 and run seed ``sweep_seed``: the lr grid for each
    of sgsd, grpo, opsd and imitate (sgsd-stance, a variant of sgsd, takes sgsd's lr), then GRPO's group size
    and OPSD's KL temperature at their best lr.  The criterion is the mean training reward over the last half
    of the steps (training problems, on-policy): the held-out problems the table reports are never looked at.
    Written to ``<out>/compare/tuning.json``."""
    P = Paths(cfg.out)
    lv, s = cfg.calibrated_level, cfg.sweep_seed
    tuned = [o for o in cfg.objectives if o != "sgsd-stance"]
    if "sgsd-stance" in cfg.objectives and "sgsd" not in tuned:
        tuned.append("sgsd")
    if not cfg.tune:
        return {o: {"lr": cfg.lr, "group_size": cfg.group_size if o == "grpo" else 0, "opsd_temperature": None}
                for o in OBJECTIVE_RUNS} | {"sweep": [], "criterion": "not tuned: every objective at the config's lr"}

    def spec(o: str, lr: float, g: int = 0, t: float | None = None) -> RunSpec:
        return RunSpec(o, 0.0 if o in SGSD_LIKE else None, lv if o in SGSD_LIKE else None, s, lr=lr,
                       group_size=g or (cfg.group_size if o == "grpo" else 0), opsd_temperature=t)

    first = [spec(o, lr) for o in tuned for lr in cfg.lr_grid]
    rows = _run_all([(cfg, sp, None, False) for sp in first], cfg, log, progress, "tuning: lr sweep")
    table = [{"objective": sp.objective, "lr": sp.lr, "group_size": sp.group_size, "opsd_temperature": None,
              "reward_last_half": r["reward_last_half"], "run": sp.name} for sp, r in zip(first, rows)]
    best: dict[str, dict] = {}
    for o in tuned:
        cands = [t for t in table if t["objective"] == o]
        b = max(cands, key=lambda t: (t["reward_last_half"], -t["lr"]))
        best[o] = {"lr": b["lr"], "group_size": b["group_size"], "opsd_temperature": None}
    second = []
    if "grpo" in best:
        second += [spec("grpo", best["grpo"]["lr"], g) for g in cfg.group_sizes if g != best["grpo"]["group_size"]]
    if "opsd" in best:
        second += [spec("opsd", best["opsd"]["lr"], 0, t) for t in cfg.opsd_temperatures if t != cfg.temperature]
    rows2 = _run_all([(cfg, sp, None, False) for sp in second], cfg, log, progress, "tuning: group size / KL temperature")
    table += [{"objective": sp.objective, "lr": sp.lr, "group_size": sp.group_size,
               "opsd_temperature": sp.opsd_temperature, "reward_last_half": r["reward_last_half"], "run": sp.name}
              for sp, r in zip(second, rows2)]
    for o, key in (("grpo", "group_size"), ("opsd", "opsd_temperature")):
        if o in best:
            cands = [t for t in table if t["objective"] == o and t["lr"] == best[o]["lr"]]
            b = max(cands, key=lambda t: t["reward_last_half"])
            best[o][key] = b[key]
    if "sgsd-stance" in cfg.objectives:
        best["sgsd-stance"] = dict(best["sgsd"], note="sgsd's tuned lr (a variant, not tuned on its own)")
    out = {**best, "sweep": table, "criterion": "mean training reward over the last half of the steps",
           "base": "base0", "seed": s, "level": lv}
    atomic_write_json(P.compare / "tuning.json", out)
    log("tuning: " + ", ".join(f"{o} lr {b['lr']:g}" + (f" G {b['group_size']}" if o == "grpo" else "")
                               + (f" T {b['opsd_temperature'] if b['opsd_temperature'] is not None else cfg.temperature:g}"
                                  if o == "opsd" else "") for o, b in best.items()))
    return out


def _curve_at(curve: dict, wall: float) -> tuple[float, float]:
    """(unseen, seen) at the last eval point whose cumulative training wall time is <= wall."""
    best = 0
    for i, w in enumerate(curve["wall"]):
        if w <= wall + 1e-9:
            best = i
    return curve["unseen"][best], curve["seen"][best]


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _level_label(r: dict) -> str | None:
    """A run's bank sharpness, with its skill part when the skills name only some steps ("medium/first")."""
    part = r.get("part", "full")
    return r["level"] if r["level"] is None or part == "full" else f"{r['level']}/{part}"


def summarize(cfg: WorldRunConfig, base: dict, base_skills: dict, rows: list[dict]) -> tuple[list[dict], str]:
    """Mean and spread over seeds per (objective, p, level), at equal rollouts and at equal wall time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["p"], _level_label(r)), []).append(r)
    t_eq = min(r["train_wall_s"] for r in rows) if rows else 0.0
    table = []
    for (o, p, lv), rs in groups.items():
        a_u = _ms([r["final"]["unseen"]["avg"] for r in rs])
        table.append({"objective": o, "p": p, "level": lv, "seeds": len(rs), "lr": rs[0]["lr"],
                      "unseen_greedy": _ms([r["final"]["unseen"]["greedy"] for r in rs]), "unseen_avg": a_u,
                      "seen_greedy": _ms([r["final"]["seen"]["greedy"] for r in rs]),
                      "seen_avg": _ms([r["final"]["seen"]["avg"] for r in rs]),
                      "unseen_avg_at_equal_wall": _ms([_curve_at(r["curve"], t_eq)[0] for r in rs]),
                      "gain_unseen_avg": a_u[0] - base["unseen"]["avg"], "wall_s": _ms([r["wall_s"] for r in rs]),
                      "by_seed": [r["final"]["unseen"]["avg"] for r in rs],
                      "seeds_run": [r["seed"] for r in rs],
                      # multi-step worlds: per step, p(right rule) in the held-out unseen completions, seed mean
                      "unseen_steps": ([statistics.fmean(x) for x in zip(*[r["final_steps"] for r in rs])]
                                       if all(r.get("final_steps") for r in rs) else None),
                      "unseen_steps_by_seed": [statistics.fmean(r["final_steps"]) if r.get("final_steps") else None
                                               for r in rs],
                      "alarms": sum(1 for r in rs if r.get("first_alarm"))})
    table.sort(key=lambda t: (OBJECTIVE_RUNS.index(t["objective"]), t["p"] or 0, t["level"] or ""))
    n = cfg.final_eval_n
    lines = [f"| method | bank p | sharpness | lr | seeds | unseen greedy | unseen avg@{n} (by seed) | seen greedy | "
             f"seen avg@{n} | unseen avg@{cfg.eval_n} at equal wall ({t_eq:.0f}s) | gain (unseen avg) | runs with an "
             f"alarm | wall s/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
    lines.append(f"| base | - | - | - | - | {base['unseen']['greedy']:.3f} | {base['unseen']['avg']:.3f} | "
                 f"{base['seen']['greedy']:.3f} | {base['seen']['avg']:.3f} | - | 0 | - | - |")
    for key, bs in base_skills.items():
        lines.append(f"| base+skills | {key} | | - | - | {bs['unseen']['greedy']:.3f} | {bs['unseen']['avg']:.3f} | "
                     f"{bs['seen']['greedy']:.3f} | {bs['seen']['avg']:.3f} | - | "
                     f"{bs['unseen']['avg'] - base['unseen']['avg']:+.3f} | - | - |")
    for t in table:
        seeds = " / ".join(f"{x:.2f}" for x in t["by_seed"])
        lines.append(f"| {t['objective']} | {'-' if t['p'] is None else t['p']} | {t['level'] or '-'} | {t['lr']:g} | "
                     f"{t['seeds']} | {f(t['unseen_greedy'])} | {f(t['unseen_avg'])} ({seeds}) | {f(t['seen_greedy'])} | "
                     f"{f(t['seen_avg'])} | {f(t['unseen_avg_at_equal_wall'])} | {t['gain_unseen_avg']:+.3f} | "
                     f"{t['alarms']} | {t['wall_s'][0]:.0f} |")
    return table, "\n".join(lines)


# the claims (issue 20 / the paper), checked per base
PAPER_MARGIN = {"grpo": 0.062, "opsd": 0.017}


def claims(cfg: WorldRunConfig, per_base: list[dict], sgsd: str = "sgsd") -> list[dict]:
    """Each claim per base (holds / fails / not testable, with its figure) and 'holds on k of n bases'."""
    lv = cfg.calibrated_level
    out = []

    def cell(t: list[dict], o: str, p: float | None) -> dict | None:
        return next((x for x in t if x["objective"] == o and x["p"] == p and x["level"] == (lv if p is not None else None)), None)

    checks: list[tuple[str, Callable[[dict], tuple[bool | None, str]]]] = []

    def gain30(b):
        c = cell(b["table"], sgsd, 0.0)
        return (None, "-") if c is None else (c["gain_unseen_avg"] >= 0.30, f"{c['gain_unseen_avg']:+.3f}")

    def beats(o):
        def f(b):
            c, d = cell(b["table"], sgsd, 0.0), cell(b["table"], o, None)
            if c is None or d is None:
                return None, "-"
            diff = c["unseen_avg"][0] - d["unseen_avg"][0]
            return diff > 0, f"{diff:+.3f}"
        return f

    def keeps70(b):
        c0, c5 = cell(b["table"], sgsd, 0.0), cell(b["table"], sgsd, 0.5)
        if c0 is None or c5 is None or c0["gain_unseen_avg"] <= 0:
            return None, "no p=0 gain"
        r = c5["gain_unseen_avg"] / c0["gain_unseen_avg"]
        return r >= 0.7, f"{r:.0%}"

    def imitate_loses(b):
        c0, c5 = cell(b["table"], "imitate", 0.0), cell(b["table"], "imitate", 0.5)
        if c0 is None or c5 is None:
            return None, "-"
        if c0["gain_unseen_avg"] <= 0.05:
            return None, f"imitate gains {c0['gain_unseen_avg']:+.3f} at p=0: nothing to lose"
        r = c5["gain_unseen_avg"] / c0["gain_unseen_avg"]
        return r <= 0.5, f"keeps {r:.0%}"

    def seen5(b):
        cs = [c for c in (cell(b["table"], sgsd, 0.0), cell(b["table"], sgsd, 0.5)) if c is not None]
        if not cs:
            return None, "-"
        drop = max(b["base"]["seen"]["avg"] - c["seen_avg"][0] for c in cs)
        return drop <= 0.05, f"worst drop {drop * 100:.1f} points"

    checks = [(f"{sgsd} gains >= 30 points on unseen families (p=0)", gain30),
              (f"{sgsd} above tuned GRPO at equal rollouts (paper +6.2)", beats("grpo")),
              (f"{sgsd} above tuned OPSD at equal rollouts (paper +1.7)", beats("opsd")),
              (f"{sgsd} keeps >= 70% of its gain at p=0.5", keeps70),
              ("imitate loses >= half its gain at p=0.5", imitate_loses),
              (f"{sgsd}: seen families drop <= 5 points (p=0 and p=0.5)", seen5)]
    if sgsd != "sgsd":  # a variant's claims: the imitate claim is the method's, listed once
        checks = [c for c in checks if not c[0].startswith("imitate")]
    for name, fn in checks:
        res = [(b["name"],) + fn(b) for b in per_base]
        tested = [r for r in res if r[1] is not None]
        out.append({"claim": name, "per_base": [{"base": n, "holds": h, "figure": fig} for n, h, fig in res],
                    "holds_on": sum(1 for r in tested if r[1]), "tested_on": len(tested), "bases": len(res)})
    return out


def pooled(per_base: list[dict]) -> list[dict]:
    """Per method: the mean over bases of the seed-mean unseen / seen avg and gain, ± the standard error over
    bases (the spread between bases is the one a new user meets)."""
    keys = []
    for b in per_base:
        for t in b["table"]:
            k = (t["objective"], t["p"], t["level"])
            if k not in keys:
                keys.append(k)
    out = []
    for o, p, lv in keys:
        cells = [(b, t) for b in per_base for t in b["table"] if (t["objective"], t["p"], t["level"]) == (o, p, lv)]

        def mse(xs):
            m = statistics.fmean(xs)
            return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)

        out.append({"objective": o, "p": p, "level": lv, "bases": len(cells),
                    "unseen_avg": mse([t["unseen_avg"][0] for _, t in cells]),
                    "seen_avg": mse([t["seen_avg"][0] for _, t in cells]),
                    "gain": mse([t["gain_unseen_avg"] for _, t in cells])})
    return out


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = r["objective"] + ("" if r["p"] is None else f" p={r['p']} {_level_label(r)}")
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


def compare(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None, rebuild: bool = False) -> dict:
    """Tuning (base 0), then every base: build/calibrate (checked), every run at the tuned settings, per-base
    tables, pooled figures, the claims, learning curves; ``compare/results.json``."""
    t0 = time.time()
    bases = []
    tuning: dict | None = None
    t_bases = 0.0
    for name, bc in base_configs(cfg):
        if tuning is None and name != "base0":  # tune on base 0 before building the others
            tuning = tune(cfg, log=log, progress=progress)
        t_b = time.time()
        log(f"compare: base {name}")
        try:
            calib = calibrate(bc, log=log, progress=progress, rebuild=rebuild and name == "base0")
        except InputError as e:  # a base outside its bands is reported, not compared
            log(f"compare: base {name} refused: {e.problem}")
            bases.append({"name": name, "cfg": bc, "refused": e.problem})
            continue
        man = json.loads((Paths(bc.out).base / BASE_MANIFEST).read_text()) \
            if (Paths(bc.out).base / BASE_MANIFEST).exists() else {}
        bases.append({"name": name, "cfg": bc, "calib": calib, "hash": base_hash(man) if man else "?",
                      "shipped": json.loads((Paths(bc.out).out / "build.json").read_text()).get("shipped")})
        t_bases += time.time() - t_b
    if tuning is None:
        tuning = tune(cfg, log=log, progress=progress)
    jobs, owners = [], []
    for b in bases:
        if "refused" in b:
            continue
        bc, P = b["cfg"], Paths(b["cfg"].out)
        b["base_curve"] = _base_curve(bc, P, log, progress)
        b["base_skills"] = {}
        if cfg.base_skills:
            for p in cfg.p_values:
                for lv in cfg.levels:
                    for part in cfg.parts:
                        key = bank_key(p, lv, part)[5:]
                        b["base_skills"][key] = evaluate(bc, P, str(P.base), P.compare / "base_skills" / key,
                                                         bank=str(P.bank(p, lv, part)), log=log, progress=progress)
        for spec in run_specs(bc, tuning):
            jobs.append((bc, spec, b["base_curve"], True))
            owners.append(b["name"])
    probe_jobs = [(cfg, RunSpec(o, p, cfg.calibrated_level, cfg.sweep_seed, lr=lr), None, True)
                  for lr in cfg.probe_lrs for o in ("sgsd", "sgsd-stance") for p in cfg.p_values
                  if o in cfg.objectives and bases and "refused" not in bases[0]]
    rows = _run_all(jobs + probe_jobs, cfg, log, progress, "compare")
    probe_rows = rows[len(jobs):]
    rows = rows[: len(jobs)]
    for (bc, spec, _, _), r in zip(jobs, rows):  # the alarms as stages.engine.alarms computes them now
        r["first_alarm"] = first_alarm(bc, spec, Paths(bc.out).compare / spec.name)
        r["final_steps"] = step_rule_accuracy(
            World(bc.world), avg_eval_table(bc, _final_eval_dir(bc, Paths(bc.out).compare / spec.name)))
    per_base = []
    for b in bases:
        if "refused" in b:
            continue
        rs = [r for r, o in zip(rows, owners) if o == b["name"]]
        base = b["calib"]["base_eval"]
        table, md = summarize(b["cfg"], base, b["base_skills"], rs)
        png = plot(rs, Paths(b["cfg"].out).compare / "learning_curves.png",
                   f"skill world {b['name']}: {cfg.steps * cfg.rollouts_per_step} rollouts per run")
        base_steps = step_rule_accuracy(World(b["cfg"].world),
                                        avg_eval_table(b["cfg"], Paths(b["cfg"].out).calib / "base_eval"))
        per_base.append({"name": b["name"], "hash": b["hash"], "shipped": b["shipped"], "world": asdict(b["cfg"].world),
                         "base": base, "base_steps": base_steps, "table": table, "markdown": md, "png": str(png), "runs": rs,
                         "calibration": b["calib"], "properties": base_properties(b["calib"], b["cfg"])})
        log(f"base {b['name']} ({b['hash']}):\n{md}")
    run_walls = [r["wall_s"] for r in rows + probe_rows]
    for t in tuning.get("sweep", []):
        f = Paths(cfg.out).compare / t["run"] / "world_result.json"
        if f.exists() and t["run"] not in {r["run"] for r in rows[: len(run_specs(cfg, tuning))]}:
            run_walls.append(json.loads(f.read_text())["wall_s"])
    build_walls = []
    for b in bases:
        mp = Paths(b["cfg"].out).base / BASE_MANIFEST
        if "refused" not in b and mp.exists() and not b.get("shipped"):
            build_walls.append(json.loads(mp.read_text()).get("build_wall_s") or 0.0)
    results = {"config": _jsonable(asdict(cfg)), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "compute": {"runs": len(run_walls), "run_wall_sum_s": sum(run_walls),
                           "run_wall_median_s": statistics.median(run_walls) if run_walls else 0.0,
                           "run_wall_max_s": max(run_walls, default=0.0),
                           "base_builds_s": sum(build_walls), "bases_built": len(build_walls)},
               "machine": machine(), "versions": versions(), "wall_s": time.time() - t0,
               "wall_bases_s": t_bases, "tuning": tuning, "per_base": per_base,
               "refused": [{"name": b["name"], "problem": b["refused"]} for b in bases if "refused" in b],
               "pooled": pooled(per_base), "claims": claims(cfg, per_base),
               "claims_variant": claims(cfg, per_base, "sgsd-stance") if "sgsd-stance" in cfg.objectives else [],
               "collapse_probe": [{"objective": r["objective"], "p": r["p"], "lr": r["lr"], "seed": r["seed"],
                                   "unseen": r["final"]["unseen"]["avg"], "seen": r["final"]["seen"]["avg"],
                                   "seen_curve": r["curve"]["seen"][1:],
                                   "first_alarm": first_alarm(cfg, RunSpec(r["objective"], r["p"], r["level"], r["seed"],
                                                                           lr=r["lr"]), Paths(cfg.out).compare / r["run"]),
                                   "over_suppressive_last10": statistics.fmean(r["frac_over_suppressive"][-10:])
                                   if r.get("frac_over_suppressive") else None,
                                   "helpful_last10": statistics.fmean(r["frac_helpful"][-10:])
                                   if r.get("frac_helpful") else None} for r in probe_rows],
               "png": per_base[0]["png"] if per_base else None}
    atomic_write_json(Paths(cfg.out).compare / "results.json", results)
    for c in results["claims"] + results["claims_variant"]:
        log(f"claim: {c['claim']}: holds on {c['holds_on']} of {c['tested_on']} bases tested "
            f"({', '.join(str(x['figure']) for x in c['per_base'])})")
    return results


def results_markdown(res: dict, command: str) -> str:
    """The results file (bench/SKILL_WORLD_RESULTS.md): command, date, machine, versions, base hashes, tuning,
    per-base tables with calibration, pooled figures, the claims."""
    m, cfg, v = res["machine"], res["config"], res["versions"]
    f = lambda x: f"{x[0]:.3f} ± {x[1]:.3f}"  # noqa: E731
    lines = ["# Skill world results", "", "Regenerate: `" + command + "` (every run is cached under the output folder).",
             "", f"- date: {res['date']}",
             f"- machine: {m['processor']}, {m['cpus']} CPUs, {cfg['jobs']} runs at a time",
             "- packages: " + ", ".join(f"{k} {x}" for k, x in v.items()),
             f"- this invocation: {res['wall_s']:.0f} s wall ({res['wall_bases_s']:.0f} s of it building and "
             f"calibrating bases; cached runs are not run again); {sum(len(b['runs']) for b in res['per_base'])} "
             f"compared runs + {len(res['tuning'].get('sweep', []))} tuning runs + "
             f"{len(res.get('collapse_probe', []))} collapse-probe runs",
             f"- compute behind the figures: {res['compute']['runs']} distinct runs, {res['compute']['run_wall_sum_s']:.0f} s "
             f"of run wall time in all ({res['compute']['run_wall_sum_s'] / cfg['jobs']:.0f} s at {cfg['jobs']} at a time), "
             f"plus {res['compute']['base_builds_s']:.0f} s building and checking {res['compute']['bases_built']} bases "
             f"(base0 is the shipped one)",
             f"- every run: {cfg['steps']} loop steps x {cfg['rollouts_per_step']} generated rollouts, K = "
             f"{cfg['k_teachers']} teachers, rollout T = {cfg['temperature']}, banks at sharpness {cfg['levels']}, "
             f"misleading p {cfg['p_values']}, run seeds {cfg['seeds']}; plain-prompt greedy and avg@{cfg['final_eval_n']} "
             f"on held-out problems",
             "", "## Bases", "", "| base | world | hash | source | seen avg | unseen avg | p(right rule), unseen | follows right / "
             "wrong guidance | other-family TV seen / unseen | Delta in band |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in res["per_base"]:
        w, pr = b["world"], b["properties"]
        L = w.get("steps", 1)
        if L > 1:  # per step position: "step 1 / step 2"
            per = lambda k: " / ".join(f"{pr[f'{k}_step{j}']:.2f}" for j in range(1, L + 1))  # noqa: E731
            p_right = " / ".join(f"{pr[f'unseen_right_rule_excess_step{j}'] + w['unseen_spread'] / w['rules']:.3f}"
                                 for j in range(1, L + 1))
            lines.append(f"| {b['name']} | F={w['families']} R={w['rules']} seen={w['seen']} seed={w['seed']} L={L} | "
                         f"`{b['hash']}` | {'shipped' if b['shipped'] else 'built here'} | {b['base']['seen']['avg']:.3f} | "
                         f"{b['base']['unseen']['avg']:.3f} | {p_right} (per step) | {per('follows_right_guidance')} / "
                         f"{per('follows_wrong_guidance')} | {per('other_family_tv_seen')} / {per('other_family_tv_unseen')} | "
                         f"{per('delta_in_band')} (per step) |")
            continue
        lines.append(f"| {b['name']} | F={w['families']} R={w['rules']} seen={w['seen']} seed={w['seed']} | `{b['hash']}` | "
                     f"{'shipped' if b['shipped'] else 'built here'} | {b['base']['seen']['avg']:.3f} | "
                     f"{b['base']['unseen']['avg']:.3f} | {pr['unseen_right_rule_excess'] + w['unseen_spread'] / w['rules']:.3f} | "
                     f"{pr['follows_right_guidance']:.2f} / {pr['follows_wrong_guidance']:.2f} | "
                     f"{pr['other_family_tv_seen']:.2f} / {pr['other_family_tv_unseen']:.2f} | {pr['delta_in_band']:.2f} |")
    for r in res.get("refused", []):
        lines.append(f"| {r['name']} | refused: {r['problem']} | | | | | | | | |")
    t = res["tuning"]
    lines += ["", "## Tuning (base0, run seed %s, %s)" % (t.get("seed"), t.get("criterion", "")), "",
              "| objective | lr | group size | OPSD KL temperature | training reward, last half |", "|---|---|---|---|---|"]
    for row in t.get("sweep", []):
        lines.append(f"| {row['objective']} | {row['lr']:g} | {row['group_size'] or '-'} | "
                     f"{row['opsd_temperature'] if row['opsd_temperature'] is not None else 'rollout T'} | "
                     f"{row['reward_last_half']:.3f} |")
    lines += ["", "Chosen: " + ", ".join(
        f"{o} lr {x['lr']:g}" + (f", G {x['group_size']}" if o == "grpo" else "")
        + (f", KL T {x['opsd_temperature'] if x['opsd_temperature'] is not None else cfg['temperature']}" if o == "opsd" else "")
        for o, x in t.items() if isinstance(x, dict) and "lr" in x and o in cfg["objectives"]) + ".", ""]
    lines += ["## Claims", "", "| claim | holds on | per base |", "|---|---|---|"]
    for c in res["claims"] + res.get("claims_variant", []):
        per = "; ".join(f"{x['base']}: {'yes' if x['holds'] else ('no' if x['holds'] is not None else 'n/a')} "
                        f"({x['figure']})" for x in c["per_base"])
        lines.append(f"| {c['claim']} | {c['holds_on']} of {c['tested_on']} bases ({c['bases']} compared) | {per} |")
    if res.get("collapse_probe"):
        lines += ["", "## Collapse probe (base0, run seed %s, above the tuned lr)" % cfg["sweep_seed"], "",
                  "| method | bank p | lr | unseen avg | seen avg | seen avg@n every 5 steps | first alarm | "
                  "over-suppressive / helpful pairs, last 10 steps |", "|---|---|---|---|---|---|---|---|"]
        for r in res["collapse_probe"]:
            fa = f"step {r['first_alarm'][0]}: {r['first_alarm'][1]}" if r["first_alarm"] else "none"
            mix = (f"{r['over_suppressive_last10']:.2f} / {r['helpful_last10']:.2f}"
                   if r["over_suppressive_last10"] is not None else "-")
            lines.append(f"| {r['objective']} | {r['p']} | {r['lr']:g} | {r['unseen']:.3f} | {r['seen']:.3f} | "
                         f"{' '.join(f'{x:.2f}' for x in r['seen_curve'])} | {fa} | {mix} |")
        lines.append("")
    lines += ["", "## Pooled over bases (mean of the per-base seed means ± standard error over bases)", "",
              "| method | bank p | bases | unseen avg | gain | seen avg |", "|---|---|---|---|---|---|"]
    for p in res["pooled"]:
        lines.append(f"| {p['objective']} | {'-' if p['p'] is None else p['p']} | {p['bases']} | {f(p['unseen_avg'])} | "
                     f"{f(p['gain'])} | {f(p['seen_avg'])} |")
    for b in res["per_base"]:
        lines += ["", f"## Base {b['name']} (`{b['hash']}`)", "", b["markdown"], "",
                  f"Learning curves: `{b['png']}` (copied to `bench/skill_world/learning_curves_{b['name']}.png`)", "",
                  "<details><summary>calibration</summary>", "", "```"]
        buf: list[str] = []
        print_calibration(b["calibration"], buf.append)
        lines += buf + ["```", "", "</details>"]
    return "\n".join(lines) + "\n"


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
    from stages.engine.atomic import to_jsonable

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


def demo(cfg: WorldRunConfig, *, log: Log = print, progress: Progress = None, rebuild: bool = False) -> dict:
    """The first run a user sees: the base (shipped or built), base eval, one SGSD run, before/after table."""
    t0 = time.time()
    P = build(cfg, log=log, progress=progress, rebuild=rebuild)
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


# --------------------------------------------------------------------------------------------------
# the step sweep: one comparison per L, side by side


FULL_SWEEP = {"seeds": [0, 1, 2], "p_values": [0.0, 0.5], "steps": 40, "tune": True,
              "objectives": ["sgsd", "grpo", "opsd", "imitate"]}


def steps_sweep(cfgs: list[WorldRunConfig], *, log: Log = print, progress: Progress = None) -> list[dict]:
    """``compare`` for each config (one world per L, each tuned on its own base by training reward), in order."""
    out = []
    for c in cfgs:
        log(f"steps: L = {c.world.steps} ({c.out})")
        out.append(compare(c, log=log, progress=progress))
    return out


def _reduced(cfg: dict) -> list[str]:
    """How a configuration falls short of the sweep the issue asks for (empty: the full design)."""
    return [f"{k} = {cfg[k]} (design: {v})" for k, v in FULL_SWEEP.items()
            if (sorted(cfg[k]) if isinstance(v, list) else cfg[k]) != (sorted(v) if isinstance(v, list) else v)]


def paired_differences(a: dict | None, b: dict | None, field: str) -> list[float]:
    """Seed by seed, a's figure minus b's (two rows of :func:`summarize`'s table; ``field`` a per-seed list such as
    ``by_seed``), over the seeds both ran and both measured."""
    if a is None or b is None or field not in a or field not in b:
        return []
    xa, xb = dict(zip(a["seeds_run"], a[field])), dict(zip(b["seeds_run"], b[field]))
    return [xa[k] - xb[k] for k in sorted(xa) if k in xb and xa[k] is not None and xb[k] is not None]


def steps_png_copies(results: list[dict], results_file: Path) -> dict[str, str]:
    """Where the step sweep's learning-curve PNGs are copied beside its results file: ``bench/SKILL_WORLD_STEPS.md``
    -> ``bench/skill_world/steps_learning_curves_L<L>.png`` (another results file: its own stem in the name)."""
    stem = results_file.stem.lower().removeprefix("skill_world_")
    return {r["png"]: str(results_file.parent / "skill_world" / f"{stem}_learning_curves_L{r['config']['world'].get('steps', 1)}.png")
            for r in results if r.get("png")}


def write_steps_results(results: list[dict], path: Path, command: str) -> None:
    """The step sweep's results file and, beside it, its learning-curve PNGs (each write atomic)."""
    copies = steps_png_copies(results, Path(path))
    for src, dst in copies.items():
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dst, Path(src).read_bytes())
    atomic_write_text(path, steps_markdown(results, command, copies))


def steps_markdown(results: list[dict], command: str, copies: dict[str, str] | None = None) -> str:
    """bench/SKILL_WORLD_STEPS.md: per L the base, the tuned settings, every method's held-out unseen accuracy,
    SGSD's margin over GRPO, the misleading half, partial against full skills, and the calibration groups;
    ``copies``: learning-curve PNG -> where the caller copies it (:func:`steps_png_copies`)."""
    lines = ["# Skill world: multi-step procedures (L = " + ", ".join(str(r["config"]["world"].get("steps", 1))
                                                                   for r in results) + ")", "",
             "Regenerate: `" + command + "` (every run is cached under each config's output folder).", ""]
    short = {f"L={r['config']['world'].get('steps', 1)}": _reduced(r["config"]) for r in results}
    if any(short.values()):
        lines += ["**REDUCED RUN** (not the issue's full sweep): " + "; ".join(f"{k}: {', '.join(v)}"
                                                                             for k, v in short.items() if v), ""]
    m, v = results[0]["machine"], results[0]["versions"]
    lines += [f"- date: {results[-1]['date']}", f"- machine: {m['processor']}, {m['cpus']} CPUs, load average "
              f"{m.get('loadavg')}", "- packages: " + ", ".join(f"{k} {x}" for k, x in v.items()),
              "- wall: " + ", ".join(f"L={r['config']['world'].get('steps', 1)} {r['wall_s']:.0f} s "
                                     f"({r['compute']['runs']} runs, {r['compute']['run_wall_sum_s']:.0f} s of run wall)"
                                     for r in results)
              + f"; this invocation {sum(r['wall_s'] for r in results) / 60:.0f} min (cached runs are not run again); the runs "
                f"behind the figures: {sum(r['compute']['runs'] for r in results)} runs, "
                f"{sum(r['compute']['run_wall_sum_s'] for r in results) / 60:.0f} min of run wall, about "
                f"{sum(r['compute']['run_wall_sum_s'] for r in results) / 60 / max(1, results[0]['config'].get('jobs', 1)):.0f} min at "
                f"{results[0]['config'].get('jobs', 1)} at a time (calibration and base evals not counted)",
              "- one run (2 at a time, one torch thread each): " + ", ".join(
                  f"L={r['config']['world'].get('steps', 1)} median {r['compute'].get('run_wall_median_s', 0):.0f} s, "
                  f"max {r['compute'].get('run_wall_max_s', 0):.0f} s" for r in results), ""]
    lines += ["## Bases", "", "| L | hash | source | seen avg | unseen avg | chance (whole chain) | per step: p(right rule) "
              "| follows right / wrong | Delta in band |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for b in r["per_base"]:
            w, c = b["world"], b["calibration"]
            L = w.get("steps", 1)
            if L == 1:
                rp = [c["rule_probs"]["unseen"]]
                dib = [b["properties"]["delta_in_band"]]
            else:
                rp = c["rule_probs"]["unseen"]["steps"]
                dib = [b["properties"][f"delta_in_band_step{j}"] for j in range(1, L + 1)]
            lines.append(f"| {L} | `{b['hash']}` | {'shipped' if b['shipped'] else 'built here'} | "
                         f"{b['base']['seen']['avg']:.3f} | {b['base']['unseen']['avg']:.3f} | "
                         f"{(w['unseen_spread'] / w['rules']) ** L:.3f} | "
                         + " / ".join(f"{x['p_right_rule_plain']:.3f}" for x in rp) + " | "
                         + " / ".join(f"{x['follows_right_guidance']:.2f}, {x['follows_wrong_guidance']:.2f}" for x in rp)
                         + " | " + " / ".join(f"{x:.2f}" for x in dib) + " |")
    lines += ["", "## Tuning (each L on its own base, run seed 0, by mean training reward over the last half)", ""]
    for r in results:
        t = r["tuning"]
        untuned = "" if r["config"].get("tune", True) else "not tuned (every method at the config's settings): "
        lines.append(f"- L={r['config']['world'].get('steps', 1)}: {untuned}" + ", ".join(
            f"{o} lr {x['lr']:g}" + (f" G {x['group_size']}" if o == "grpo" else "")
            + (f" KL T {x.get('opsd_temperature') or r['config']['temperature']}"
               if o == "opsd" else "") for o, x in t.items()
            if isinstance(x, dict) and "lr" in x and o in r["config"]["objectives"]))
    lines += ["", "| L | objective | lr | training reward, last half |", "|---|---|---|---|"]
    for r in results:
        for t in r["tuning"].get("sweep", []):
            extra = (f" G {t['group_size']}" if t["objective"] == "grpo" else "") + (
                f" KL T {t['opsd_temperature']}" if t.get("opsd_temperature") is not None else "")
            lines.append(f"| {r['config']['world'].get('steps', 1)} | {t['objective']} | {t['lr']:g}{extra} | "
                         f"{t['reward_last_half']:.3f} |")
    cells: dict[tuple, dict] = {}
    Ls = []
    for r in results:
        L = r["config"]["world"].get("steps", 1)
        Ls.append(L)
        for b in r["per_base"][:1]:
            for t in b["table"]:
                cells[(t["objective"], t["p"], t["level"], L)] = t | {"base": b["base"]}
    keys = list(dict.fromkeys((o, p, lv) for (o, p, lv, _) in cells))
    f = lambda t: "-" if t is None else (f"{t['unseen_avg'][0]:.3f} "  # noqa: E731
                                         + (f"± {t['unseen_avg'][1]:.3f} " if t.get("seeds", 2) > 1 else "(1 seed) ")
                                         + f"({t['gain_unseen_avg']:+.3f})")
    lines += ["", "## Held-out unseen accuracy (avg@n, mean ± std over seeds; gain over the base in brackets)", "",
              "| method | bank p | skills | " + " | ".join(f"L = {L}" for L in Ls) + " |", "|---|---|---|" + "---|" * len(Ls)]
    base_row = " | ".join(f"{cells[next(k for k in cells if k[3] == L)]['base']['unseen']['avg']:.3f}"
                          if any(k[3] == L for k in cells) else "-" for L in Ls)
    lines.append(f"| base | - | - | {base_row} |")
    for o, p, lv in keys:
        lines.append(f"| {o} | {'-' if p is None else p} | {lv or '-'} | "
                     + " | ".join(f(cells.get((o, p, lv, L))) for L in Ls) + " |")
    lvl = results[0]["config"]["calibrated_level"]

    def ua(o, p, lv, L):
        t = cells.get((o, p, lv, L))
        return None if t is None else t["unseen_avg"][0]

    def gain(o, p, lv, L):
        t = cells.get((o, p, lv, L))
        return None if t is None else t["gain_unseen_avg"]

    def fmt(x, pct=False):
        return "-" if x is None else (f"{x:.0%}" if pct else f"{x:+.3f}")

    lines += ["", "## The questions", "", "Differences of held-out unseen avg@n (seed means); the share of the p = 0 gain kept "
              "at p = 0.5 (\"-\" where the p = 0 gain is under 2 points).", "",
              "| L | SGSD - GRPO (p = 0, full) | SGSD - OPSD | SGSD keeps at p = 0.5 | imitate keeps "
              "at p = 0.5 | SGSD first-step skills - full (p = 0) |", "|---|---|---|---|---|---|"]
    for L in Ls:
        s0, s5 = gain("sgsd", 0.0, lvl, L), gain("sgsd", 0.5, lvl, L)
        i0, i5 = gain("imitate", 0.0, lvl, L), gain("imitate", 0.5, lvl, L)
        d = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        # the share of a gain kept at p = 0.5, for a gain of at least 2 points at p = 0 (smaller: nothing to keep)
        keep = lambda a, b: None if a is None or b is None or a < 0.02 else b / a  # noqa: E731
        lines.append(f"| {L} | {fmt(d(ua('sgsd', 0.0, lvl, L), ua('grpo', None, None, L)))} | "
                     f"{fmt(d(ua('sgsd', 0.0, lvl, L), ua('opsd', None, None, L)))} | {fmt(keep(s0, s5), True)} | "
                     f"{fmt(keep(i0, i5), True)} | {fmt(d(ua('sgsd', 0.0, f'{lvl}/first', L), ua('sgsd', 0.0, lvl, L)))} |")
    multi = [L for L in Ls if L > 1]
    if multi:
        base_steps = {r["config"]["world"].get("steps", 1): r["per_base"][0].get("base_steps")
                      for r in results if r["per_base"]}
        g = lambda t: "-" if t is None or not t.get("unseen_steps") else (  # noqa: E731
            " / ".join(f"{x:.3f}" for x in t["unseen_steps"])
            + f" (mean {statistics.fmean(t['unseen_steps']):.3f}"
            + (f" ± {statistics.stdev(t['unseen_steps_by_seed']):.3f}" if len(t["unseen_steps_by_seed"]) > 1 else "")
            + ")")
        lines += ["", "## Held-out unseen, step by step: p(right rule at step j) (the dense view)", "",
                  "The share of the final avg@n completions whose step j names the family's rule at j (step 1 / step 2 "
                  "/ ...; the mean over steps ± its std over seeds). Chance is 1/R at every step.", "",
                  "| method | bank p | skills | " + " | ".join(f"L = {L}" for L in multi) + " |",
                  "|---|---|---|" + "---|" * len(multi),
                  "| base | - | - | " + " | ".join(" / ".join(f"{x:.3f}" for x in base_steps[L]) if base_steps.get(L)
                                                  else "-" for L in multi) + " |"]
        for o, p, lv in keys:
            lines.append(f"| {o} | {'-' if p is None else p} | {lv or '-'} | "
                         + " | ".join(g(cells.get((o, p, lv, L))) for L in multi) + " |")

    def paired(a, b, L, field):
        d = paired_differences(cells.get((*a, L)), cells.get((*b, L)), field)
        if not d:
            return "-"
        return f"{statistics.fmean(d):+.3f}" + (f" ± {statistics.stdev(d):.3f} ({len(d)} seeds)" if len(d) > 1 else
                                                " (1 seed)")

    sg, gr = ("sgsd", 0.0, lvl), ("grpo", None, None)
    lines += ["", "## SGSD's margin, seed by seed (mean ± std over seeds of the paired difference)", "",
              "| L | SGSD - GRPO, whole chain | SGSD - GRPO, per-step mean | SGSD first-step - full skills, whole chain "
              "| first-step - full, per-step mean | SGSD p = 0.5 - p = 0, whole chain |", "|---|---|---|---|---|---|"]
    for L in Ls:
        lines.append(f"| {L} | {paired(sg, gr, L, 'by_seed')} | {paired(sg, gr, L, 'unseen_steps_by_seed')} | "
                     f"{paired(('sgsd', 0.0, f'{lvl}/first'), sg, L, 'by_seed')} | "
                     f"{paired(('sgsd', 0.0, f'{lvl}/first'), sg, L, 'unseen_steps_by_seed')} | "
                     f"{paired(('sgsd', 0.5, lvl), sg, L, 'by_seed')} |")
    lines += ["", "## Learning curves against generated rollouts (held-out unseen avg@eval_n, seed mean)", ""]
    for r in results:
        L = r["config"]["world"].get("steps", 1)
        runs = r["per_base"][0]["runs"] if r["per_base"] else []
        groups: dict[str, list[dict]] = {}
        for x in runs:
            groups.setdefault(x["objective"] + ("" if x["p"] is None else f" p={x['p']} {_level_label(x)}"), []).append(x)
        if not groups:
            continue
        xs = next(iter(groups.values()))[0]["curve"]["rollouts"]
        lines += [f"L = {L}:", "", "| method | " + " | ".join(str(x) for x in xs) + " |", "|---|" + "---|" * len(xs)]
        for label, rs in sorted(groups.items()):
            ys = [statistics.fmean(x["curve"]["unseen"][i] for x in rs) if all(
                len(x["curve"]["unseen"]) > i and x["curve"]["unseen"][i] is not None for x in rs) else None
                  for i in range(len(xs))]
            lines.append(f"| {label} | " + " | ".join("-" if y is None else f"{y:.3f}" for y in ys) + " |")
        lines.append("")
    lines += ["", "## Calibration groups at each step's rule token (own-family teachers, calibrated level)", "",
              "| L | bank | step | group | n | mean Delta | in the gate's band | categories |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        L = r["config"]["world"].get("steps", 1)
        for b in r["per_base"][:1]:
            for key, d in b["calibration"]["delta"].items():
                steps = d["steps"] if L > 1 else [{g: d[g] for g in DELTA_GROUPS if g in d}]
                for j, gr in enumerate(steps):
                    for g, x in gr.items():
                        if g == "other_family":
                            continue
                        cats = ", ".join(f"{c} {n}" for c, n in sorted(x["categories"].items()))
                        lines.append(f"| {L} | {key[5:]} | {j + 1} | {g} | {x['n']} | {x['mean']:+.2f} | "
                                     f"{x['in_band']:.2f} | {cats} |")
    copies = copies or {}
    lines += ["", "## Learning curves", ""] + [
        f"- L={r['config']['world'].get('steps', 1)}: `{r['png']}`"
        + (f" (copied to `{copies[r['png']]}`)" if r.get("png") in copies else "") for r in results]
    for r in results:
        for b in r["per_base"][:1]:
            lines += ["", f"## L = {r['config']['world'].get('steps', 1)}: base `{b['hash']}`", "", b["markdown"]]
    return "\n".join(lines) + "\n"
