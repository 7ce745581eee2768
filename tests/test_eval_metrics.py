"""Eval metrics with hand-computed values: avg@n (+ standard error), unbiased pass@k, maj@n with ties,
format / truncation rates, the macro mean row and the compare table."""

from __future__ import annotations

import itertools
import re
import math

import polars as pl
import pytest

from stages.eval import (
    SUMMARY_SCHEMA,
    bench_metrics,
    choose_step,
    compare_table,
    majority_vote,
    mean_row,
    pass_at_k,
    seed_spread,
    seed_values,
    summarize,
    summarize_seeds,
)
from stages.engine.atomic import write_parquet
from stages.engine.errors import InputError


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of the n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values():
    assert pass_at_k(12, 1, 1) == pytest.approx(1 / 12)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(12, 3, 12) == 1.0
    assert pass_at_k(12, 0, 12) == 0.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize(
    "answers, correct, expected",
    [
        (["1", "1", "2", "2"], [True, True, False, False], 0.5),  # two-way tie, one correct: 1/2
        (["a", "b", "c"], [False, True, False], 1 / 3),  # three-way tie
        (["1", "1", "2", None], [True, True, False, False], 1.0),  # clear majority, correct
        (["2", "2", "3", "1"], [False, False, False, True], 0.0),  # majority wrong, minority right
        ([None, None, None], [False, False, False], 0.0),  # no votes
        ([None, None, "7"], [False, False, True], 1.0),  # unanswered samples do not vote
        (["5", "5", "6", "6", "6"], [True, False, False, False, False], 0.0),  # 3 beats 2
        (["5", "5", "6", "6"], [False, True, False, False], 0.5),  # a group counts as correct if any member is
    ],
)
def test_majority_vote(answers, correct, expected):
    assert majority_vote(answers, correct) == pytest.approx(expected)


def rows_for(problems: dict[str, list[tuple[str | None, bool, str, int]]]) -> pl.DataFrame:
    """problem id -> samples of (extracted answer, correct, finish_reason, tokens)."""
    out = {k: [] for k in ("problem_id", "extracted_answer", "normalized_answer", "correct", "finish_reason",
                           "tokens", "status")}
    for pid, samples in problems.items():
        for ans, ok, fin, tok in samples:
            out["problem_id"].append(pid)
            out["extracted_answer"].append(ans)
            out["normalized_answer"].append(None if ans is None else ans.strip().lower())
            out["correct"].append(ok)
            out["finish_reason"].append(fin)
            out["tokens"].append(tok)
            out["status"].append("no_answer" if ans is None else "ok")
    return pl.DataFrame(out, schema={"problem_id": pl.String, "extracted_answer": pl.String,
                                     "normalized_answer": pl.String, "correct": pl.Boolean,
                                     "finish_reason": pl.String, "tokens": pl.Int64, "status": pl.String})


def test_bench_metrics_hand_computed():
    rows = rows_for({
        # 4/4 correct
        "p1": [("5", True, "stop", 10), ("5", True, "stop", 20), ("5", True, "stop", 30), ("5", True, "stop", 40)],
        # 1/4 correct; majority "3" (wrong) -> maj 0
        "p2": [("3", False, "stop", 10), ("3", False, "stop", 10), ("4", True, "stop", 10), (None, False, "length", 100)],
        # 0/4 correct, two unanswered; tie between "x" and "y", both wrong -> 0
        "p3": [("x", False, "stop", 5), ("y", False, "stop", 5), (None, False, "length", 100), (None, False, "length", 100)],
    })
    m = bench_metrics(rows)
    accs = [1.0, 0.25, 0.0]
    mean = sum(accs) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / 2)
    assert m["n"] == 4 and m["problems"] == 3 and m["samples"] == 12
    assert m["avg_at_n"] == pytest.approx(5 / 12)  # (1 + 0.25 + 0) / 3
    assert m["avg_at_n_se"] == pytest.approx(sd / math.sqrt(3))
    assert m["avg_at_n_se"] == pytest.approx(0.300463, abs=1e-6)  # by hand: sqrt(0.541667 / 2) / sqrt(3)
    assert m["pass_at_1"] == pytest.approx(m["avg_at_n"])
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    assert m["maj_at_n"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx(9 / 12)
    assert m["truncation_rate"] == pytest.approx(3 / 12)
    assert m["mean_tokens"] == pytest.approx((100 + 130 + 210) / 12)
    assert m["timeout_rate"] == 0.0


def test_maj_tie_share_in_bench_metrics():
    rows = rows_for({
        "p1": [("1", True, "stop", 1), ("1", True, "stop", 1), ("2", False, "stop", 1), ("2", False, "stop", 1)],
        "p2": [("A", True, "stop", 1), ("a ", True, "stop", 1), ("b", False, "stop", 1), (None, False, "stop", 1)],
    })
    m = bench_metrics(rows)
    assert m["maj_at_n"] == pytest.approx((0.5 + 1.0) / 2)  # normalised "A" == "a " -> 2 votes beat 1


def test_unequal_sample_counts_are_refused():
    rows = rows_for({"p1": [("1", True, "stop", 1)], "p2": [("1", True, "stop", 1), ("1", True, "stop", 1)]})
    with pytest.raises(ValueError, match="different sample counts"):
        bench_metrics(rows)


def test_mean_row_is_macro_average():
    a = rows_for({f"a{i}": [("1", i < 3, "stop", 10)] * 2 for i in range(10)})  # 3/10 problems right
    b = rows_for({f"b{i}": [("1", i < 1, "stop", 30)] * 2 for i in range(2)})  # 1/2 right
    s = summarize({"a": a, "b": b}, model="m", protocol="quick")
    assert s["bench"].to_list() == ["a", "b", "mean"]
    assert s.schema == pl.Schema(SUMMARY_SCHEMA)
    mean = s.row(2, named=True)
    assert mean["avg_at_n"] == pytest.approx((0.3 + 0.5) / 2)  # not the pooled 4/12
    se_a, se_b = s["avg_at_n_se"][0], s["avg_at_n_se"][1]
    assert mean["avg_at_n_se"] == pytest.approx(math.sqrt(se_a ** 2 + se_b ** 2) / 2)
    assert mean["n"] == 2 and mean["problems"] == 12 and mean["samples"] == 24
    assert mean["mean_tokens"] == pytest.approx(20.0)
    assert mean_row(s.head(2))["avg_at_n"] == pytest.approx(0.4)
    assert summarize({"a": a}, model="m", protocol="quick").height == 1  # one benchmark: no mean row


def _summary(path, values: dict[str, float], n: int = 12):
    rows = [{"bench": b, "n": n, "problems": 30, "samples": 30 * n, **{k: 0.0 for k in
             ("avg_at_n_se", "pass_at_1", "pass_at_n", "maj_at_n", "format_rate", "truncation_rate", "mean_tokens",
              "timeout_rate")}, "avg_at_n": v, "model": "m", "protocol": "paper", "source": ""}
            for b, v in values.items()]
    df = pl.DataFrame(rows, schema=SUMMARY_SCHEMA)
    df = pl.concat([df, pl.DataFrame([mean_row(df)], schema=SUMMARY_SCHEMA)])
    write_parquet(df, path / "eval" / "summary.parquet")


def test_compare_table_with_paper_rows(tmp_path):
    _summary(tmp_path / "A", {"aime24": 0.5, "aime25": 0.4, "hmmt25": 0.3, "math500": 0.9})
    _summary(tmp_path / "B", {"aime25": 0.45}, n=2)
    cols, rows = compare_table([tmp_path / "A", tmp_path / "B"])
    assert cols == ["aime24", "aime25", "hmmt25", "math500", "mean"]
    paper = {label: vals for label, n, vals, kind in rows if kind == "paper"}
    assert list(paper) == ["paper Qwen3-1.7B base", "paper Qwen3-1.7B GRPO", "paper Qwen3-1.7B OPSD",
                           "paper Qwen3-1.7B SGSD"]
    assert paper["paper Qwen3-1.7B SGSD"][:3] == pytest.approx([0.578, 0.436, 0.297])
    assert paper["paper Qwen3-1.7B base"][:3] == pytest.approx([0.511, 0.369, 0.242])
    assert paper["paper Qwen3-1.7B OPSD"][-1] == pytest.approx((0.558 + 0.433 + 0.269) / 3)
    assert paper["paper Qwen3-1.7B GRPO"][3] is None  # the paper has no MATH-500 row here
    runs = [(label, n, vals) for label, n, vals, kind in rows if kind == "run"]
    assert runs[0][1] == 12 and runs[0][2] == pytest.approx([0.5, 0.4, 0.3, 0.9, 0.4])  # mean over the paper's three
    assert runs[1][1] == 2 and runs[1][2][1] == 0.45 and runs[1][2][-1] is None
    cols2, rows2 = compare_table([tmp_path / "A"], metric="avg_at_n", with_paper=False)
    assert cols2 == ["aime24", "aime25", "hmmt25", "math500", "mean"]
    assert rows2[0][2][-1] == pytest.approx(0.525)  # without the paper: mean over every column


# --------------------------------------------------------------------------------------------------
# several sampling seeds, checkpoint choice


def test_seed_spread_and_summary_over_seeds_hand_computed():
    # seed 0: p1 2/2, p2 0/2 -> 0.5;  seed 1: p1 1/2, p2 0/2 -> 0.25;  seed 2: p1 2/2, p2 1/2 -> 0.75
    per = {
        0: {"p1": [("5", True, "stop", 4)] * 2, "p2": [("1", False, "stop", 4)] * 2},
        1: {"p1": [("5", True, "stop", 4), ("6", False, "stop", 4)], "p2": [("1", False, "stop", 4)] * 2},
        2: {"p1": [("5", True, "stop", 4)] * 2, "p2": [("2", True, "stop", 4), ("1", False, "length", 8)]},
    }
    tables = {s: {"b": rows_for(p)} for s, p in per.items()}
    sp = seed_spread([0.5, 0.25, 0.75])
    assert sp["seed_std"] == pytest.approx(0.25)  # sqrt((0 + 0.0625 + 0.0625) / 2)
    assert (sp["seed_min"], sp["seed_max"]) == (0.25, 0.75)
    assert seed_spread([0.4])["seed_std"] is None
    with pytest.raises(ValueError):
        seed_spread([0.1, float("nan")])
    s = summarize_seeds(tables, model="m", protocol="quick")
    assert s.schema == pl.Schema(SUMMARY_SCHEMA)
    r = s.row(0, named=True)
    assert r["seeds"] == 3 and r["n"] == 2 and r["problems"] == 2 and r["samples"] == 12
    assert r["avg_at_n"] == pytest.approx(0.5)
    assert r["seed_std"] == pytest.approx(0.25) and (r["seed_min"], r["seed_max"]) == (0.25, 0.75)
    # se across problems of the accuracy pooled over the 6 samples of each problem: p1 5/6, p2 1/6
    assert r["avg_at_n_se"] == pytest.approx(1 / 3)  # std(5/6, 1/6) = (2/3)/sqrt(2); / sqrt(2 problems)
    assert r["pass_at_n"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # mean over seeds of pass@2
    assert r["truncation_rate"] == pytest.approx((0 + 0 + 0.25) / 3)
    one = summarize({"b": tables[0]["b"]}, model="m", protocol="quick").row(0, named=True)
    assert one["seeds"] == 1 and one["seed_std"] is None and one["seed_min"] == one["seed_max"] == 0.5


def test_summary_over_seeds_mean_row():
    # two benchmarks, two seeds: a = 1.0 then 0.5, b = 0.0 then 0.5 -> seed macro means 0.5 and 0.5
    tables = {
        0: {"a": rows_for({"x": [("1", True, "stop", 1)] * 2}), "b": rows_for({"y": [("1", False, "stop", 1)] * 2})},
        1: {"a": rows_for({"x": [("1", True, "stop", 1), ("2", False, "stop", 1)]}),
            "b": rows_for({"y": [("1", True, "stop", 1), ("2", False, "stop", 1)]})},
    }
    s = summarize_seeds(tables, model="m", protocol="quick")
    assert s["bench"].to_list() == ["a", "b", "mean"]
    a, b, mean = s.rows(named=True)
    assert a["seed_std"] == pytest.approx(math.sqrt(0.125)) and b["seed_std"] == pytest.approx(math.sqrt(0.125))
    assert mean["avg_at_n"] == pytest.approx(0.5) and mean["seed_std"] == pytest.approx(0.0)
    assert (mean["seed_min"], mean["seed_max"]) == (0.5, 0.5)


@pytest.mark.parametrize("spec, seed, want", [
    (None, 7, [7]), ("3", 0, [0, 1, 2]), ("2", 5, [5, 6]), ("0,1,2", 9, [0, 1, 2]), ("4,", 0, [4]),
    (" 10 , 3 ", 0, [10, 3]), (3, 1, [1, 2, 3]),
])
def test_seed_values(spec, seed, want):
    assert seed_values(seed, spec) == want


@pytest.mark.parametrize("spec, msg", [
    ("0", "between 1 and 100"), ("101", "between 1 and 100"), ("a,b", "count N or a comma list"),
    ("x", "count N or a comma list"), ("1,1", "twice"), (",", "count N or a comma list"), ("-1,2", "[0, 2^31)"),
])
def test_seed_values_refused(spec, msg):
    with pytest.raises(InputError, match=re.escape(msg)):
        seed_values(0, spec)


def test_choose_step_rules():
    curve = [(10, 0.30), (20, 0.45), (30, 0.40), (40, 0.45)]
    assert choose_step(curve, "best-avg") == 20  # 20 and 40 tie: the earlier step
    assert choose_step(curve, "last") == 40
    assert choose_step(list(reversed(curve)), "best-avg") == 20  # order of the list does not matter
    assert choose_step([(5, 0.1), (6, 0.1 + 1e-13), (7, 0.0)], "best-avg") == 5  # within the tie tolerance
    assert choose_step([(5, 0.1), (6, 0.1 + 1e-9)], "best-avg") == 6
    with pytest.raises(ValueError, match="not a finite"):
        choose_step([(1, 0.2), (2, float("nan"))], "best-avg")
    with pytest.raises(ValueError, match="twice"):
        choose_step([(1, 0.2), (1, 0.3)], "best-avg")
    with pytest.raises(ValueError, match="unknown selection rule"):
        choose_step(curve, "best-test")
