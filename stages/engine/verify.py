"""Answer verifier: extract the final answer of a completion and grade it against the gold answer.

Extraction: the last brace-matched ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``); an unterminated
``\\boxed{`` is ignored. Without a box, the last "Answer: ..." line. Extraction and normalisation take linear time
in the completion's length (one brace-matching pass, no regex that rescans to the end); an answer longer than
``MAX_ANSWER_CHARS`` counts as no answer, so what reaches math-verify is short.

Comparison, cheapest first:

1. in the calling process, without sympy: the normalised strings are equal (``normalize_answer``); both sides
   are plain integers after normalisation; both are plain numbers (int, ``\\frac{a}{b}``, ``a/b``, decimal) that
   are exactly equal, or exact (int/fraction) and different;
2. otherwise math-verify (``parse`` + ``verify(gold, pred)``, gold first) in a ``pebble.ProcessPool`` worker
   under a HARD per-item timeout (a hung worker is killed and replaced). Identical (pred, gold) pairs of a batch
   are graded once. Gold answers are parsed once per worker (LRU cache). Work goes to the pool in small chunks;
   a chunk that times out or dies is re-run item by item so only the bad item scores ``timeout`` (so inside
   ``grade_many`` a pathological item holds the batch up for at most about 2 x timeout; ``grade`` 1 x).

Workers are forked by default (``$SGSD_VERIFY_MP_CONTEXT`` = forkserver/spawn to change): the parent imports and
warms math-verify once, so a worker replaced after a timeout is ready at once. The parent process itself never
runs sympy.

math-verify's own signal-based timeouts are switched off inside the workers (``parsing_timeout=None``,
``timeout_seconds=None``): the pool is the timeout.

Statuses: ``ok`` (extracted and compared, correct True or False), ``no_answer`` (nothing extracted),
``timeout`` (hard timeout hit, correct False), ``error`` (math-verify raised while parsing and the string
fallback did not match, or the worker died; correct False).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Sequence

__all__ = [
    "Grade",
    "Verifier",
    "extract_answer",
    "grade",
    "grade_many",
    "normalize_answer",
    "STATUSES",
]

log = logging.getLogger(__name__)

STATUSES = ("ok", "no_answer", "timeout", "error")
MAX_CHUNK = 8  # items per pool task (pebble costs ~0.1 ms a task; small chunks balance load, cheap retries)
WORKER_MEMORY_MB = 4096  # address-space cap per worker (a blow-up becomes MemoryError -> error, not an OOM kill)


@dataclass(frozen=True)
class Grade:
    correct: bool
    pred: str | None  # extracted answer string (None if none found)
    status: str  # one of "ok", "no_answer", "timeout", "error"


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_\-]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*[:\uff1a][ \t]*(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_TAIL_NUMBER_RE = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# math delimiters of an "Answer:" line, in the order they are tried at a position: $$..$$, $..$, \(..\), \[..\]
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
MAX_ANSWER_CHARS = 1000  # a longer extracted answer is no answer (nothing real is that long; bounds the parse)


def _last_math_segment(s: str) -> tuple[str, int] | None:
    r"""(content, end) of the last math segment of ``s``, left to right as the regex
    ``\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]`` (DOTALL) would find them, in linear time: a closing
    delimiter that is absent once is absent for every later position, so no position rescans to the end."""
    last = None
    absent: set[str] = set()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "$" and c != "\\":
            i += 1
            continue
        for op, cl in _MATH_DELIMS:
            if cl in absent or not s.startswith(op, i):
                continue
            k = s.find(cl, i + len(op) + 1)  # content: at least one character
            if k < 0:
                absent.add(cl)
                continue
            last = (s[i + len(op):k], k + len(cl))
            i = k + len(cl)
            break
        else:
            i += 1
    return last


def _brace_matches(s: str, start: int) -> dict[int, int]:
    """Matching '}' position for every '{' at or after ``start`` (escaped ``\\{``/``\\}`` skipped). One pass."""
    out: dict[int, int] = {}
    stack: list[int] = []
    i, n = start, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            out[stack.pop()] = i
        i += 1
    return out


def _unwrap_box(s: str) -> str:
    """``\\boxed{X}`` (the whole string) -> ``X``, repeatedly.  One brace-matching pass over ``s`` serves every
    layer (linear time however deep the boxes nest)."""
    braces: dict[int, int] | None = None
    a, b = 0, len(s)  # the current string is s[a:b]
    while True:
        m = _BOX_RE.match(s, a, b)
        if not m:
            break
        off = m.end()
        while off < b and s[off].isspace():
            off += 1
        if off >= b or s[off] != "{":
            break
        if braces is None:
            braces = _brace_matches(s, a)
        if braces.get(off) != b - 1:
            break
        i, j = off + 1, b - 1
        while i < j and s[i].isspace():
            i += 1
        while j > i and s[j - 1].isspace():
            j -= 1
        if i == j:
            break
        a, b = i, j
    return s[a:b]


def _last_boxed(text: str) -> str | None:
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    braces: dict[int, int] | None = None
    for m in reversed(matches):
        i = m.end()
        j = i
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            if braces is None:
                braces = _brace_matches(text, matches[0].end())
            close = braces.get(j)
            if close is None:
                continue  # unterminated \boxed{ -> ignore this one
            inner = text[j + 1:close].strip()
            if inner:
                return _unwrap_box(inner)
            continue
        if m.group(1) == "boxed":
            # `\boxed 5` / `\boxed5`: a single token
            tok = re.match(r"[^\s$]+", text[j:j + 200]) if j < len(text) else None
            if tok:
                val = tok.group(0).rstrip(".,;:")
                if val and not val.startswith(("}", "\\]", "\\)")):
                    return val
    return None


def _boxes_with_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every top-level brace-matched ``\\boxed{..}`` / ``\\fbox{..}``, in order."""
    out: list[tuple[int, int, str]] = []
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return out
    braces = _brace_matches(text, matches[0].end())
    end_prev = -1
    for m in matches:
        if m.start() < end_prev:
            continue  # a box inside a box
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = braces.get(j)
            if close is None:
                continue
            inner = text[j + 1:close].strip()
            if inner:
                out.append((m.start(), close + 1, _unwrap_box(inner)))
            end_prev = close + 1
    return out


# what may stand between the boxes of one multi-part final answer: "\boxed{-2} and \boxed{1}", "\boxed{1}, \boxed{2}"
_BOX_JOINER_RE = re.compile(r"^(?:\s|\$|,|;|\.|\\[()\[\]]|\\q?quad(?![A-Za-z])|\\[,;! ]|\\text\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b)*$")


def last_boxed_group(text: str) -> list[str]:
    """The final run of boxed answers joined only by commas, "and", spacing or ``$``: ``\\boxed{1}, \\boxed{2}``
    -> ["1", "2"]; the last box alone when the boxes before it are separated by prose."""
    boxes = _boxes_with_spans(text)
    if not boxes:
        return []
    group = [boxes[-1]]
    for b in reversed(boxes[:-1]):
        between = text[b[1]:group[0][0]]
        if len(between) > 40 or not _BOX_JOINER_RE.match(between):
            break
        group.insert(0, b)
    return [g[2] for g in group]


def _top_level_split(s: str) -> list[str]:
    """Split on commas outside (), [], {} (``\\{`` counts as a brace)."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def gold_is_multi(gold: str) -> bool:
    """A set (``\\{1,2\\}``) or a list of answers (``1, 2``, ``-2, 1``): not a tuple/interval, not ``1,000``."""
    g = _unwrap_box(str(gold).strip()).strip("$ ").strip()
    if g.startswith("\\{") and g.endswith("\\}"):
        return True
    if _THOUSANDS_RE.match(g.replace(" ", "")) and not re.search(r"\d,\s+\d", g):
        return False
    return len(_top_level_split(g)) > 1


def _answer_line(text: str) -> str | None:
    last = None
    for m in _ANSWER_LINE_RE.finditer(text):
        last = m
    if last is None:
        return None
    val = last.group(1).strip()
    if not val.strip("*_ "):
        # "Answer:" alone on its line: take the next non-empty line
        for line in text[last.end():].splitlines():
            if line.strip():
                val = line.strip()
                break
        else:
            return None
    val = val.strip().strip("*_").strip()
    seg = _last_math_segment(val)
    if seg is not None:
        tail = val[seg[1]:]
        nums = _TAIL_NUMBER_RE.findall(tail)
        if nums:  # "The largest $n$ is 34": the answer is the number after the math, not the variable
            val = nums[-1]
        else:
            val = seg[0]
    val = val.strip().rstrip(".").strip()
    val = val.strip("$").strip()
    return val or None


def extract_answer(completion: str) -> str | None:
    """The last brace-matched ``\\boxed{}``/``\\fbox{}`` content, else the last "Answer: ..." line, else None.
    Linear time in the completion's length; an answer longer than ``MAX_ANSWER_CHARS`` counts as none."""
    if not completion:
        return None
    ans = _last_boxed(completion)
    if ans is None:
        ans = _answer_line(completion)
    return ans if ans is not None and len(ans) <= MAX_ANSWER_CHARS else None


# --------------------------------------------------------------------------------------------------------------
# Normalisation (string fallback, integer fast path, majority voting)
# --------------------------------------------------------------------------------------------------------------

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[!,;:> ]|\\q?quad(?![A-Za-z])|\\displaystyle(?![A-Za-z])|~")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°")
_FRAC_CMD_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_SHORT2_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\d)")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGN_RE = re.compile(r"^[a-z]\s*=\s*(?=[^=]+$)")
_PAREN_ONE_RE = re.compile(r"^\(([^(),]+)\)$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_LIST_COMMA_RE = re.compile(r"\d,[ \t]+[+-]?\d")
_WS_RE = re.compile(r"\s+")


def normalize_answer(s: str) -> str:
    """Normalised answer string: used for the string fallback, the fast path and majority voting.

    Strips whitespace, ``\\left``/``\\right``, ``\\!``/``\\,`` spacing, ``\\text{...}``-style wrappers,
    degrees (``^\\circ``), ``$``, ``\\%``, a trailing period, thousands separators, a leading ``x =``;
    ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``; lower-cases. Regex only (linear time).
    """
    if s is None:
        return ""
    s = _unwrap_box(str(s).strip())
    listy = _LIST_COMMA_RE.search(s) is not None  # "32, 349" is a list; "32,349" / "32,\\! 349" a number
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", ",")
    s = _SPACING_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    for _ in range(5):
        t = _TEXT_WRAP_RE.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = _FRAC_CMD_RE.sub(r"\\frac", s)
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_SHORT2_RE.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = _WS_RE.sub("", s)
    s = s.rstrip(".").lower()
    s = _ASSIGN_RE.sub("", s)
    if len(s) >= 2 and s[0] == "{" and s[-1] == "}":  # "{52_8}" -> "52_8", every enclosing pair (one pass)
        braces, k, n = _brace_matches(s, 0), 0, len(s)
        while n - 2 * k >= 2 and s[k] == "{" and braces.get(k) == n - 1 - k:
            k += 1
        s = s[k:n - k]
    m = _PAREN_ONE_RE.match(s)
    if m:  # "(051)", "(c)": parentheses around a single item (a tuple/interval always has a comma)
        s = m.group(1)
    if _THOUSANDS_RE.match(s) and not listy:
        s = s.replace(",", "")
    return s


def _canon_int(s: str) -> str:
    neg = s.startswith("-")
    d = s.lstrip("+-").lstrip("0") or "0"
    return "-" + d if neg and d != "0" else d


_FRAC_NUM_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d{1,50})\}\{(\d{1,50})\}$|^([+-]?\d{1,50})/(\d{1,50})$")
_DEC_RE = re.compile(r"^[+-]?\d{0,50}\.\d{1,50}$")


def _as_rational(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_exact_form) for a normalised plain number: int / fraction (exact) or decimal (not exact)."""
    if _INT_RE.match(s) and len(s) <= 50:
        return Fraction(int(s)), True
    m = _FRAC_NUM_RE.match(s)
    if m:
        if m.group(3) is not None:
            sign, num, den = m.group(1), m.group(2), m.group(3)
        else:
            sign, num, den = "", m.group(4), m.group(5)
        if int(den) == 0:
            return None
        v = Fraction(int(num), int(den))
        return (-v if sign == "-" else v), True
    if _DEC_RE.match(s):
        return Fraction(s), False
    return None


_CANON_INT_RE = re.compile(r"^-?(?:0|[1-9]\d{0,49})$")


def _int_tuple(s: str) -> tuple[str, tuple[str, ...]] | None:
    """``(delimiters, elements)`` of a normalised ``(a,b,...)`` / ``[a,b,...]`` whose two or more elements are all
    integers written canonically (no ``+``, no leading zero): ``"(21,-4)"`` -> ``("()", ("21", "-4"))``. Anything
    else (a leading zero, as in ``(1,000)``, which may be a thousands separator; a fraction; a nested item) -> None."""
    if len(s) < 5 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")):
        return None
    parts = s[1:-1].split(",")
    if len(parts) < 2 or not all(_CANON_INT_RE.match(p) and p != "-0" for p in parts):
        return None
    return s[0] + s[-1], tuple(parts)


def _fast_compare(pred: str, gold: str) -> bool | None:
    """True/False when settled without sympy; None -> needs math-verify.

    Settled: identical strings; equal normalised strings; both plain integers (compared as integers); both plain
    numbers (int, ``\\frac{a}{b}``, ``a/b``, decimal) that are exactly equal, or both exact (int/fraction) forms that
    differ; both tuples (or both ``[...]``) of canonically written integers, equal only element by element. A decimal
    that differs from the other side goes to math-verify (it rounds floats), as do mixed brackets (``[1,2)``).
    """
    if pred.strip() == gold.strip():
        return True
    np_, ng = normalize_answer(pred), normalize_answer(gold)
    if not np_ or not ng:
        return None
    if np_ == ng:
        return True
    if _INT_RE.match(np_) and _INT_RE.match(ng):
        return _canon_int(np_) == _canon_int(ng)
    rp, rg = _as_rational(np_), _as_rational(ng)
    if rp is not None and rg is not None:
        if rp[0] == rg[0]:
            return True
        if rp[1] and rg[1]:
            return False
        return None
    tp, tg = _int_tuple(np_), _int_tuple(ng)
    if tp is not None and tg is not None and tp[0] == tg[0]:
        return tp[1] == tg[1]
    return None


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs inside pool processes; math-verify / sympy imported lazily there)
# --------------------------------------------------------------------------------------------------------------

_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 0


def _worker_init(memory_mb: int | None = WORKER_MEMORY_MB) -> None:
    if memory_mb:
        # cap the address space at (what the worker already maps + memory_mb): a runaway sympy computation then
        # raises MemoryError (-> status error) instead of eating the machine. Relative, because a forked worker
        # inherits the parent's (possibly huge) mappings.
        try:
            import resource

            lim = _vm_bytes() + memory_mb * 1024 * 1024
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or hard > lim:
                resource.setrlimit(resource.RLIMIT_AS, (lim, hard))
        except Exception:  # pragma: no cover - platform dependent
            pass
    _warm_up()


def _warm_up() -> None:
    """Import math-verify and run one parse+verify so lazily built parsers exist before the first real item."""
    _mv()
    try:
        _score_one("\\frac{1}{2}", "0.5")
    except Exception:
        pass


_PARSE_KW: dict = {}
_VERIFY_KW: dict = {}


@functools.lru_cache(maxsize=1)
def _mv():
    """Import math-verify once per process, its own (signal-based) timeouts off, their warnings silenced.

    The keyword names are checked against the installed signatures: ``parse(..., parsing_timeout=None,
    raise_on_error=True)`` and ``verify(gold, pred, timeout_seconds=None, raise_on_error=False)`` in math-verify
    0.9; signal.alarm would misbehave off the main thread, and the pool's hard timeout replaces it anyway.
    """
    import inspect

    import math_verify
    import math_verify.grader as _g
    import math_verify.parser as _p

    pp = inspect.signature(math_verify.parse).parameters
    vp = inspect.signature(math_verify.verify).parameters
    _PARSE_KW.clear()
    _VERIFY_KW.clear()
    if "parsing_timeout" in pp:
        _PARSE_KW["parsing_timeout"] = None
    if "raise_on_error" in pp:
        _PARSE_KW["raise_on_error"] = True  # a parser exception -> string fallback / status "error"
    if "timeout_seconds" in vp:
        _VERIFY_KW["timeout_seconds"] = None
    if "raise_on_error" in vp:
        _VERIFY_KW["raise_on_error"] = False  # a failing comparison strategy just counts as "not equal"
    for mod in (_g, _p):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils",
                 "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return math_verify


def _mv_parse(s: str):
    mv = _mv()
    s = _UNESCAPED_DOLLAR_RE.sub("", s).strip()
    return mv.parse("$" + s + "$", **_PARSE_KW)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _mv_parse(gold)


@functools.lru_cache(maxsize=4096)
def _parse_gold_plain(gold: str):
    """math-verify's own reading of a bare gold (LaTeX and plain expression, its defaults): ``1,22`` -> 1.22.
    Not for a relation (``a + 3z = 0``, ``x < 5``): the plain-expression reading keeps one side of it (``0``)."""
    if "$" in gold or "\\" in gold or any(c in gold for c in "=<>"):
        return None
    try:
        return _mv().parse(gold, **_PARSE_KW) or None
    except Exception:
        return None


DEFAULT_SETTINGS = {"float_rounding": 6, "strict": True}
_SETTINGS: dict = dict(DEFAULT_SETTINGS)  # the settings of the chunk a worker is scoring


def _score_one(pred: str, gold: str, settings: dict | None = None) -> tuple[bool, str]:
    """(correct, status) for an extracted pred vs gold; runs in a worker.  ``settings``: math-verify's
    ``float_rounding`` and ``strict``."""
    mv = _mv()
    kw = {**_VERIFY_KW, **(settings if settings is not None else _SETTINGS)}
    try:
        g = _parse_gold(gold)
        p = _mv_parse(pred)
    except Exception:
        same = normalize_answer(pred) == normalize_answer(gold) != ""
        return (True, "ok") if same else (False, "error")
    plain = _parse_gold_plain(gold)
    if (not g and not plain) or not p:
        return (normalize_answer(pred) == normalize_answer(gold) != "", "ok")
    ok = bool(g) and bool(mv.verify(g, p, **kw))
    if not ok and plain:
        ok = bool(mv.verify(plain, p, **kw))
    if not ok:
        ok = normalize_answer(pred) == normalize_answer(gold) != ""
    return ok, "ok"


def _score_chunk(items: Sequence[tuple[str, str]], settings: dict | None = None) -> list[tuple[bool, str]]:
    global _SETTINGS
    _SETTINGS = {**DEFAULT_SETTINGS, **(settings or {})}
    return [_score_one(p, g) for p, g in items]


# --------------------------------------------------------------------------------------------------------------
# Pool owner
# --------------------------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except Exception:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _mp_context():
    """Start method for the pool workers: ``$SGSD_VERIFY_MP_CONTEXT`` if set, else fork where available.

    fork works from any caller (unguarded scripts, ``python - <<EOF``, notebooks) and the workers inherit the
    parent's already imported and warmed-up math-verify, so a worker replaced after a timeout is ready in
    milliseconds. forkserver/spawn would re-import the caller's main module in every worker (and fail outright
    for an unguarded script); set ``SGSD_VERIFY_MP_CONTEXT=forkserver`` if the parent must not fork.
    """
    methods = multiprocessing.get_all_start_methods()
    want = os.environ.get("SGSD_VERIFY_MP_CONTEXT", "").strip()
    if want and want in methods:
        ctx = multiprocessing.get_context(want)
        if want == "forkserver":
            try:
                ctx.set_forkserver_preload(["math_verify", "stages.engine.verify"])
            except Exception:  # pragma: no cover
                pass
        return ctx
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class Verifier:
    """Owns a pebble ProcessPool; grade()/grade_many() with a hard per-item timeout.

    Use as a context manager, or call close(). ``stats`` counts grades per status.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0, memory_mb: int | None = WORKER_MEMORY_MB,
                 float_rounding: int = 6, strict: bool = True):
        if not (isinstance(float_rounding, int) and 0 <= float_rounding <= 15):
            raise ValueError(f"float_rounding must be an integer in [0, 15], got {float_rounding!r}")
        # math-verify's settings: decimal places floats are rounded to before comparing, and strict mode
        # (strict=False lets "x = 1" match "1" and compares sets and intervals loosely)
        self.settings = {"float_rounding": int(float_rounding), "strict": bool(strict)}
        self.workers = int(workers) if workers else _default_workers()
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.stats: dict[str, int] = {k: 0 for k in STATUSES}
        # where the non-no_answer items were settled: parent fast path, math-verify in the pool, duplicate reuse,
        # and how many pool worker restarts (timeouts / crashes) happened
        self.path_stats: dict[str, int] = {"fast": 0, "pool": 0, "dedup": 0, "chunk_retries": 0}
        self._pool = None
        self._pool_pid = 0
        self._pool_finalizer = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_pool(self):
        if self._closed:
            raise RuntimeError("Verifier is closed")
        with self._lock:
            if self._pool is not None and self._pool_pid != os.getpid():
                self._take_pool()  # we are a forked copy: that pool (threads, workers) belongs to the parent
            if self._pool is None or not getattr(self._pool, "active", True):
                if self._pool is not None:
                    self._stop_pool(self._take_pool())
                from pebble import ProcessPool

                ctx = _mp_context()
                if ctx.get_start_method() == "fork":
                    _warm_up()  # import + warm math-verify here once; forked workers inherit it
                self._pool = ProcessPool(
                    max_workers=self.workers,
                    initializer=_worker_init,
                    initargs=(self.memory_mb,),
                    context=ctx,
                )
                self._pool_pid = os.getpid()
                # Stop the pool when this Verifier is collected and, above all, at process exit *before*
                # multiprocessing joins its children: pebble's workers are not daemonic and wait for tasks
                # forever, so a process that exits with the pool running (a multiprocessing child, whose exit runs
                # no atexit hook; or the main process when pebble's exit hook races the pool's manager thread
                # starting a replacement worker) would otherwise wait on them for ever.  multiprocessing runs
                # finalizers with an exit priority before it joins its children, in every kind of process.
                import multiprocessing.util

                self._pool_finalizer = multiprocessing.util.Finalize(
                    self, Verifier._stop_pool, args=(self._pool, self._pool_pid), exitpriority=100)
            return self._pool

    @staticmethod
    def _stop_pool(pool, owner_pid: int | None = None) -> None:
        """Stop the pool and its workers (pebble's join of a stopped pool first joins its manager thread, so no
        replacement worker can start after the workers are killed).  Only in the process that started it."""
        if owner_pid is not None and owner_pid != os.getpid():
            return  # a forked copy: the pool (threads, workers) belongs to the parent
        try:
            pool.stop()
            pool.join(timeout=10)
        except Exception:
            pass

    def _take_pool(self):
        """Detach the current pool (caller holds the lock); its exit finalizer is cancelled."""
        pool, self._pool = self._pool, None
        fin, self._pool_finalizer = self._pool_finalizer, None
        if fin is not None:
            fin.cancel()
        return pool

    def _drop_pool(self) -> None:
        with self._lock:
            pool = self._take_pool()
        if pool is not None and self._pool_pid == os.getpid():
            self._stop_pool(pool)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool = self._take_pool()
        if pool is not None and self._pool_pid == os.getpid():
            self._stop_pool(pool)

    # -- grading --------------------------------------------------------------------------------------------
    def grade(self, completion: str, gold: str, timeout_s: float | None = None) -> Grade:
        return self.grade_many([(completion, gold)], timeout_s=timeout_s)[0]

    def grade_many(
        self, pairs: Iterable[tuple[str, str]], progress: bool | Callable[[int], None] = False,
        timeout_s: float | None = None
    ) -> list[Grade]:
        """Grades in input order.  ``progress``: True for a tqdm bar, or a callback ``advance(n)`` called as
        answers are graded (the CLI's rich bars / log lines)."""
        timeout = float(timeout_s) if timeout_s is not None else self.timeout_s
        if not timeout > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout}")
        pairs = list(pairs)
        out: list[Grade | None] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        n_fast = 0
        for i, (completion, gold) in enumerate(pairs):
            gold = "" if gold is None else str(gold)
            pred = extract_answer(completion or "")
            if pred is not None and gold_is_multi(gold):  # a set / list gold: all boxes of the final answer
                group = last_boxed_group(completion or "")
                if len(group) > 1:
                    pred = ", ".join(group)
                    if gold.strip().strip("$").strip().startswith("\\{"):
                        pred = "\\{" + pred + "\\}"
            if pred is None or len(pred) > MAX_ANSWER_CHARS:
                pred = None
                out[i] = Grade(False, None, "no_answer")
                continue
            fast = _fast_compare(pred, gold)
            if fast is not None:
                out[i] = Grade(fast, pred, "ok")
                n_fast += 1
                continue
            todo.setdefault((pred, gold), []).append(i)

        keys = sorted(todo, key=lambda k: k[1])  # same gold together: one gold parse per chunk per worker
        pbar = None
        if callable(progress):
            pbar = _Advance(progress)
            pbar.update(len(pairs) - sum(len(v) for v in todo.values()))
        elif progress:
            try:
                from tqdm import tqdm

                pbar = tqdm(total=len(pairs), desc="verify", unit="ans", file=sys.stderr)
                pbar.update(len(pairs) - sum(len(v) for v in todo.values()))
            except Exception:
                pbar = None
        try:
            results = self._pool_grade(keys, timeout, pbar, todo) if keys else []
        finally:
            if pbar is not None:
                pbar.close()
        for key, (correct, status) in zip(keys, results):
            for i in todo[key]:
                out[i] = Grade(bool(correct), key[0], status)

        with self._lock:
            for g in out:
                self.stats[g.status] += 1  # type: ignore[union-attr]
            self.path_stats["fast"] += n_fast
            self.path_stats["pool"] += len(keys)
            self.path_stats["dedup"] += sum(len(v) - 1 for v in todo.values())
        return out  # type: ignore[return-value]

    def _schedule(self, items: list[tuple[str, str]], timeout: float):
        """Submit one chunk; a pool that broke (pebble status ERROR) is replaced once."""
        try:
            return self._get_pool().schedule(_score_chunk, args=(items, self.settings), timeout=timeout)
        except RuntimeError:
            if self._closed:
                raise
            self._drop_pool()
            return self._get_pool().schedule(_score_chunk, args=(items, self.settings), timeout=timeout)

    def _pool_grade(self, keys, timeout, pbar, todo) -> list[tuple[bool, str]]:
        n = len(keys)
        cs = max(1, min(MAX_CHUNK, math.ceil(n / (self.workers * 8))))
        results: list[tuple[bool, str] | None] = [None] * n

        def tick(idx: Iterable[int]) -> None:
            if pbar is not None:
                pbar.update(sum(len(todo[keys[j]]) for j in idx))

        # A healthy pool finishes (or times out) some task every `timeout` seconds or so. If nothing at all comes
        # back for much longer, workers cannot start (e.g. a spawn/forkserver worker failing to import the main
        # module): tasks are never picked up, so their timeouts never start. Give up on them instead of hanging.
        stall_s = 60.0 + 3.0 * timeout

        def wait_some(pending: dict) -> set:
            done, _ = wait(list(pending), timeout=stall_s, return_when=FIRST_COMPLETED)
            if done:
                return done
            log.error("verifier pool made no progress for %.0f s; %d item groups scored 'error', pool restarted",
                      stall_s, len(pending))
            for fut in pending:
                fut.cancel()
            self._drop_pool()
            return set()

        pending = {}
        for s in range(0, n, cs):
            idx = list(range(s, min(n, s + cs)))
            fut = self._schedule([keys[j] for j in idx], timeout)
            pending[fut] = idx
        retry: list[int] = []
        while pending:
            done = wait_some(pending)
            if not done:
                for idx in pending.values():
                    for j in idx:
                        results[j] = (False, "error")
                    tick(idx)
                pending = {}
                break
            for fut in done:
                idx = pending.pop(fut)
                try:
                    res = fut.result()
                except BaseException as e:  # TimeoutError, ProcessExpired, anything the worker raised
                    if len(idx) == 1:
                        results[idx[0]] = (False, "timeout" if isinstance(e, TimeoutError) else "error")
                        tick(idx)
                    else:
                        retry.extend(idx)
                        with self._lock:
                            self.path_stats["chunk_retries"] += 1
                    continue
                for j, r in zip(idx, res):
                    results[j] = (bool(r[0]), str(r[1]))
                tick(idx)

        if retry:  # one by one, so only the bad item scores timeout
            pending = {self._schedule([keys[j]], timeout): j for j in retry}
            while pending:
                done = wait_some(pending)
                if not done:
                    for j in pending.values():
                        results[j] = (False, "error")
                        tick([j])
                    break
                for fut in done:
                    j = pending.pop(fut)
                    try:
                        r = fut.result()[0]
                        results[j] = (bool(r[0]), str(r[1]))
                    except BaseException as e:
                        results[j] = (False, "timeout" if isinstance(e, TimeoutError) else "error")
                    tick([j])
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Module-level convenience API (one lazily created shared Verifier)
# --------------------------------------------------------------------------------------------------------------

_DEFAULT: Verifier | None = None
_DEFAULT_LOCK = threading.Lock()


def get_verifier(workers: int | None = None, float_rounding: int | None = None, strict: bool | None = None) -> Verifier:
    """The shared module-level Verifier (created on first use; recreated if other workers / settings are asked)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        v = _DEFAULT
        want = dict(DEFAULT_SETTINGS)
        if float_rounding is not None:
            want["float_rounding"] = int(float_rounding)
        if strict is not None:
            want["strict"] = bool(strict)
        if v is None or v.closed or (workers is not None and int(workers) != v.workers) or want != v.settings:
            if v is not None:
                v.close()
            v = _DEFAULT = Verifier(workers=workers, **want)
        return v


def _close_default() -> None:
    global _DEFAULT
    with _DEFAULT_LOCK:
        v, _DEFAULT = _DEFAULT, None
    if v is not None:
        v.close()


atexit.register(_close_default)


def grade(completion: str, gold: str, timeout_s: float = 5.0, float_rounding: int | None = None,
          strict: bool | None = None) -> Grade:
    """Grade one completion against the gold answer (hard timeout ``timeout_s`` in a worker process)."""
    return get_verifier(None, float_rounding, strict).grade(completion, gold, timeout_s=timeout_s)


class _Advance:
    """A progress callback seen as the tqdm interface ``update(n)`` / ``close()``."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def update(self, n: int) -> None:
        if n:
            self.fn(int(n))

    def close(self) -> None:
        pass


def grade_many(
    pairs: Sequence[tuple[str, str]],
    timeout_s: float = 5.0,
    workers: int | None = None,
    progress: bool | Callable[[int], None] = False,
    float_rounding: int | None = None,
    strict: bool | None = None,
) -> list[Grade]:
    """Grade (completion, gold) pairs; results in input order.  ``float_rounding`` / ``strict``: math-verify's
    settings (defaults 6 and True, as math-verify's)."""
    return get_verifier(workers, float_rounding, strict).grade_many(pairs, progress=progress, timeout_s=timeout_s)
