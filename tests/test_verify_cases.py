"""Grading cases with their sources: the Math-Verify project's own tests (github:huggingface/Math-Verify, tests/),
put into our answer format (the prediction boxed inside a completion, the gold as a dataset answer string),
and the cases of issue 15 where plain math-verify was right and we were wrong.

Each expected label is the one Math-Verify's test file asserts (or, for issue 15, the one plain math-verify
gives); none is the output of our own grader.
"""

import pytest

from stages.engine.verify import gold_is_multi, grade_many, last_boxed_group, normalize_answer

MV = "huggingface/Math-Verify tests/test_all.py"

# (source, completion, gold, expected)
CASES = [
    # --- several boxed answers against a set / list gold (issue 15; MV test_all "\boxed{1}\boxed{2}" vs "\boxed{1,2}")
    (f"{MV} (gold $\\boxed{{1}}\\boxed{{2}}$ vs pred $\\boxed{{1,2}}$)", r"so $\boxed{1}\boxed{2}$", "1,2", True),
    ("issue 15: set {1,2,3} answered box by box", r"The solutions are $\boxed{1}, \boxed{2}, \boxed{3}$.", r"\{1,2,3\}", True),
    ("issue 15: two roots joined by 'and'", r"**Final Answer** The integers are \boxed{-2} and \boxed{1}.", "-2, 1", True),
    (f"{MV} functional-equation case (final answer '\\boxed{{-2}} \\quad and \\quad \\boxed{{1}}')",
     r"Thus the integers are: \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", "1, -2", True),
    ("issue 15: a wrong member of the set", r"$\boxed{1}, \boxed{2}, \boxed{4}$", r"\{1,2,3\}", False),
    ("issue 15: single-answer gold keeps the reference's last box", r"first \boxed{3}, then finally \boxed{5}", "5", True),
    ("issue 15: single-answer gold, earlier box is not the answer", r"\boxed{5} and \boxed{3}", "5", False),
    # --- the "Answer:" line fallback
    ("issue 15: 'The largest $n$ is 34' gave n", "We check all cases.\nAnswer: The largest $n$ is 34", "34", True),
    (f"{MV} test_latex_notation ('Answer $ 9 $')", "Some work.\nAnswer: $ 9 $", "9", True),
    (f"{MV} test_latex_notation ('Answer \\( (9+1) \\)')", "Answer: \\( (9+1) \\)", "10", True),
    # --- comma-space is a list, not a thousands separator
    (f"{MV} (gold 32349 vs $\\boxed{{32, 349}}$ -> 0)", r"is $\boxed{32, 349}$", "32349", False),
    (f"{MV} (gold 32349 vs $\\boxed{{32,\\! 349}}$ -> 1)", r"is $\boxed{32,\! 349}$", "32349", True),
    (f"{MV} (gold 11111111100 vs $\\boxed{{11,\\! 111,\\! 111,\\! 100}}$ -> 1)",
     r"is $\boxed{11,\! 111,\! 111,\! 100}$", "11111111100", True),
    (f"{MV} test_number_extraction ('7425000' vs '7,425,000')", r"\boxed{7,425,000}", "7425000", True),
    (f"{MV} test_number_extraction ('1000.99' vs '1,000.99')", r"\boxed{1,000.99}", "1000.99", True),
    # --- a bare gold read as a plain expression too (math-verify's default reading)
    (f"{MV} test_number_extraction ('1,22' vs '1.22')", r"\boxed{1.22}", "1,22", True),
    (f"{MV} test_number_extraction ('0,111' vs '0.111')", r"\boxed{0.111}", "0,111", True),
    (f"{MV} test_simple_fraction_notation ('10/9' vs '\\frac{{10}}{{9}}')", r"\boxed{\frac{10}{9}}", "10/9", True),
    (f"{MV} test_simple_fraction_notation ('-10/9' vs '-\\frac{{10}}{{9}}')", r"\boxed{-\frac{10}{9}}", "-10/9", True),
    (f"{MV} test_number_extraction ('0.4' vs '.4')", r"\boxed{.4}", "0.4", True),
    # --- a relation is not read as a plain expression (that keeps one side): issue 21
    (f"{MV} test_relations_math ('$a +3z = 0$' vs '$0$' -> 0)", r"\boxed{0}", "a +3z = 0", False),
    (f"{MV} test_relations_math ('$2x + z = 1$' vs '$1$' -> 0)", r"\boxed{1}", "2x + z = 1", False),
    (f"{MV} test_relations_math ('$a^2 + b = 0$' vs '$0$' -> 0)", r"\boxed{0}", "a^2 + b = 0", False),
    (f"{MV} test_number_extraction ('-5' vs '-5')", r"\boxed{-5}", "-5", True),
    # --- intervals and sets (MV test_sets_handling)
    (f"{MV} test_sets_handling ('[0,1)' vs '[0,1)')", r"\boxed{[0,1)}", "[0,1)", True),
    (f"{MV} test_sets_handling ('[0,9)' vs '[0,1)')", r"\boxed{[0,1)}", "[0,9)", False),
    (f"{MV} test_sets_handling ('(0,9)' vs '[0,9)')", r"\boxed{[0,9)}", "(0,9)", False),
    (f"{MV} ('[-4,0]' vs '\\boxed{{[-4, 0]}}')", r"Thus: \[ \boxed{[-4, 0]} \]", "[-4,0]", True),
    (f"{MV} ('(2, 12) \\cup (12, 102)' vs '\\boxed{{(2,12) \\cup (12,102)}}')",
     r"Thus, the answer is $x \in \boxed{(2,12) \cup (12,102)}$", r"(2, 12) \cup (12, 102)", True),
    (f"{MV} ('\\{{1\\pm\\sqrt{{5}},-2\\}}' boxed)", r"so the answer is $\boxed{\{1\pm\sqrt{5},-2\}}.$",
     r"\{1\pm\sqrt{5},-2\}", True),
    # --- text answers, issue #41 / #37 of Math-Verify
    (f"{MV} ('\\boxed{{\\text{{C}}}}' vs '\\boxed{{\\text{{(C)}}}}')", r"$\boxed{\text{(C)}}.$", r"\text{C}", True),
    (f"{MV} test_sqrt_precision (issue #41: '4' vs '4\\sqrt{{2}}')", r"$\boxed{4\sqrt{2}}$", "4", False),
]


@pytest.mark.parametrize("source,completion,gold,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_case(source, completion, gold, expected):
    g = grade_many([(completion, gold)], timeout_s=20)[0]
    assert g.correct is expected, (source, g)


def test_float_precision_setting():
    # MV tests/test_all.py test_precision: 1/3 vs 0.333 is equal at float_rounding=3, not at 4 (nor the default 6)
    pair = [(r"\boxed{0.333}", r"\frac{1}{3}")]
    assert grade_many(pair, timeout_s=20, float_rounding=3)[0].correct is True
    assert grade_many(pair, timeout_s=20, float_rounding=4)[0].correct is False
    assert grade_many(pair, timeout_s=20)[0].correct is False
    # MV test_float_precision: sqrt(17) printed with 15 decimals vs \sqrt{17} at precision 5
    assert grade_many([(r"\boxed{\sqrt{17}}", "4.123105625617661")], timeout_s=20, float_rounding=5)[0].correct


def test_strict_setting():
    from stages.engine.verify import Verifier

    # the setting reaches math-verify's verify(strict=...) in the workers
    assert Verifier(strict=False).settings == {"float_rounding": 6, "strict": False}
    with pytest.raises(ValueError):
        Verifier(float_rounding=-1)


def test_helpers_by_hand():
    assert last_boxed_group(r"\boxed{1}, \boxed{2} and \boxed{3}") == ["1", "2", "3"]
    assert last_boxed_group(r"we got \boxed{200} earlier, then the total is \boxed{255}") == ["255"]
    assert [gold_is_multi(g) for g in ("1, 2", r"\{1,2\}", "(1,2)", "1,000", "[-4,0]", "5")] == \
        [True, True, False, False, False, False]
    assert normalize_answer("32, 349") == "32,349"  # a list stays a list
    assert normalize_answer("32,349") == "32349"
