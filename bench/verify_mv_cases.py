"""Our grader against the Math-Verify project's own test cases, put into our answer format (issue 15 / 21).

Reads every ``@pytest.mark.parametrize("gold, pred, expected" ...)`` list of Math-Verify's tests/ (a checkout of
github:huggingface/Math-Verify; its literal cases, nothing of ours), then per case:

- our grader: the answer string math-verify extracts from the prediction, boxed at the end of a completion,
  against the one it extracts from the gold as a dataset answer string (``stages.engine.verify.grade_many``,
  its defaults);
- plain math-verify with its defaults: ``verify(parse(gold), parse(pred))``.

It prints both agreement counts with the expected labels and every case where plain math-verify agrees and we
do not.  The last line is one JSON object.

    python bench/verify_mv_cases.py --mv-tests PATH/TO/Math-Verify/tests
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.engine.verify import grade_many  # noqa: E402


def mv_cases(tests: Path) -> list[dict]:
    """(file, test, gold, pred, expected) of every literal gold/pred/expected parametrize list."""
    out = []
    for f in sorted(tests.glob("test_*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for d in fn.decorator_list:
                if not (isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize"):
                    continue
                names = [n.strip() for n in d.args[0].value.split(",")] if isinstance(d.args[0], ast.Constant) else []
                if names[:2] != ["gold", "pred"]:
                    continue
                try:
                    rows = ast.literal_eval(d.args[1])
                except ValueError:
                    continue  # built from expressions (math.pi ...): not literal cases
                label = "expected" if "expected" in names else "result"
                for row in rows:
                    r = dict(zip(names, row))
                    out.append({"source": f"{f.name}::{fn.name}", "gold": r["gold"], "pred": r["pred"],
                                "expected": bool(r[label])})
    return out


def _unwrap(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    return s


def _answer_string(text: str) -> str:
    """The answer string math-verify extracts from ``text`` (the last element of ``parse``), else ``text``."""
    from math_verify import parse

    try:
        got = parse(text)
    except Exception:
        got = []
    return str(got[-1]) if len(got) >= 2 else _unwrap(text)


def our_format(pred: str, gold: str) -> tuple[str, str]:
    """(completion, gold): math-verify's own reading of each side's answer, the prediction boxed at the end of a
    completion, the gold as a dataset answer string."""
    return f"We work it out.\n\nThe answer is $\\boxed{{{_answer_string(pred)}}}$.", _answer_string(gold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mv-tests", required=True, help="Math-Verify's tests/ folder")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--cases-out", default=None, help="write every case with both verdicts here (JSON)")
    a = ap.parse_args()
    from math_verify import parse, verify

    cases = mv_cases(Path(a.mv_tests))
    pairs = [our_format(c["pred"], c["gold"]) for c in cases]
    ours = grade_many(pairs, timeout_s=a.timeout)
    n_ours = n_mv = 0
    worse, rows = [], []
    for c, (comp, gold), g in zip(cases, pairs, ours):
        try:
            mv = bool(verify(parse(c["gold"]), parse(c["pred"])))
        except Exception:
            mv = False
        rows.append({**c, "ours": g.correct, "math_verify": mv})
        n_ours += g.correct == c["expected"]
        n_mv += mv == c["expected"]
        if mv == c["expected"] and g.correct != c["expected"]:
            worse.append({**c, "gold_ours": gold, "pred_ours": g.pred, "status": g.status})
    if a.cases_out:
        Path(a.cases_out).write_text(json.dumps(rows, indent=1))
    for w in worse:
        print(f"- {w['source']}: gold {w['gold_ours']!r} pred {w['pred_ours']!r} ({w['status']}) expected {w['expected']}")
    print(json.dumps({"cases": len(cases), "ours_agree": n_ours, "math_verify_agree": n_mv,
                      "only_math_verify_right": len(worse)}))


if __name__ == "__main__":
    main()
