"""Tests for stages/engine/verify.py: extraction, normalisation, math-verify grading, hard timeout, pool behaviour."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stages.engine import verify as V
from stages.engine.verify import Grade, Verifier, extract_answer, grade, grade_many, normalize_answer

# A power tower: math-verify parses it instantly, then sympy tries to evaluate 9^(9^(9^(9^9))) while comparing
# with the gold and never comes back (checked by hand: still running after 40 s with math-verify's own timeouts
# off). Only the pool's hard timeout stops it.
HANG = "So the answer is $\\boxed{9^{9^{9^{9^{9}}}}}$."
HMMT_GOLD = "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2, timeout_s=5.0) as v:
        assert v.grade("warm up: \\boxed{\\sqrt{8}}", "2\\sqrt{2}").correct  # needs sympy: starts the pool
        assert v._pool is not None
        yield v


def box(s: str) -> str:
    return f"Some reasoning first, $x^2 = 4$.\n\nTherefore the answer is $\\boxed{{{s}}}$."


# ---------------------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    (box("\\frac{1}{\\sqrt{2}}"), "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("first \\boxed{3}, then \\boxed{4}.", "4"),  # last boxed wins
    ("got \\boxed{5} but then \\boxed{6 and the text runs out", "5"),  # unterminated: ignored, earlier one used
    ("\\boxed 5 is it", "5"),  # \boxed followed by a single token
    ("the answer: $\\fbox{12}$", "12"),
    ("set $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{\\boxed{7}}", "7"),
    ("\\boxed{} oops, \\boxed{8}", "8"),
    ("\\boxed{8} and an empty \\boxed{}", "8"),  # an empty box is not an answer
    ("We find it.\nAnswer: 42", "42"),
    ("We find it.\n**Final Answer:** $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Answer:\n\n  17\n", "17"),
    ("Answer: 3\n... and the boxed one wins: \\boxed{4}", "4"),
    ("no answer here, just 42 somewhere", None),
    ("truncated generation \\boxed{\\frac{1}{2", None),  # only an unterminated box
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_linear_on_many_unterminated_boxes():
    text = "\\boxed{" * 20000 + "tail"
    t0 = time.perf_counter()
    assert extract_answer(text) is None
    assert time.perf_counter() - t0 < 2.0


# issue 21: completions that made extraction / normalisation quadratic in the parent process (46 s and 36 s on
# 2 cores before; each is now a few hundredths of a second). The bound is generous: a quadratic pass is >30 s.
HOSTILE = {
    "20k nested brace pairs in a box": ("\\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}", None, "no_answer"),
    "20k nested boxes": ("\\boxed{" * 20000 + "1" + "}" * 20000, "1", "ok"),
    "Answer: and 50k \\(": ("Answer: " + "\\(" * 50000, None, "no_answer"),
    "Answer: and 50k $ then \\[": ("Answer: " + "\\[" * 25000 + "$" * 50000, None, "no_answer"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completions_grade_in_linear_time(name):
    text, pred, status = HOSTILE[name]
    t0 = time.perf_counter()
    assert extract_answer(text) == pred
    normalize_answer(text)
    with Verifier(workers=1, timeout_s=2.0) as v:
        g = v.grade(text, "1")
    assert time.perf_counter() - t0 < 10.0
    assert (g.pred, g.status) == (pred, status)


def test_normalize_strips_every_enclosing_brace_pair():
    assert normalize_answer("{{{52_8}}}") == "52_8"
    assert normalize_answer("{1}{2}") == "{1}{2}"  # not one enclosing pair
    assert normalize_answer("{{1}+{2}}") == "{1}+{2}"
    assert normalize_answer("{" * 30000 + "7" + "}" * 30000) == "7"


def test_answer_length_cap():
    assert extract_answer("\\boxed{" + "1" * V.MAX_ANSWER_CHARS + "}") == "1" * V.MAX_ANSWER_CHARS
    assert extract_answer("\\boxed{" + "1" * (V.MAX_ANSWER_CHARS + 1) + "}") is None
    assert extract_answer("Answer: " + "7" * (V.MAX_ANSWER_CHARS + 1)) is None
    # a multi-box group over the cap against a set gold is no answer either
    many = ", ".join(["\\boxed{" + "9" * 100 + "}"] * 11)
    assert grade_many([(many, "\\{1,2\\}")], timeout_s=5)[0].status == "no_answer"


def _math_segments_regex(s):
    """The regex the linear scanner replaces (quadratic on unclosed delimiters): the reference for short strings."""
    import re

    found = list(re.finditer(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", s, re.DOTALL))
    if not found:
        return None
    return next(g for g in found[-1].groups() if g is not None), found[-1].end()


def _unwrap_box_quadratic(s):
    while True:
        m = V._BOX_RE.match(s)
        if not m:
            return s
        rest = s[m.end():].lstrip()
        if not rest.startswith("{"):
            return s
        off = len(s) - len(rest)
        close = V._brace_matches(s, off).get(off)
        if close is None or close != len(s) - 1:
            return s
        inner = s[off + 1:close].strip()
        if not inner:
            return s
        s = inner


def test_linear_scanners_agree_with_their_reference_on_random_strings():
    import random

    rng = random.Random(21)
    atoms = ["$", "$$", "\\(", "\\)", "\\[", "\\]", "\\", "{", "}", "\\boxed", "\\fbox", " ", "\n", "x", "1", "\\{"]
    for _ in range(4000):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert V._last_math_segment(s) == _math_segments_regex(s), s
        assert V._unwrap_box(s) == _unwrap_box_quadratic(s), s
        for wrapped in ("{" + s + "}", "{{" + s + "}}", "\\boxed{ \\boxed{" + s + "} }"):
            assert V._unwrap_box(wrapped) == _unwrap_box_quadratic(wrapped), wrapped


# ---------------------------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("83^\\circ", "83"),
    ("83^{\\circ}", "83"),
    ("\\text{Evelyn}", "evelyn"),
    ("$5$.", "5"),
    ("1{,}000", "1000"),
    ("10\\!000", "10000"),
    ("x = 5", "5"),
    ("\\textbf{(051) }", "051"),
    ("\\$18.90", "18.90"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_keeps_tuples_and_intervals_apart():
    assert normalize_answer("(1,2)") != normalize_answer("[1,2]")
    assert normalize_answer("(1,2)") == "(1,2)"


# ---------------------------------------------------------------------------------------------------------------
# grading (hand-written cases)
# ---------------------------------------------------------------------------------------------------------------

CASES = [
    # (completion, gold, correct, status)
    (box("0.5"), "\\frac{1}{2}", True, "ok"),  # fraction vs decimal
    (box("\\frac{1}{2}"), "0.5", True, "ok"),
    (box("\\dfrac{3}{4}"), "\\frac34", True, "ok"),
    (box("0.75"), "\\dfrac{3}{4}", True, "ok"),
    (box("[-2, 7)"), "[-2,7)", True, "ok"),  # intervals
    (box("(-2, 7)"), "[-2,7)", False, "ok"),
    (box("(-\\infty, 3) \\cup (5, \\infty)"), "(-\\infty,3)\\cup(5,\\infty)", True, "ok"),
    (box("\\{3, 2, 1\\}"), "\\{1,2,3\\}", True, "ok"),  # sets
    (box("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", True, "ok"),  # sqrt, symbolic equality
    (box("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", True, "ok"),  # nested braces in the box
    (box("2\\sqrt{3}"), "\\sqrt{12}", True, "ok"),
    (box("3\\sqrt{2}"), "\\sqrt{12}", False, "ok"),
    (box("83"), "83^\\circ", True, "ok"),  # degrees
    (box("30^{\\circ}"), "30", True, "ok"),
    (box("\\$18.90"), "18.90", True, "ok"),  # units
    (box("10\\%"), "10", True, "ok"),
    (box("\\text{Evelyn}"), "\\text{Evelyn}", True, "ok"),  # text answers
    (box("Evelyn"), "\\text{Evelyn}", True, "ok"),
    (box("\\text{Bob}"), "\\text{Evelyn}", False, "ok"),
    (box("\\text{(C)}"), "\\text{(C)}", True, "ok"),
    (box("-12, -2"), "-2 \\text{ or } -12", True, "ok"),
    (box("\\left( 3, \\frac{\\pi}{2} \\right)"), "(3,\\frac{\\pi}{2})", True, "ok"),  # tuples
    (box("(3, \\frac{\\pi}{3})"), "\\left( 3, \\frac{\\pi}{2} \\right)", False, "ok"),
    (box("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}"), "\\begin{pmatrix}1\\\\-2\\end{pmatrix}", True, "ok"),  # matrix
    (box("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix}1\\\\-2\\end{pmatrix}", False, "ok"),
    (box("x = 5"), "5", True, "ok"),
    (box("p - q"), "p - q", True, "ok"),
    (box("q - p"), "p - q", False, "ok"),
    (box("2^{25} \\cdot 26!"), "2^{25} \\cdot 26!", True, "ok"),
    (box("\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}"), HMMT_GOLD, True, "ok"),  # HMMT: either order
    (box("\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"), HMMT_GOLD, True, "ok"),
    (box("\\frac{-1+\\sqrt{17}}{2}"), HMMT_GOLD, False, "ok"),  # only one of the two values
    (box("025"), "25", True, "ok"),  # integer fast path
    (box("1,000"), "1000", True, "ok"),
    (box("26"), "25", False, "ok"),  # wrong answer: status ok, correct False
    (box("\\frac{1}{3}"), "\\frac{1}{2}", False, "ok"),
    ("I think it is 25 but I am not sure.", "25", False, "no_answer"),  # no boxed
    ("The computation gives \\boxed{24} ... wait, actually \\boxed{25", "25", False, "ok"),  # unterminated ignored
    ("first \\boxed{3}, then \\boxed{4}.", "4", True, "ok"),  # last boxed wins
    ("first \\boxed{3}, then \\boxed{4}.", "3", False, "ok"),
    ("So we get 7 in the end.\nAnswer: 7", "7", True, "ok"),  # Answer: line fallback
    ("Hence.\n**Answer:** $\\dfrac{\\sqrt{3}}{2}$", "\\frac{\\sqrt3}{2}", True, "ok"),
    ("\\boxed 5", "5", True, "ok"),
    ("$\\fbox{\\frac{2}{3}}$", "\\frac{2}{3}", True, "ok"),
]


@pytest.mark.parametrize("completion, gold, correct, status", CASES)
def test_grade_cases(verifier, completion, gold, correct, status):
    g = verifier.grade(completion, gold)
    assert (g.correct, g.status) == (correct, status), g
    assert (g.pred is None) == (status == "no_answer")


def test_grade_many_matches_single_grades(verifier):
    pairs = [(c, g) for c, g, _, _ in CASES]
    grades = verifier.grade_many(pairs)
    assert [(x.correct, x.status) for x in grades] == [(c, s) for _, _, c, s in CASES]


def test_math_verify_path_in_worker_function():
    # the worker-side function itself (no fast path): math-verify, gold first
    assert V._score_one("0.5", "\\frac{1}{2}") == (True, "ok")
    assert V._score_one("\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}", HMMT_GOLD) == (True, "ok")
    assert V._score_one("\\sqrt{3}", "\\frac{1}{2}") == (False, "ok")


def test_integer_fast_path_skips_pool():
    with Verifier(workers=1) as v:
        grades = v.grade_many([(box("025"), "25"), (box("7"), "8"), (box("-0"), "0"), (box("\\frac{2}{4}"), "\\frac12")])
        assert [g.correct for g in grades] == [True, False, True, True]
        assert v._pool is None  # never started: all settled in the parent
        assert v.path_stats["fast"] == 4


TUPLE_PAIRS = [  # (pred, gold, right): tuples of integers, the multi-step skill world's answers
    ("(21, 17)", "(21, 17)", True), ("(21,17)", "(21, 17)", True), ("( -3 , 4 )", "(-3, 4)", True),
    ("(21, 17)", "(21, 18)", False), ("(17, 21)", "(21, 17)", False), ("(21, 17)", "(21, 17, 3)", False),
    ("[2, 5]", "[2, 5]", True), ("[2, 6]", "[2, 5]", False),
]


def test_integer_tuple_fast_path_agrees_with_math_verify():
    with Verifier(workers=1) as v:
        grades = v.grade_many([(box(p), g) for p, g, _ in TUPLE_PAIRS])
        assert [g.correct for g in grades] == [r for _, _, r in TUPLE_PAIRS]
        assert v._pool is None and v.path_stats["fast"] == len(TUPLE_PAIRS)
    # the independent computation: math-verify itself (the worker function), on every pair the fast path settled
    for p, g, right in TUPLE_PAIRS:
        assert V._score_one(p, g) == (right, "ok"), (p, g)
    # not settled in the parent: a leading zero (a thousands separator?), mixed brackets, a fraction inside
    for p, g in [("(1,000)", "(1,0)"), ("[1,2)", "(1,2)"), ("(01, 2)", "(1, 2)"), ("(\\frac{1}{2}, 3)", "(1, 3)")]:
        assert V._fast_compare(p, g) is None, (p, g)


# ---------------------------------------------------------------------------------------------------------------
# hard timeout and pool behaviour
# ---------------------------------------------------------------------------------------------------------------

def test_timeout_is_hard_and_pool_survives(verifier):
    t0 = time.perf_counter()
    g = verifier.grade(HANG, "1", timeout_s=1.0)
    dt = time.perf_counter() - t0
    assert g == Grade(False, "9^{9^{9^{9^{9}}}}", "timeout")
    assert dt < 2.0, dt
    # the hung worker was replaced: the next calls work
    assert verifier.grade(box("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", timeout_s=1.0) == Grade(
        True, "\\frac{\\sqrt{2}}{2}", "ok")
    assert verifier.stats["timeout"] >= 1


def test_grade_many_preserves_order_and_isolates_timeout(verifier):
    good = [
        (box("\\sqrt{8}"), "2\\sqrt{2}", True),
        (box("\\frac{\\pi}{3}"), "\\frac{\\pi}{4}", False),
        (box("\\{1,2\\}"), "\\{2,1\\}", True),
        (box("x^2+1"), "1+x^2", True),
        (box("\\sqrt{5}"), "\\sqrt{6}", False),
        (box("3"), "4", False),
        ("nothing", "4", False),
    ]
    # enough distinct sympy-bound items that they travel to the pool in multi-item chunks
    good += [(box(f"\\sqrt{{{k * k}}}"), str(k + (k % 3 == 0)), k % 3 != 0) for k in range(2, 40)]
    pairs = [(c, g) for c, g, _ in good]
    pairs.insert(17, (HANG, "1"))  # inside a chunk with other pool items
    expected = [c for _, _, c in good]
    expected.insert(17, False)
    retries = verifier.path_stats["chunk_retries"]
    t0 = time.perf_counter()
    grades = verifier.grade_many(pairs * 2, progress=True, timeout_s=1.0)
    dt = time.perf_counter() - t0
    assert [g.correct for g in grades] == expected * 2
    statuses = [g.status for g in grades]
    assert statuses[17] == statuses[17 + len(pairs)] == "timeout"  # duplicates are graded once
    assert statuses.count("timeout") == 2 and statuses.count("no_answer") == 2
    assert set(statuses) == {"ok", "timeout", "no_answer"}
    assert verifier.path_stats["chunk_retries"] == retries + 1  # the chunk timed out and was re-run item by item
    assert dt < 8.0, dt  # chunk timeout (1 s) + the one-by-one re-run (1 s) + slack for a busy machine
    assert verifier.grade(box("\\sqrt{9}"), "3") == Grade(True, "\\sqrt{9}", "ok")


def test_parse_exception_falls_back_to_string_compare(monkeypatch):
    def boom(s):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(V, "_mv_parse", boom)
    V._parse_gold.cache_clear()
    try:
        assert V._score_one("\\text{Evelyn}", "Evelyn") == (True, "ok")  # string fallback matches
        assert V._score_one("\\sqrt{2}", "\\frac{1}{2}") == (False, "error")
    finally:
        V._parse_gold.cache_clear()


def _crash_or_score(pred, gold, _orig=V._score_one):
    if pred == "CRASH":
        os._exit(3)  # a worker dying abruptly (segfault, OOM kill)
    return _orig(pred, gold)


@pytest.mark.skipif(V._mp_context().get_start_method() != "fork", reason="patching the worker needs fork")
def test_worker_crash_is_error_and_pool_survives(monkeypatch):
    monkeypatch.setattr(V, "_score_one", _crash_or_score)
    with Verifier(workers=2, timeout_s=5.0) as v:
        pairs = [(box("\\sqrt{4}"), "2"), (box("CRASH"), "1"), (box("\\sqrt{9}"), "3")]
        grades = v.grade_many(pairs)
        assert [(g.correct, g.status) for g in grades] == [(True, "ok"), (False, "error"), (True, "ok")]
        assert v.grade(box("\\sqrt{16}"), "4") == Grade(True, "\\sqrt{16}", "ok")


def test_stats_count_statuses():
    with Verifier(workers=1, timeout_s=5.0) as v:
        v.grade_many([(box("1"), "1"), ("none", "1"), (box("2"), "1")])
        assert v.stats == {"ok": 2, "no_answer": 1, "timeout": 0, "error": 0}
    assert v.closed


def test_module_level_api():
    assert grade(box("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}").correct
    res = grade_many([(box("1"), "1"), (box("\\sqrt{4}"), "2"), ("?", "2")], timeout_s=5.0, workers=2)
    assert [(g.correct, g.status) for g in res] == [(True, "ok"), (True, "ok"), (False, "no_answer")]
    assert grade_many([]) == []
    with pytest.raises(ValueError):
        grade(box("x"), "1", timeout_s=0)


# ---------------------------------------------------------------------------------------------------------------
# every process that graded exits (issue 21): the pool is stopped before multiprocessing joins its children
# ---------------------------------------------------------------------------------------------------------------

_EXIT_SCRIPT = r'''
import multiprocessing, sys
from stages.engine.verify import Verifier, grade

HANG = "So the answer is $\\boxed{9^{9^{9^{9^{9}}}}}$."


def work():
    out = [grade(HANG, "1", timeout_s=0.5).status, grade("\\boxed{\\sqrt{4}}", "2", timeout_s=5).status]
    v = Verifier(workers=1, timeout_s=0.5)  # never closed by its owner
    out += [g.status for g in v.grade_many([(HANG, "1"), ("\\boxed{\\sqrt{9}}", "3")])]
    return out


def child(q):
    q.put(work())


if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    got = q.get(timeout=60)
    p.join(20)
    print("child", got, "exited" if not p.is_alive() else "HUNG", flush=True)
    if p.is_alive():
        p.kill()
        sys.exit(3)
    print("main", work(), flush=True)
'''


def test_grading_processes_always_exit(tmp_path):
    """A process that graded (hang cases included, a Verifier left open) exits, whether it is the main process
    or a multiprocessing child (whose exit runs no atexit hook and used to wait on the idle pool workers for
    ever). Run several times: the main-process hang was a race."""
    import subprocess
    import sys

    script = tmp_path / "grade_and_exit.py"
    script.write_text(_EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for i, method in enumerate(["fork", "spawn", "fork", "fork"]):
        try:
            r = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=90,
                               env=env, cwd=tmp_path)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"run {i} ({method}) did not exit: {e.stdout}") from None
        assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
        assert "child ['timeout', 'ok', 'timeout', 'ok'] exited" in r.stdout, r.stdout
        assert "main ['timeout', 'ok', 'timeout', 'ok']" in r.stdout, r.stdout
