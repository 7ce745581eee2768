"""The skill world: a controlled task family where the quality of the privileged information is known.

docs/SKILL_WORLD.md describes it; this module is its ground truth (no model, no torch).

* Families ``F`` (names that appear in the problem text), rules ``R`` (operations on two integers).  Each
  family has a hidden rule.  The first ``seen`` families are *seen*: the base model knows their rule with a
  plain prompt.  The others are *unseen*: the base spreads over the rules (``unseen_spread`` of its mass
  uniform, the rest on a fixed decoy rule), so its chance of the right rule is ``unseen_spread / R``.
* Problem text ``"In a zorb problem, combine 7 and 3."``; answer the integer; completion
  ``"rule: sum \\boxed{10}"`` -- the rule token is the decision the skills inform.
* Guidance (the real teacher prompt, ``stages.engine.prompts.teacher_prompt``): a skill names a SET of
  ``k`` candidate rules with a hedge word (``always`` = followed with probability 1, ``usually`` = 0.7), a
  mistake names one rule to avoid.  Guidance about another family is ignored.  The world's *following
  law* (:func:`guided_distribution`) is what the SFT corpus teaches the base:

      target = plain(family) restricted to S (own skill) without x (own mistake), renormalised
               (uniform over S minus x when that leaves no mass)
      p(rule | guidance) = q * target + (1 - q) * plain(family)

  So on an unseen family (plain uniform over R) a teacher naming k rules, one of them right, puts
  ``q/k + (1-q)/R`` on the right rule: the *sharpness* of a skill.  Its log-prob gap with the base at
  the rule token of a correct rollout is ``log(R q / k + 1 - q)``; of a rollout that used an excluded or
  unnamed rule it is ``log(1 - q)``.
* OPSD-style prompt (the answer is given): the rule is uniform over the rules that give that answer.
* A bank (shared JSON format) has ``items_per_family`` skills and mistakes per family; a fraction ``p``
  of them misleads (a skill whose set omits the right rule, a mistake that names the right rule).
"""

from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.engine.io import InputError, atomic_write_json, atomic_write_text

FAMILY_NAMES = ("zorb", "quill", "mantle", "fizz", "drome", "kelp", "brisk", "vorn", "plink", "tarn", "glim",
                "sprock", "wisp", "crag", "nub", "yarrow")
RULE_NAMES = ("sum", "difference", "product", "maximum", "minimum", "remainder")
HEDGES = {"always": 1.0, "usually": 0.7}
LO, HI = 2, 9  # operands


def apply_rule(rule: str, a: int, b: int) -> int:
    """The rules of the world (hand-checkable: sum 7,3 -> 10; difference 3,7 -> 4; remainder 7,3 -> 1)."""
    if rule == "sum":
        return a + b
    if rule == "difference":
        return abs(a - b)
    if rule == "product":
        return a * b
    if rule == "maximum":
        return max(a, b)
    if rule == "minimum":
        return min(a, b)
    if rule == "remainder":
        return a % b
    raise ValueError(f"unknown rule '{rule}'")


@dataclass
class SharpnessLevel:
    """How far a guidance block shifts the rule distribution: k named rules, a hedge word."""

    name: str
    k: int
    hedge: str

    @property
    def q(self) -> float:
        return HEDGES[self.hedge]


LEVELS = {
    "sharp": SharpnessLevel("sharp", 1, "always"),
    "medium": SharpnessLevel("medium", 2, "usually"),
    "soft": SharpnessLevel("soft", 3, "usually"),
}


@dataclass
class WorldConfig:
    families: int = 12
    rules: int = 6
    seen: int = 6  # the first `seen` families are known to the base; the rest are unseen
    unseen_spread: float = 1.0  # share of the base's unseen-family mass spread uniformly (rest: a decoy rule)
    heldout_pairs: int = 16  # operand pairs per family kept for evaluation (never in the training pool)
    items_per_family: int = 2  # skills and mistakes per family in a bank
    corpus_size: int = 24000  # SFT examples
    corpus_mix: tuple[float, float, float] = (0.4, 0.45, 0.15)  # plain, guidance, opsd-style
    rule_set: list[str] = field(default_factory=lambda: list(RULE_NAMES))  # the R rules are its first R names
    # chat-template thinking flag of the corpus's teacher (guidance / OPSD) prompts: on, as score-teachers and
    # train score them by default (teacher_thinking = "on", the reference); plain prompts are non-thinking
    teacher_thinking: bool = True
    seed: int = 0

    def check(self, where: str | None = None) -> None:
        bad = [r for r in self.rule_set if r not in RULE_NAMES]
        if bad or len(set(self.rule_set)) != len(self.rule_set):
            raise InputError(where, f"world.rule_set must name distinct rules among {', '.join(RULE_NAMES)}, got {self.rule_set}")
        checks = [
            (self.rules <= len(self.rule_set), f"world.rules (R) = {self.rules} but world.rule_set has {len(self.rule_set)} rules"),
            (2 <= self.rules <= len(RULE_NAMES), f"world.rules (R) must be in [2, {len(RULE_NAMES)}], got {self.rules}"),
            (1 <= self.families <= len(FAMILY_NAMES), f"world.families must be in [1, {len(FAMILY_NAMES)}], got {self.families}"),
            (0 <= self.seen < self.families, f"world.seen must leave at least one unseen family (0 <= seen < families), "
                                             f"got seen={self.seen} of {self.families}"),
            (0.0 < self.unseen_spread <= 1.0, f"world.unseen_spread must be in (0, 1], got {self.unseen_spread}"),
            (1 <= self.heldout_pairs < (HI - LO + 1) * (HI - LO), "world.heldout_pairs must leave training pairs"),
            (self.items_per_family >= 1, "world.items_per_family must be at least 1"),
            (self.corpus_size >= 100, "world.corpus_size must be at least 100"),
            (len(self.corpus_mix) == 3 and all(m >= 0 for m in self.corpus_mix) and sum(self.corpus_mix) > 0,
             "world.corpus_mix must be three non-negative shares (plain, guidance, opsd)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(where, msg)


def check_p(p: float, where: str | None = None) -> float:
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
        raise InputError(where, f"misleading fraction p must be in [0, 1], got {p}")
    return float(p)


def check_level(name: str, where: str | None = None) -> SharpnessLevel:
    if name not in LEVELS:
        raise InputError(where, f"unknown sharpness level '{name}' (known: {', '.join(LEVELS)})")
    return LEVELS[name]


class World:
    """Families, their hidden rules, the base's plain distribution, problems, banks and the SFT corpus."""

    def __init__(self, cfg: WorldConfig):
        cfg.check()
        self.cfg = cfg
        self.rules = list(cfg.rule_set[: cfg.rules])
        self.families = list(FAMILY_NAMES[: cfg.families])
        rng = random.Random(cfg.seed)
        # every rule is used by some family when F >= R: a shuffled cycle over the rules
        order = [self.rules[i % cfg.rules] for i in range(cfg.families)]
        rng.shuffle(order)
        self.rule_of = dict(zip(self.families, order))
        self.seen = self.families[: cfg.seen]
        self.unseen = self.families[cfg.seen:]
        self.decoy = {f: rng.choice([r for r in self.rules if r != self.rule_of[f]]) for f in self.families}
        pairs = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1) if a != b]
        self.split: dict[str, tuple[list, list]] = {}
        for f in self.families:
            ps = pairs[:]
            rng.shuffle(ps)
            self.split[f] = (sorted(ps[cfg.heldout_pairs:]), sorted(ps[: cfg.heldout_pairs]))

    # ---- the base's knowledge and the following law

    def plain(self, family: str) -> dict[str, float]:
        """The base's rule distribution under the plain (student) prompt."""
        if family in self.seen:
            return {r: float(r == self.rule_of[family]) for r in self.rules}
        s, R = self.cfg.unseen_spread, len(self.rules)
        return {r: s / R + (1 - s) * (r == self.decoy[family]) for r in self.rules}

    def guided_distribution(self, family: str, skill: dict | None, mistake: dict | None) -> dict[str, float]:
        """p(rule | guidance block) under the following law (module docstring).  ``skill``/``mistake`` are
        parsed items ({family, rules, hedge} / {family, rule, hedge}) or None."""
        plain = self.plain(family)
        own_s = skill is not None and skill["family"] == family
        own_m = mistake is not None and mistake["family"] == family
        if not (own_s or own_m):
            return plain
        allowed = set(skill["rules"]) if own_s else set(self.rules)
        if own_m:
            allowed.discard(mistake["rule"])
        if not allowed:
            allowed = set(self.rules) - ({mistake["rule"]} if own_m else set())
        mass = sum(plain[r] for r in allowed)
        target = ({r: (plain[r] / mass if r in allowed else 0.0) for r in self.rules} if mass > 1e-12
                  else {r: (1.0 / len(allowed) if r in allowed else 0.0) for r in self.rules})
        q = HEDGES[skill["hedge"]] if own_s else HEDGES[mistake["hedge"]]
        return {r: q * target[r] + (1 - q) * plain[r] for r in self.rules}

    def answer_distribution(self, a: int, b: int, answer: int) -> dict[str, float]:
        """OPSD-style prompt: uniform over the rules that give ``answer`` (the plain distribution if none)."""
        ok = [r for r in self.rules if apply_rule(r, a, b) == answer]
        return {r: (1.0 / len(ok) if r in ok else 0.0) for r in self.rules} if ok else None

    # ---- text

    @staticmethod
    def problem_text(family: str, a: int, b: int) -> str:
        return f"In a {family} problem, combine {a} and {b}."

    @staticmethod
    def completion(rule: str, a: int, b: int) -> str:
        return f"rule: {rule} \\boxed{{{apply_rule(rule, a, b)}}}"

    @staticmethod
    def skill_item(family: str, rules: list[str], hedge: str, sid: str) -> dict:
        named = " or ".join(rules)
        return {"skill_id": sid, "title": f"{family} rule",
                "principle": f"In {family} problems {hedge} combine the numbers by {named}",
                "when_to_apply": f"{family} problems",
                "world": {"family": family, "rules": list(rules), "hedge": hedge}}

    @staticmethod
    def mistake_item(family: str, rule: str, hedge: str, mid: str) -> dict:
        return {"mistake_id": mid, "description": f"using {rule} in {family} problems",
                "why_it_happens": f"{rule} looks plausible",
                "how_to_avoid": f"in {family} problems {hedge} avoid {rule}",
                "world": {"family": family, "rule": rule, "hedge": hedge}}

    def problem_row(self, family: str, a: int, b: int) -> dict:
        return {"id": f"{family}-{a}-{b}", "problem": self.problem_text(family, a, b),
                "answer": str(apply_rule(self.rule_of[family], a, b)), "family": family,
                "seen": family in self.seen}

    def problems(self, families: list[str], split: str) -> list[dict]:
        i = 0 if split == "train" else 1
        return [self.problem_row(f, a, b) for f in families for a, b in self.split[f][i]]

    # ---- banks

    def bank(self, p: float, level: str | SharpnessLevel, seed: int = 0) -> dict:
        """A skill bank in the shared JSON format: ``items_per_family`` skills and mistakes per family, each
        misleading with probability p (exactly round(p * n) of each kind, chosen by the seed)."""
        p = check_p(p)
        lv = check_level(level) if isinstance(level, str) else level
        rng = random.Random(zlib.crc32(f"{seed}/bank/{lv.name}/{p}".encode()))
        k = min(lv.k, len(self.rules) - 1)
        slots = [(f, j) for f in self.families for j in range(self.cfg.items_per_family)]
        n = len(slots)
        bad_s = set(rng.sample(range(n), round(p * n)))
        bad_m = set(rng.sample(range(n), round(p * n)))
        skills, mistakes = [], []
        for i, (f, j) in enumerate(slots):
            right = self.rule_of[f]
            others = [r for r in self.rules if r != right]
            if i in bad_s:
                rules = rng.sample(others, k)
            else:
                rules = [right] + rng.sample(others, k - 1)
            rng.shuffle(rules)
            skills.append(self.skill_item(f, rules, lv.hedge, f"s-{f}-{j}") | {"misleading": i in bad_s})
            wrong = right if i in bad_m else rng.choice(others)
            mistakes.append(self.mistake_item(f, wrong, lv.hedge, f"m-{f}-{j}") | {"misleading": i in bad_m})
        return {"general_skills": skills, "task_specific_skills": {}, "common_mistakes": mistakes,
                "metadata": {"source": "skill world", "p_misleading": p, "sharpness": asdict(lv),
                             "world": asdict(self.cfg)}}

    # ---- the SFT corpus

    def _random_skill(self, rng: random.Random, family: str) -> dict:
        k = rng.randint(1, min(3, len(self.rules) - 1))
        return self.skill_item(family, rng.sample(self.rules, k), rng.choice(list(HEDGES)), "x")

    def _random_mistake(self, rng: random.Random, family: str) -> dict:
        return self.mistake_item(family, rng.choice(self.rules), rng.choice(list(HEDGES)), "x")

    def corpus(self, seed: int | None = None) -> list[dict]:
        """SFT examples {prompt, completion, kind, family}: user-turn texts in the real prompt formats.

        Guidance items name RANDOM rules (never the truth of a family), so the corpus carries no
        information about the unseen families' rules; the rule of each completion is sampled from the
        world's law for that prompt, and the answer is that rule applied to the operands."""
        from stages.engine.prompts import opsd_teacher_prompt, student_prompt, teacher_prompt

        rng = random.Random(self.cfg.seed * 7919 + 1 if seed is None else seed)
        mix = self.cfg.corpus_mix
        tot = sum(mix)
        out = []
        for _ in range(self.cfg.corpus_size):
            f = rng.choice(self.families)
            # training pairs only: the held-out problems never appear in the corpus
            a, b = rng.choice(self.split[f][0])
            u = rng.random() * tot
            if u < mix[0]:
                kind, prompt, dist = "plain", student_prompt(self.problem_text(f, a, b)), self.plain(f)
            elif u < mix[0] + mix[1]:
                kind = "guidance"
                sf = f if rng.random() < 0.6 else rng.choice([g for g in self.families if g != f] or [f])
                mf = f if rng.random() < 0.6 else rng.choice([g for g in self.families if g != f] or [f])
                sk, mi = self._random_skill(rng, sf), self._random_mistake(rng, mf)
                prompt = teacher_prompt(self.problem_text(f, a, b), sk, mi)
                dist = self.guided_distribution(f, sk["world"], mi["world"])
            else:
                kind = "opsd"
                ans = apply_rule(rng.choice(self.rules), a, b)
                prompt = opsd_teacher_prompt(self.problem_text(f, a, b), str(ans))
                dist = self.answer_distribution(a, b, ans)
            rule = rng.choices(list(dist), weights=list(dist.values()))[0]
            # teacher prompts as score-teachers / train present them; guidance also without thinking (a quarter),
            # the form of skills in the eval prompt (base+skills at inference)
            thinking = self.cfg.teacher_thinking and (kind == "opsd" or (kind == "guidance" and rng.random() < 0.75))
            out.append({"prompt": prompt, "completion": self.completion(rule, a, b), "kind": kind, "family": f,
                        "thinking": thinking})
        return out

    def vocabulary_texts(self) -> list[str]:
        """Texts the world's tokenizer is trained on: every word and number the world can produce."""
        from stages.engine.prompts import load_template

        texts = [load_template(n) for n in ("student", "teacher", "opsd_teacher")]
        texts += [" ".join(str(i) for i in range(0, 100))] * 4
        texts += [" ".join(f"\\boxed{{{i}}}" for i in range(0, 100))] * 4  # answers: one token each
        for f in self.families:
            for r in self.rules:
                sk = self.skill_item(f, [r, r], "always", "x")
                mi = self.mistake_item(f, r, "usually", "x")
                texts += [self.problem_text(f, 7, 3), self.completion(r, 7, 3), sk["principle"], sk["title"],
                          sk["when_to_apply"], mi["description"], mi["why_it_happens"], mi["how_to_avoid"]] * 3
        return texts

    # ---- files

    def write_files(self, out_dir: str | Path, p_values: tuple[float, ...] = (0.0, 0.5),
                    levels: tuple[str, ...] = tuple(LEVELS)) -> dict[str, Path]:
        """problems (train pool, held-out seen / unseen), banks per (p, level), the SFT corpus, world.json."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)

        def jsonl(name: str, rows: list[dict]) -> Path:
            return atomic_write_text(d / name, "".join(json.dumps(r) + "\n" for r in rows))

        files = {
            "train": jsonl("train.jsonl", self.problems(self.families, "train")),
            "eval_unseen": jsonl("eval_unseen.jsonl", self.problems(self.unseen, "eval")),
            "eval_seen": jsonl("eval_seen.jsonl", self.problems(self.seen, "eval")),
            "sft": jsonl("sft.jsonl", self.corpus()),
        }
        for p in p_values:
            for lv in levels:
                key = bank_key(p, lv)
                files[key] = atomic_write_json(d / f"{key}.json", self.bank(p, lv, seed=self.cfg.seed))
        atomic_write_json(d / "world.json", {"config": asdict(self.cfg), "rule_of": self.rule_of, "seen": self.seen,
                                             "unseen": self.unseen, "decoy": self.decoy, "rules": self.rules})
        files["world"] = d / "world.json"
        return files


def bank_key(p: float, level: str) -> str:
    return f"bank_p{int(round(p * 100)):03d}_{level}"


def decision_index(tokenizer, completion_ids: list[int]) -> int | None:
    """Position of the rule token in a completion ("rule: <name> ..."): the first token after the colon."""
    text = ""
    for i, t in enumerate(completion_ids):
        text += tokenizer.decode([t])
        if text.strip().startswith("rule:") and text.strip() != "rule:":
            return i
    return None


def world_from_dict(d: dict[str, Any] | None, where: str | None = None) -> WorldConfig:
    """A WorldConfig from a mapping (TOML [world] table / --set overrides); unknown keys are InputErrors."""
    from stages.engine.config import build

    cfg = build(WorldConfig, dict(d or {}), "world", where or "world")
    cfg.check(where)
    return cfg


__all__ = ["World", "WorldConfig", "LEVELS", "SharpnessLevel", "apply_rule", "bank_key", "check_p", "check_level",
           "decision_index", "world_from_dict", "field"]
