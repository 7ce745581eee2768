"""Benchmark: grading the multi-step skill world's tuple answers (``\\boxed{(21, 17)}``) with the verifier's
integer-tuple fast path against math-verify on every pair (the path every tuple took before it), in one run.

Completions are drawn from the world's own generator (``stages.engine.world``): for each held-out problem of an
L-step world, chains of random rules (a base at chance gets almost every step wrong), written as the world writes
them; the gold is the problem's tuple. (a) naive: math-verify ``parse`` + ``verify`` in-process on every pair;
(b) ``stages.engine.verify.Verifier.grade_many`` (fast path in the parent; the pool only for what it leaves).
Both must give the same verdicts. The last line printed is one JSON object with both figures and the ratio.

    python bench/tuple_grading_bench.py [--steps 2] [--n 1536] [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.engine.verify import Verifier, extract_answer  # noqa: E402
from stages.engine.world import World, WorldConfig  # noqa: E402


def pairs(steps: int, n: int, seed: int) -> list[tuple[str, str]]:
    w = World(WorldConfig(steps=steps))
    rng = random.Random(seed)
    problems = w.problems(w.unseen, "eval")
    out = []
    for i in range(n):
        row = problems[i % len(problems)]
        ops = tuple(int(x) for x in row["id"].split("-")[1:])
        rules = [rng.choice(w.rules) for _ in range(steps)]
        out.append((w.completion_of(rules, ops), row["answer"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="L: steps of the world's procedures (default 2)")
    ap.add_argument("--n", type=int, default=1536, help="completions (default 1536: one eval point, two splits x 96 x 8)")
    ap.add_argument("--workers", type=int, default=2, help="verifier pool workers (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    items = pairs(a.steps, a.n, a.seed)

    from math_verify import parse, verify

    t0 = time.perf_counter()
    naive = []
    for comp, gold in items:
        pred = extract_answer(comp)
        naive.append(bool(pred is not None and verify(parse(f"${gold}$"), parse(f"${pred}$"))))
    t_naive = time.perf_counter() - t0

    with Verifier(workers=a.workers) as v:
        t0 = time.perf_counter()
        ours = [g.correct for g in v.grade_many(items)]
        t_ours = time.perf_counter() - t0
        stats = dict(v.path_stats)
    agree = sum(x == y for x, y in zip(naive, ours))
    print(f"L = {a.steps}: {len(items)} completions, {sum(ours)} right; naive math-verify {t_naive:.2f} s, "
          f"verifier {t_ours:.3f} s (fast path {stats['fast']}, pool {stats['pool']}); verdicts agree on {agree}")
    print(json.dumps({"steps": a.steps, "n": len(items), "right": sum(ours), "naive_s": round(t_naive, 3),
                      "verifier_s": round(t_ours, 4), "ratio": round(t_naive / max(t_ours, 1e-9), 1),
                      "agree": agree, "path_stats": stats}))
    if agree != len(items):
        sys.exit(1)


if __name__ == "__main__":
    main()
