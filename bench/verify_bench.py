"""Benchmark the answer verifier (stages/engine/verify.py) against naive in-process math-verify.

Builds N mixed, realistic completions from the real data files (../shared/data relative to the repo:
math500.jsonl, train.jsonl, aime24.jsonl rows that carry a `solution`):

- correct: the problem's own reference solution (ends in \\boxed{answer}, or AIME-style \\textbf{(051)});
- correct, reformatted: the solution with its final answer rewritten in an equivalent form (\\dfrac, decimals,
  "x = ...", extra spaces/\\left(, degrees, leading zeros, "Answer: ..." line instead of a box);
- wrong: the solution with a perturbed final answer, or another problem's solution;
- no answer: the solution cut before its final box (a truncated generation).

Then it grades them (a) naively: math_verify parse(gold) + parse(completion) + verify per pair in-process, on a
subset; (b) with stages.engine.verify.Verifier(workers=W).grade_many (hard timeout on). The last line printed is one JSON
object with both figures and the ratio.

    python bench/verify_bench.py [--n 2000] [--workers 2] [--naive-n 300] [--timeout 5] [--hang 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.engine.verify import Verifier, extract_answer  # noqa: E402

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("SGSD_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_rows(d: Path) -> list[dict]:
    rows = []
    for name in ("math500.jsonl", "train.jsonl", "aime24.jsonl"):
        p = d / name
        if not p.exists():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("solution") and r.get("answer"):
                    rows.append(r)
    if not rows:
        raise SystemExit(f"no rows with solutions under {d}")
    return rows


def last_box_span(text: str) -> tuple[int, int] | None:
    """(start of `\\boxed`, end after its closing brace) of the last terminated \\boxed{...}."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j >= len(text) or text[j] != "{":
            continue
        depth, i = 0, j
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return m.start(), i + 1
            i += 1
    return None


def with_answer(solution: str, ans: str) -> str:
    """The solution with its final boxed answer replaced by `ans` (appended if it has no box)."""
    span = last_box_span(solution)
    if span is None:
        return solution.rstrip() + f"\n\nThe final answer is $\\boxed{{{ans}}}$."
    a, b = span
    return solution[:a] + "\\boxed{" + ans + "}" + solution[b:]


def body(solution: str) -> str:
    span = last_box_span(solution)
    return solution if span is None else solution[: span[0]]


_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")


def equivalent_form(ans: str, rng: random.Random) -> str:
    a = ans.strip()
    m = _FRAC_RE.match(a)
    if m:
        sign, p, q = m.groups()
        opts = [f"{sign}\\dfrac{{{p}}}{{{q}}}", f"{sign}{p}/{q}"]
        val = int(p) / int(q)
        if int(q) in (2, 4, 5, 8, 10, 20, 25, 40, 50, 100):
            opts.append(f"{'-' if sign else ''}{val:g}")
        return rng.choice(opts)
    if re.fullmatch(r"-?\d+", a):
        return rng.choice([f"x = {a}", f"{a}.", f"0{a}" if not a.startswith("-") else a, f"{a}\\text{{ ways}}",
                           f"\\mathbf{{{a}}}", f"{int(a):,}" if abs(int(a)) >= 1000 else f"{a}^\\circ"])
    if a.startswith("(") and a.endswith(")"):
        return "\\left" + a[:-1] + " \\right)"
    if "\\frac" in a:
        return a.replace("\\frac", "\\dfrac")
    return rng.choice([f"x={a}", a.replace(" ", ""), "{" + a + "}", f"\\text{{ }}{a}"])


def perturb(ans: str, rng: random.Random, other: str) -> str:
    a = ans.strip()
    if re.fullmatch(r"-?\d+", a):
        k = int(a) + rng.choice([-10, -2, -1, 1, 2, 3, 10, 100])
        return str(k)
    m = re.search(r"\d+", a)
    if m and rng.random() < 0.7:
        d = int(m.group(0)) + rng.choice([1, 2, 3])
        return a[: m.start()] + str(d) + a[m.end():]
    return other


def build(rows: list[dict], n: int, seed: int, n_hang: int) -> list[tuple[str, str, str]]:
    """[(kind, completion, gold)] mixing correct / reformatted / wrong / no-answer completions."""
    rng = random.Random(seed)
    out = []
    kinds = ["correct"] * 35 + ["reformatted"] * 15 + ["perturbed"] * 25 + ["other_solution"] * 10 \
        + ["truncated"] * 10 + ["answer_line"] * 5
    for _ in range(n - n_hang):
        r = rng.choice(rows)
        gold, sol = r["answer"], r["solution"]
        kind = rng.choice(kinds)
        if kind == "correct":
            comp = sol if extract_answer(sol) is not None else with_answer(sol, gold)
        elif kind == "reformatted":
            comp = with_answer(sol, equivalent_form(gold, rng))
        elif kind == "perturbed":
            comp = with_answer(sol, perturb(gold, rng, rng.choice(rows)["answer"]))
        elif kind == "other_solution":
            comp = rng.choice(rows)["solution"]
        elif kind == "truncated":
            b = body(sol)
            comp = b[: max(1, int(len(b) * rng.uniform(0.5, 1.0)))]
        else:  # answer_line
            ans = gold if rng.random() < 0.6 else perturb(gold, rng, rng.choice(rows)["answer"])
            comp = body(sol).rstrip() + f"\n\n**Answer:** ${ans}$"
        out.append((kind, comp, gold))
    for _ in range(n_hang):
        out.append(("hang", "So the answer is $\\boxed{9^{9^{9^{9^{9}}}}}$.", "1"))
    rng.shuffle(out)
    return out


def _cpu_with_children() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def naive_grade(items: list[tuple[str, str, str]]) -> tuple[list[bool], float, float]:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    t0, c0 = time.perf_counter(), time.process_time()
    res = []
    for _, comp, gold in items:
        g = parse("$" + gold + "$")
        p = parse(comp)
        res.append(bool(verify(g, p)))
    return res, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of completions (default 2000)")
    ap.add_argument("--workers", type=int, default=2, help="verifier pool workers (default 2)")
    ap.add_argument("--naive-n", type=int, default=300, help="subset size for the naive baseline (default 300)")
    ap.add_argument("--timeout", type=float, default=5.0, help="hard per-item timeout, seconds (default 5)")
    ap.add_argument("--hang", type=int, default=0, help="add this many sympy-hanging completions (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="data folder (default ../shared/data or $SGSD_SHARED_DATA)")
    ap.add_argument("--show-disagreements", type=int, default=0, help="print up to this many naive/ours disagreements")
    args = ap.parse_args(argv)

    rows = load_rows(data_dir(args.data))
    items = build(rows, args.n, args.seed, args.hang)
    kinds = collections.Counter(k for k, _, _ in items)
    print(f"built {len(items)} completions from {len(rows)} solved problems: {dict(kinds)}", flush=True)

    # (b) ours, cold: a fresh Verifier (pool start and math-verify import included). CPU time of this process and
    # its (joined) pool workers is measured too: on a shared machine wall-clock rates depend on the neighbours.
    pairs = [(c, g) for _, c, g in items]
    cpu0 = _cpu_with_children()
    with Verifier(workers=args.workers, timeout_s=args.timeout) as v:
        t0 = time.perf_counter()
        grades = v.grade_many(pairs)
        t_cold = time.perf_counter() - t0
        path_stats = dict(v.path_stats)
    cpu_cold = _cpu_with_children() - cpu0
    # warm: the same pool grading a second, different batch (new completions, same problems), as in an RL loop
    items2 = build(rows, args.n, args.seed + 100, args.hang)
    with Verifier(workers=args.workers, timeout_s=args.timeout) as v:
        v.grade_many(pairs)
        t0 = time.perf_counter()
        v.grade_many([(c, g) for _, c, g in items2])
        t_warm = time.perf_counter() - t0
    status = collections.Counter(g.status for g in grades)
    acc_by_kind = collections.defaultdict(list)
    for (k, _, _), g in zip(items, grades):
        acc_by_kind[k].append(g.correct)
    ours_cold = len(items) / t_cold
    ours_warm = len(items) / t_warm
    print(f"ours  (grade_many, {args.workers} workers, timeout {args.timeout:g}s): {len(items)} in {t_cold:.2f}s cold "
          f"= {ours_cold:.0f} ans/s ({len(items) / cpu_cold:.0f} ans per CPU-s); warm pool, next batch: "
          f"{t_warm:.2f}s = {ours_warm:.0f} ans/s", flush=True)
    print(f"      statuses {dict(status)}; settled: {path_stats}")
    print("      fraction correct by kind: "
          + ", ".join(f"{k}={sum(v_) / len(v_):.2f}" for k, v_ in sorted(acc_by_kind.items())))

    # (a) naive: in-process math-verify, on a subset (no hanging items: it has no hard timeout off the main thread)
    rng = random.Random(args.seed + 1)
    subset_idx = [i for i, (k, _, _) in enumerate(items) if k != "hang"]
    subset_idx = sorted(rng.sample(subset_idx, min(args.naive_n, len(subset_idx))))
    subset = [items[i] for i in subset_idx]
    naive_res, t_naive, cpu_naive = naive_grade(subset)
    naive = len(subset) / t_naive
    print(f"naive (parse+parse+verify in-process, 1 core): {len(subset)} in {t_naive:.2f}s = {naive:.0f} ans/s "
          f"({len(subset) / cpu_naive:.0f} ans per CPU-s)", flush=True)

    agree = sum(int(naive_res[j] == grades[i].correct) for j, i in enumerate(subset_idx))
    print(f"agreement naive vs ours on the subset: {agree}/{len(subset)}")
    if args.show_disagreements:
        shown = 0
        for j, i in enumerate(subset_idx):
            if naive_res[j] != grades[i].correct and shown < args.show_disagreements:
                shown += 1
                k, c, g = items[i]
                print(f"  [{k}] gold={g!r} ours={grades[i]} naive={naive_res[j]} tail={c[-160:]!r}")

    print(json.dumps({
        "n": len(items),
        "workers": args.workers,
        "timeout_s": args.timeout,
        "naive_n": len(subset),
        "naive_ans_per_s": round(naive, 1),
        "ours_ans_per_s": round(ours_cold, 1),
        "ours_warm_ans_per_s": round(ours_warm, 1),
        "ratio": round(ours_cold / naive, 2),
        "naive_ans_per_cpu_s": round(len(subset) / cpu_naive, 1),
        "ours_ans_per_cpu_s": round(len(items) / cpu_cold, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "agreement": round(agree / max(1, len(subset)), 4),
        "status": dict(status),
    }))


if __name__ == "__main__":
    main()
