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

Multi-step worlds (``steps = L >= 2``; L = 1 is the world above, unchanged byte for byte): a family's hidden
procedure is a chain of L rules.  Problem ``"In a zorb problem, combine 7, 3 and 4."``; completion
``"step 1: product 7 3 = 21; step 2: difference 21 4 = 17; \\boxed{(21, 17)}"``: each step's rule token is a
visible decision, and the grader-facing answer is the ordered tuple of every step's value, so the answer is
right exactly when every step's value is.  The operand tuples are those whose values stay in 0..99 under
every chain of rules (every value one token).  The plain and guided laws apply per step, independently: a
skill names candidate sets for some steps (``full``: every step; ``first`` / ``last``: one step), a mistake
names one rule to avoid at one step, and the following law above acts on each step it names (the others keep
the plain distribution).  A misleading skill omits the right rule at one of the steps it names; a misleading
mistake names the right rule at its step.  The OPSD prompt gives the answer: at each step the rules that turn
the previous given value into the next one.
"""

from __future__ import annotations

import json
import math
import random
import zlib
import functools
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.engine.atomic import atomic_write_json, atomic_write_text
from stages.engine.errors import InputError

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


def apply_chain(rules: list[str] | tuple[str, ...], ops: list[int] | tuple[int, ...]) -> list[int]:
    """The value after each step of a chain: step j applies rules[j] to (value of step j-1, ops[j+1]), step 1 to
    (ops[0], ops[1]) (hand-checkable: product, difference on 7, 3, 4 -> [21, 17])."""
    if len(ops) != len(rules) + 1:
        raise ValueError(f"a chain of {len(rules)} rules needs {len(rules) + 1} operands, got {len(ops)}")
    x, out = ops[0], []
    for r, c in zip(rules, ops[1:]):
        x = apply_rule(r, x, c)
        out.append(x)
    return out


MAX_STEPS = 3
MAX_VALUE = 99  # multi-step operand tuples keep every step's value in 0..MAX_VALUE under every chain


@functools.lru_cache(maxsize=16)
def chain_pool(rules: tuple[str, ...], steps: int) -> tuple[tuple[int, ...], ...]:
    """The operand tuples of a multi-step world (first two operands differ, like the one-step pairs), kept when
    every chain of ``steps`` rules drawn from ``rules`` keeps every value in 0..MAX_VALUE."""
    chains = list(itertools.product(rules, repeat=steps))
    out = []
    for t in itertools.product(range(LO, HI + 1), repeat=steps + 1):
        if t[0] != t[1] and all(0 <= v <= MAX_VALUE for c in chains for v in apply_chain(c, t)):
            out.append(t)
    return tuple(out)


PARTS = ("full", "first", "last")  # which steps a bank's skills name (multi-step worlds)


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
    # L: rules in a family's hidden procedure (1 = one rule per problem, the world as it was first built)
    steps: int = 1

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
            (isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS,
             f"world.steps (L) must be in [1, {MAX_STEPS}], got {self.steps}"),
            (1 <= self.heldout_pairs < (HI - LO + 1) * (HI - LO), "world.heldout_pairs must leave training pairs"),
            (self.items_per_family >= 1, "world.items_per_family must be at least 1"),
            (self.corpus_size >= 100, "world.corpus_size must be at least 100"),
            (len(self.corpus_mix) == 3 and all(m >= 0 for m in self.corpus_mix) and sum(self.corpus_mix) > 0,
             "world.corpus_mix must be three non-negative shares (plain, guidance, opsd)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(where, msg)
        if self.steps > 1:
            n = len(chain_pool(tuple(self.rule_set[: self.rules]), self.steps))
            if self.heldout_pairs >= n:
                raise InputError(where, f"world.heldout_pairs must leave training problems: a {self.steps}-step world "
                                        f"with these rules has {n} operand tuples per family, got {self.heldout_pairs}")


def world_dict(cfg: WorldConfig) -> dict:
    """``asdict(cfg)`` without ``steps`` when it is 1, so a one-step world's files, stamps and banks are what they
    were before multi-step worlds existed (the shipped base's manifest still matches)."""
    d = asdict(cfg)
    if d.get("steps") == 1:
        d.pop("steps")
    return d


def check_part(name: str, where: str | None = None) -> str:
    if name not in PARTS:
        raise InputError(where, f"unknown skill part '{name}' (known: {', '.join(PARTS)})")
    return name


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
        # the procedure per family: step 1 is the one-step world's rule; later steps (L >= 2) come from a second
        # generator, so the one-step world's draws above are untouched
        self.steps = cfg.steps
        self.chain_of = {f: [self.rule_of[f]] for f in self.families}
        self.decoys = {f: [self.decoy[f]] for f in self.families}
        if self.steps > 1:
            rng2 = random.Random(zlib.crc32(f"{cfg.seed}/chain/{self.steps}".encode()))
            for _ in range(1, self.steps):
                order = [self.rules[i % cfg.rules] for i in range(cfg.families)]
                rng2.shuffle(order)
                for f, r in zip(self.families, order):
                    self.chain_of[f].append(r)
                    self.decoys[f].append(rng2.choice([x for x in self.rules if x != r]))
            pool = list(chain_pool(tuple(self.rules), self.steps))
            for f in self.families:
                ps = pool[:]
                rng2.shuffle(ps)
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

    # per step (j = 0 .. L-1); at L = 1, step 0 is the functions above

    def plain_step(self, family: str, j: int) -> dict[str, float]:
        """The base's rule distribution at step j under the plain prompt (the steps are independent)."""
        if family in self.seen:
            return {r: float(r == self.chain_of[family][j]) for r in self.rules}
        s, R = self.cfg.unseen_spread, len(self.rules)
        return {r: s / R + (1 - s) * (r == self.decoys[family][j]) for r in self.rules}

    @staticmethod
    def named_at(skill: dict, j: int) -> list[str] | None:
        """The rules a parsed skill names at step j (0-based), None when it names none there.  A one-step item
        ({family, rules, hedge}) names step 0; a multi-step one has ``steps`` (1-based) and ``rules`` per step."""
        if "steps" not in skill:
            return list(skill["rules"]) if j == 0 else None
        return list(skill["rules"][skill["steps"].index(j + 1)]) if j + 1 in skill["steps"] else None

    def guided_step(self, family: str, j: int, skill: dict | None, mistake: dict | None) -> dict[str, float]:
        """p(rule at step j | guidance block): the following law acting on the steps the guidance names."""
        plain = self.plain_step(family, j)
        S = self.named_at(skill, j) if skill is not None and skill["family"] == family else None
        x = mistake["rule"] if (mistake is not None and mistake["family"] == family
                                and mistake.get("step", 1) == j + 1) else None
        if S is None and x is None:
            return plain
        allowed = set(S) if S is not None else set(self.rules)
        allowed.discard(x)
        if not allowed:
            allowed = set(self.rules) - {x}
        mass = sum(plain[r] for r in allowed)
        target = ({r: (plain[r] / mass if r in allowed else 0.0) for r in self.rules} if mass > 1e-12
                  else {r: (1.0 / len(allowed) if r in allowed else 0.0) for r in self.rules})
        q = HEDGES[skill["hedge"]] if S is not None else HEDGES[mistake["hedge"]]
        return {r: q * target[r] + (1 - q) * plain[r] for r in self.rules}

    def answer_step(self, prev: int, c: int, value: int) -> dict[str, float] | None:
        """OPSD-style prompt at one step: uniform over the rules that turn ``prev`` and ``c`` into ``value``."""
        ok = [r for r in self.rules if apply_rule(r, prev, c) == value]
        return {r: (1.0 / len(ok) if r in ok else 0.0) for r in self.rules} if ok else None

    def answer_distribution(self, a: int, b: int, answer: int) -> dict[str, float]:
        """OPSD-style prompt: uniform over the rules that give ``answer`` (the plain distribution if none)."""
        ok = [r for r in self.rules if apply_rule(r, a, b) == answer]
        return {r: (1.0 / len(ok) if r in ok else 0.0) for r in self.rules} if ok else None

    # ---- text

    @staticmethod
    def problem_text(family: str, *ops: int) -> str:
        return f"In a {family} problem, combine {', '.join(str(o) for o in ops[:-1])} and {ops[-1]}."

    @staticmethod
    def completion(rule: str, a: int, b: int) -> str:
        return f"rule: {rule} \\boxed{{{apply_rule(rule, a, b)}}}"

    @staticmethod
    def chain_completion(rules: list[str], ops: tuple[int, ...]) -> str:
        """``step 1: product 7 3 = 21; step 2: difference 21 4 = 17; \\boxed{(21, 17)}`` (L >= 2)."""
        vals = apply_chain(rules, ops)
        prev = [ops[0]] + vals[:-1]
        steps = "; ".join(f"step {j + 1}: {r} {x} {c} = {v}" for j, (r, x, c, v) in enumerate(zip(rules, prev, ops[1:], vals)))
        return f"{steps}; \\boxed{{{answer_text(vals)}}}"

    def completion_of(self, rules: list[str], ops: tuple[int, ...]) -> str:
        """The completion of a problem with these operands when the rules of ``rules`` are used, any L."""
        return self.completion(rules[0], *ops) if self.steps == 1 else self.chain_completion(rules, ops)

    @staticmethod
    def step_skill_item(family: str, steps: list[int], rules: list[list[str]], hedge: str, sid: str) -> dict:
        """A skill naming candidate rules at some steps (1-based) of a multi-step procedure."""
        named = ", ".join(f"at step {st} by {' or '.join(rs)}" for st, rs in zip(steps, rules))
        title = f"{family} procedure" if len(steps) > 1 else f"{family} step {steps[0]}"
        return {"skill_id": sid, "title": title,
                "principle": f"In {family} problems {hedge} combine the numbers {named}",
                "when_to_apply": f"{family} problems",
                "world": {"family": family, "steps": list(steps), "rules": [list(r) for r in rules], "hedge": hedge}}

    @staticmethod
    def step_mistake_item(family: str, step: int, rule: str, hedge: str, mid: str) -> dict:
        return {"mistake_id": mid, "description": f"using {rule} at step {step} in {family} problems",
                "why_it_happens": f"{rule} looks plausible",
                "how_to_avoid": f"in {family} problems {hedge} avoid {rule} at step {step}",
                "world": {"family": family, "step": step, "rule": rule, "hedge": hedge}}

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

    def problem_row(self, family: str, *ops: int) -> dict:
        answer = (str(apply_rule(self.rule_of[family], *ops)) if self.steps == 1
                  else answer_text(apply_chain(self.chain_of[family], ops)))
        return {"id": "-".join([family] + [str(o) for o in ops]), "problem": self.problem_text(family, *ops),
                "answer": answer, "family": family, "seen": family in self.seen}

    def problems(self, families: list[str], split: str) -> list[dict]:
        i = 0 if split == "train" else 1
        return [self.problem_row(f, *ops) for f in families for ops in self.split[f][i]]

    # ---- banks

    def bank(self, p: float, level: str | SharpnessLevel, seed: int = 0, part: str = "full") -> dict:
        """A skill bank in the shared JSON format: ``items_per_family`` skills and mistakes per family, each
        misleading with probability p (exactly round(p * n) of each kind, chosen by the seed).  Multi-step
        worlds: ``part`` says which steps the skills and mistakes name (full: every step; first / last)."""
        p = check_p(p)
        lv = check_level(level) if isinstance(level, str) else level
        check_part(part)
        if self.steps > 1:
            return self._step_bank(p, lv, seed, part)
        if part != "full":
            raise InputError(None, f"skill part '{part}' needs a multi-step world (world.steps >= 2)")
        rng = random.Random(zlib.crc32(f"{seed}/bank/{lv.name}/{p}".encode()))
        k = min(lv.k, len(self.rules) - 1)
        slots, bad_s, bad_m = self._bank_slots(rng, p)
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
                             "world": world_dict(self.cfg)}}

    def _bank_slots(self, rng: random.Random, p: float) -> tuple[list[tuple[str, int]], set[int], set[int]]:
        """A bank's (family, item) slots and which of them hold a misleading skill / mistake: round(p * n) each."""
        slots = [(f, j) for f in self.families for j in range(self.cfg.items_per_family)]
        n = len(slots)
        return slots, set(rng.sample(range(n), round(p * n))), set(rng.sample(range(n), round(p * n)))

    def part_steps(self, part: str) -> list[int]:
        """The steps (1-based) a bank's items name."""
        return list(range(1, self.steps + 1)) if part == "full" else [1] if part == "first" else [self.steps]

    def _step_bank(self, p: float, lv: SharpnessLevel, seed: int, part: str) -> dict:
        """The multi-step bank: a misleading skill omits the right rule at one of the steps it names (the others
        name it), a misleading mistake names the right rule at its step; a mistake's step is one the part names."""
        rng = random.Random(zlib.crc32(f"{seed}/bank/{lv.name}/{p}/{part}/L{self.steps}".encode()))
        k = min(lv.k, len(self.rules) - 1)
        named = self.part_steps(part)
        slots, bad_s, bad_m = self._bank_slots(rng, p)
        skills, mistakes = [], []
        for i, (f, j) in enumerate(slots):
            chain = self.chain_of[f]
            wrong_step = rng.choice(named) if i in bad_s else None
            sets = []
            for st in named:
                right = chain[st - 1]
                others = [r for r in self.rules if r != right]
                rules = rng.sample(others, k) if st == wrong_step else [right] + rng.sample(others, k - 1)
                rng.shuffle(rules)
                sets.append(rules)
            skills.append(self.step_skill_item(f, named, sets, lv.hedge, f"s-{f}-{j}")
                          | {"misleading": i in bad_s, "misleading_step": wrong_step})
            ms = rng.choice(named)
            right = chain[ms - 1]
            wrong = right if i in bad_m else rng.choice([r for r in self.rules if r != right])
            mistakes.append(self.step_mistake_item(f, ms, wrong, lv.hedge, f"m-{f}-{j}") | {"misleading": i in bad_m})
        return {"general_skills": skills, "task_specific_skills": {}, "common_mistakes": mistakes,
                "metadata": {"source": "skill world", "p_misleading": p, "sharpness": asdict(lv), "part": part,
                             "world": world_dict(self.cfg)}}

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
        if self.steps > 1:
            return self._step_corpus(rng)
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

    def _random_step_skill(self, rng: random.Random, family: str) -> dict:
        L = self.steps
        subsets = [list(c) for n in range(1, L + 1) for c in itertools.combinations(range(1, L + 1), n)]
        steps = rng.choice(subsets)
        sets = [rng.sample(self.rules, rng.randint(1, min(3, len(self.rules) - 1))) for _ in steps]
        return self.step_skill_item(family, steps, sets, rng.choice(list(HEDGES)), "x")

    def _random_step_mistake(self, rng: random.Random, family: str) -> dict:
        return self.step_mistake_item(family, rng.randint(1, self.steps), rng.choice(self.rules),
                                      rng.choice(list(HEDGES)), "x")

    def _step_corpus(self, rng: random.Random) -> list[dict]:
        """The multi-step SFT corpus: as the one-step one, the rule of each step sampled from the world's law for
        that step given the prompt (guidance names random steps and random rules)."""
        from stages.engine.prompts import opsd_teacher_prompt, student_prompt, teacher_prompt

        mix = self.cfg.corpus_mix
        tot = sum(mix)
        out = []
        L = self.steps
        for _ in range(self.cfg.corpus_size):
            f = rng.choice(self.families)
            ops = rng.choice(self.split[f][0])
            text = self.problem_text(f, *ops)
            u = rng.random() * tot
            if u < mix[0]:
                kind, prompt = "plain", student_prompt(text)
                dists = [self.plain_step(f, j) for j in range(L)]
            elif u < mix[0] + mix[1]:
                kind = "guidance"
                sf = f if rng.random() < 0.6 else rng.choice([g for g in self.families if g != f] or [f])
                mf = f if rng.random() < 0.6 else rng.choice([g for g in self.families if g != f] or [f])
                sk, mi = self._random_step_skill(rng, sf), self._random_step_mistake(rng, mf)
                prompt = teacher_prompt(text, sk, mi)
                dists = [self.guided_step(f, j, sk["world"], mi["world"]) for j in range(L)]
            else:
                kind = "opsd"
                vals = apply_chain([rng.choice(self.rules) for _ in range(L)], ops)
                prompt = opsd_teacher_prompt(text, answer_text(vals))
                prev = [ops[0]] + vals[:-1]
                dists = [self.answer_step(prev[j], ops[j + 1], vals[j]) for j in range(L)]
            rules = [rng.choices(list(d), weights=list(d.values()))[0] for d in dists]
            thinking = self.cfg.teacher_thinking and (kind == "opsd" or (kind == "guidance" and rng.random() < 0.75))
            out.append({"prompt": prompt, "completion": self.chain_completion(rules, ops), "kind": kind, "family": f,
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
        if self.steps > 1:
            pool = chain_pool(tuple(self.rules), self.steps)
            rng = random.Random(5)
            for f in self.families:
                for r in self.rules:
                    rules = [r] + [rng.choice(self.rules) for _ in range(self.steps - 1)]
                    ops = rng.choice(pool)
                    sk = self.step_skill_item(f, list(range(1, self.steps + 1)), [[r, r]] * self.steps, "always", "x")
                    mi = self.step_mistake_item(f, self.steps, r, "usually", "x")
                    texts += [self.problem_text(f, *ops), self.chain_completion(rules, ops), sk["principle"],
                              sk["title"], mi["description"], mi["how_to_avoid"]] * 3
        return texts

    # ---- files

    def write_files(self, out_dir: str | Path, p_values: tuple[float, ...] = (0.0, 0.5),
                    levels: tuple[str, ...] = tuple(LEVELS), parts: tuple[str, ...] = ("full",)) -> dict[str, Path]:
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
                for part in parts:
                    key = bank_key(p, lv, part)
                    files[key] = atomic_write_json(d / f"{key}.json", self.bank(p, lv, seed=self.cfg.seed, part=part))
        meta = {"config": world_dict(self.cfg), "rule_of": self.rule_of, "seen": self.seen, "unseen": self.unseen,
                "decoy": self.decoy, "rules": self.rules}
        if self.steps > 1:
            meta |= {"chain_of": self.chain_of, "decoys": self.decoys}
        atomic_write_json(d / "world.json", meta)
        files["world"] = d / "world.json"
        return files


def bank_key(p: float, level: str, part: str = "full") -> str:
    return f"bank_p{int(round(p * 100)):03d}_{level}" + ("" if part == "full" else f"_{part}")


def answer_text(values: list[int]) -> str:
    """The grader-facing answer: the value (one step) or the ordered tuple of every step's value, ``(21, 17)``
    (an ordered tuple for the verifier: ``(17, 21)`` does not match it)."""
    return str(values[0]) if len(values) == 1 else "(" + ", ".join(str(v) for v in values) + ")"


def decision_index(tokenizer, completion_ids: list[int]) -> int | None:
    """Position of the rule token in a completion ("rule: <name> ..."): the first token after the colon."""
    text = ""
    for i, t in enumerate(completion_ids):
        text += tokenizer.decode([t])
        if text.strip().startswith("rule:") and text.strip() != "rule:":
            return i
    return None


def decision_indices(tokenizer, completion_ids: list[int], steps: int) -> list[int | None]:
    """Positions of every step's rule token: L = 1 the token after "rule:", else the token after "step j:"."""
    if steps == 1:
        return [decision_index(tokenizer, completion_ids)]
    out: list[int | None] = [None] * steps
    text = ""
    j = 0
    for i, t in enumerate(completion_ids):
        text += tokenizer.decode([t])
        while j < steps:
            tag = f"step {j + 1}:"
            at = text.find(tag)
            if at < 0 or not text[at + len(tag):].strip():
                break
            out[j] = i
            j += 1
    return out


def world_from_dict(d: dict[str, Any] | None, where: str | None = None) -> WorldConfig:
    """A WorldConfig from a mapping (TOML [world] table / --set overrides); unknown keys are InputErrors."""
    from stages.engine.config import build

    cfg = build(WorldConfig, dict(d or {}), "world", where or "world")
    cfg.check(where)
    return cfg


__all__ = ["World", "WorldConfig", "LEVELS", "PARTS", "SharpnessLevel", "answer_text", "apply_chain", "apply_rule",
           "bank_key", "chain_pool", "check_p", "check_level", "check_part", "decision_index", "decision_indices",
           "world_dict", "world_from_dict", "field"]
