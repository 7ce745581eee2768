"""`sgsd inspect`: what the teachers did on one rollout of a step directory.

Reads ``rollout``, ``score_teachers``, ``polarize`` (and ``polarize_rollouts`` when present) of a step
directory; nothing is recomputed but Delta_{k,t} = t_{k,t} - s_t from the stored log-probs
(stages.engine.objectives.sgsd.delta).  Shows the problem, gold answer, verdict, each teacher's skill and
mistake, weight, support, stance, polarity and category, and the completion token by token coloured by
Delta under one teacher or the weighted sum over teachers (sum_k w_k Delta_{k,t}), in the terminal (rich)
and as a self-contained HTML page (inline CSS + JS, no network) where a click switches the teacher.

Selectors: ``rollout_id``; ``worst`` / ``best``: the rollouts whose teachers disagree / agree most with the
verifier: the largest weight share of teachers with polarity rho_k = -1 / +1, ties by agreement = o * sum_k
w_k a_k (o = +1 correct, -1 otherwise; a_k the support); ``category``:
rollouts having a teacher in that polarity category, the largest such teacher weight first.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from stages.engine.atomic import atomic_write_text
from stages.engine.errors import InputError
from stages.engine.manifest import read_manifest
from stages.engine.tableio import check_finite, read_table
from stages.engine.tables import POLARIZE, POLARIZE_ROLLOUTS, ROLLOUT, SCORE_TEACHERS
from stages.engine.objectives.sgsd import CATEGORIES, CLIP

CATEGORY_STYLE = {"helpful": "green", "warning": "cyan", "misleading": "red", "over_suppressive": "magenta",
                  "neutral": "white"}


@dataclass
class StepTables:
    step_dir: Path
    rollouts: pl.DataFrame
    scores: pl.DataFrame
    polarize: pl.DataFrame
    grades: pl.DataFrame | None
    labels: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, item_id) -> title / description
    model: str | None = None


def resolve_step_dir(path: str | Path) -> Path:
    """A step directory, or a run directory (its last ``step_*`` holding a polarize table)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such directory")
    if ROLLOUT.find(p):
        return p
    steps = sorted(d for d in p.glob("step_*") if d.is_dir() and POLARIZE.find(d))
    if steps:
        return steps[-1]
    raise InputError(p, "not a step directory (no rollout table) and holds no step_* with a polarize table")


def _bank_labels(step_dir: Path) -> dict[tuple[str, str], str]:
    """(kind, id) -> label from the bank recorded in the score_teachers manifest (or the run's bank/ history)."""
    from stages.engine.skills.bank import KINDS, item_label, load_bank

    cands: list[Path] = []
    man = SCORE_TEACHERS.manifest(step_dir)
    if man.exists():
        try:
            m = read_manifest(man)
            bank = (m.get("inputs") or {}).get("bank") or (m.get("config") or {}).get("bank")
            if bank:
                cands.append(Path(bank))
        except (OSError, ValueError):
            pass
    for d in (step_dir.parent / "bank", step_dir.parent.parent / "bank"):
        if d.is_dir():
            cands += sorted(d.glob("v*.json"), reverse=True)
    labels: dict[tuple[str, str], str] = {}
    for c in cands:
        try:
            b = load_bank(c)
        except InputError:
            continue
        for kind, (_, fields) in KINDS.items():
            for it in b.items(kind):
                labels.setdefault((kind, it[fields[0]]), item_label(kind, it))
    return labels


def load_step(step_dir: str | Path) -> StepTables:
    sd = resolve_step_dir(step_dir)
    ro = read_table(ROLLOUT.path(sd),
                    required={"rollout_id": str, "problem": str, "answer": str, "completion": str, "completion_ids": list})
    sc_path = SCORE_TEACHERS.find(sd)
    if sc_path is None:
        raise InputError(SCORE_TEACHERS.file(sd), "no teacher scores in this step (sgsd objective only; run `sgsd score-teachers`)")
    sc = read_table(sc_path, required={"rollout_id": str, "teacher_rank": int, "skill_id": str, "mistake_id": str,
                                       "weight": float, "student_logprobs": list, "teacher_logprobs": list})
    check_finite(sc, ["weight", "student_logprobs", "teacher_logprobs"], sc_path, key="rollout_id")
    po_path = POLARIZE.path(sd)
    po = read_table(po_path, required={"rollout_id": str, "teacher_rank": int, "support": float, "stance": int,
                                       "polarity": int, "category": str, "correct": bool, "outcome": int,
                                       "token_mask": list})
    check_finite(po, ["support"], po_path, key="rollout_id")
    gp = POLARIZE_ROLLOUTS.find(sd)
    grades = read_table(gp, required={"rollout_id": str, "correct": bool}) if gp else None
    model = ro["model"][0] if "model" in ro.columns and ro.height else None
    return StepTables(sd, ro, sc, po, grades, _bank_labels(sd), model)


def teacher_table(t: StepTables) -> pl.DataFrame:
    """One row per (rollout, teacher): the score_teachers row joined with its polarize row."""
    keep = [c for c in ("rollout_id", "teacher_rank", "skill_id", "mistake_id", "skill_score", "mistake_score",
                        "weight", "student_logprobs", "teacher_logprobs") if c in t.scores.columns]
    pcols = [c for c in ("rollout_id", "teacher_rank", "correct", "outcome", "support", "stance", "polarity",
                         "category", "token_mask", "n_mask", "clipped_frac") if c in t.polarize.columns]
    return t.scores.select(keep).join(t.polarize.select(pcols), on=["rollout_id", "teacher_rank"], how="inner")


def agreement(t: StepTables) -> pl.DataFrame:
    """Per rollout: agreement = o * sum_k w_k a_k (how much the teachers' weighted support agrees with the
    verifier), disagree / agree = the weight share of its teachers whose polarity rho_k = o * sigma_k is -1 / +1
    (the teachers that contradict / confirm the verifier's verdict)."""
    tt = teacher_table(t)
    w = pl.col("weight")
    share = (lambda sign: (w * (pl.col("polarity") == sign).cast(pl.Float64)).sum() / w.sum()) \
        if "polarity" in tt.columns else (lambda sign: pl.lit(0.0))
    return (tt.group_by("rollout_id", maintain_order=True)
            .agg(outcome=pl.col("outcome").first(), ws=(w * pl.col("support")).sum(), disagree=share(-1),
                 agree=share(1))
            .with_columns(agreement=pl.col("outcome") * pl.col("ws")).drop("ws"))


def select_rollouts(t: StepTables, *, rollout_id: str | None = None, worst: bool = False, best: bool = False,
                    category: str | None = None, limit: int = 1) -> list[str]:
    """Rollout ids picked by the selectors (docstring of the module); the first rollout when none is given."""
    if sum(bool(x) for x in (rollout_id, worst, best)) > 1:
        raise InputError(None, "give at most one of --rollout, --worst, --best")
    ids = t.rollouts["rollout_id"].to_list()
    if rollout_id:
        if rollout_id not in set(ids):
            near = ", ".join(ids[:5])
            raise InputError(t.step_dir, f"no rollout '{rollout_id}' in this step (e.g. {near})")
        return [rollout_id]
    ag = agreement(t)
    if category:
        if category not in CATEGORIES:
            raise InputError(None, f"--category must be one of {', '.join(CATEGORIES)}, not '{category}'")
        hit = (teacher_table(t).filter(pl.col("category") == category).group_by("rollout_id")
               .agg(w=pl.col("weight").max()))
        if hit.height == 0:
            raise InputError(t.step_dir, f"no teacher is '{category}' in this step")
        ag = ag.join(hit, on="rollout_id", how="inner").sort(["w", "agreement"], descending=[True, not best])
    elif worst:  # most teacher weight against the verdict; then the weighted support most against it
        ag = ag.sort(["disagree", "agreement"], descending=[True, False])
    elif best:
        ag = ag.sort(["agree", "agreement"], descending=[True, True])
    else:
        return ids[:max(1, limit)]
    return ag["rollout_id"].head(max(1, limit)).to_list()


def weighted_delta(deltas: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    """sum_k w_k Delta_{k,t} per token (the teachers' weighted view of each token)."""
    if not deltas:
        return []
    T = len(deltas[0])
    return [sum(w * d[i] for w, d in zip(weights, deltas)) for i in range(T)]


def token_pieces(ids: Sequence[int], tokenizer) -> list[str]:
    """Text of each token (the tokenizer's decode of that id alone); ``<id>`` without a tokenizer."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    ids = [int(i) for i in ids]
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # a character split over byte-level tokens decodes to U+FFFD alone: give it to its first token (the others
    # show nothing), so each token still has one piece
    i = 0
    while i < len(ids):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(len(ids), i + 4) + 1):
                text = tokenizer.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if "\ufffd" not in text:
                    pieces[i:j] = [text] + [""] * (j - i - 1)
                    i = j - 1
                    break
        i += 1
    return pieces


def tokenizer_candidates(t: StepTables) -> list[str]:
    """Where the rollout's tokenizer may be: the rollout model, this step's checkpoint, later steps' checkpoints
    (old ones are pruned by keep_last), the loop's initial model."""
    c = [t.model] if t.model else []
    run = t.step_dir.parent
    c += [str(d) for d in [t.step_dir / "checkpoint"] + sorted(run.glob("step_*/checkpoint")) if d.is_dir()]
    lc = run / "loop_config.json"
    if lc.exists():
        try:
            c.append(json.loads(lc.read_text()).get("loop", {}).get("model") or "")
        except (OSError, ValueError, AttributeError):
            pass
    return [x for x in dict.fromkeys(c) if x]


def load_tokenizer(*paths: str | None):
    """The first tokenizer found among ``paths`` (local folders or the hub cache, never the network); None if none."""
    from transformers import AutoTokenizer

    for path in paths:
        if not path:
            continue
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not here: try the next one; none -> tokens are shown as ids
            continue
    return None


def rollout_view(t: StepTables, rollout_id: str, tokenizer=None) -> dict[str, Any]:
    """Everything shown about one rollout (JSON-able): texts, verdict, teachers, tokens, Delta per teacher."""
    from stages.engine.objectives.sgsd import delta

    import torch

    r = t.rollouts.filter(pl.col("rollout_id") == rollout_id).row(0, named=True)
    tt = teacher_table(t).filter(pl.col("rollout_id") == rollout_id).sort("teacher_rank")
    if tt.height == 0:
        raise InputError(t.step_dir, f"rollout '{rollout_id}' has no teacher rows in score_teachers / polarize")
    ids = list(r["completion_ids"])
    T = len(ids)
    teachers, deltas = [], []
    for row in tt.iter_rows(named=True):
        s, tl = row["student_logprobs"], row["teacher_logprobs"]
        if len(s) != T or len(tl) != T:
            raise InputError(SCORE_TEACHERS.path(t.step_dir),
                             f"rollout '{rollout_id}' teacher {row['teacher_rank']}: {len(tl)} teacher / {len(s)} "
                             f"student log-probs for {T} completion tokens")
        d = delta(torch.tensor(tl, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)).tolist()
        deltas.append(d)
        teachers.append({
            "rank": row["teacher_rank"], "skill_id": row["skill_id"], "mistake_id": row["mistake_id"],
            "skill": t.labels.get(("skill", row["skill_id"]), ""), "mistake": t.labels.get(("mistake", row["mistake_id"]), ""),
            "weight": row["weight"], "support": row["support"], "stance": row["stance"], "polarity": row["polarity"],
            "category": row["category"], "n_mask": row.get("n_mask"), "clipped_frac": row.get("clipped_frac"),
        })
    mask = list(tt["token_mask"][0]) if tt["token_mask"][0] is not None else [True] * T
    if len(mask) != T:
        mask = (mask + [True] * T)[:T]
    correct = bool(tt["correct"][0])
    status, pred = None, None
    if t.grades is not None:
        g = t.grades.filter(pl.col("rollout_id") == rollout_id)
        if g.height:
            status = g["status"][0] if "status" in g.columns else None
            pred = g["pred"][0] if "pred" in g.columns else None
    ag = agreement(t).filter(pl.col("rollout_id") == rollout_id)["agreement"][0]
    return {
        "step_dir": str(t.step_dir), "rollout_id": rollout_id, "problem_id": r.get("problem_id"),
        "problem": r["problem"], "answer": r["answer"], "completion": r["completion"], "correct": correct,
        "status": status, "pred": pred, "finish_reason": r.get("finish_reason"), "agreement": ag,
        "teachers": teachers, "tokens": token_pieces(ids, tokenizer), "token_ids": ids, "mask": mask,
        "deltas": deltas, "weighted": weighted_delta(deltas, [x["weight"] for x in teachers]),
    }


# --------------------------------------------------------------------------------------------------
# rendering


def delta_rgb(d: float, clip: float = CLIP) -> tuple[int, int, int]:
    """Background colour of a token: white at 0, green (teacher supports) / red (suppresses) at +-clip; both ends
    light enough for black text (contrast about 7:1 at the red end, 9:1 at the green)."""
    x = max(-1.0, min(1.0, d / clip))
    a = abs(x)
    if x >= 0:
        return (round(255 - 200 * a), round(255 - 60 * a), round(255 - 200 * a))
    return (round(255 - 20 * a), round(255 - 145 * a), round(255 - 145 * a))


def render_terminal(view: dict, teacher: str = "weighted"):
    """A rich renderable: header, teacher table, coloured completion (teacher 'weighted' or a rank)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    verdict = "correct" if view["correct"] else "wrong"
    head = Text()
    head.append(f"{view['rollout_id']}", style="bold")
    head.append("  verdict: ", style="dim")
    head.append(verdict, style="bold green" if view["correct"] else "bold red")
    if view.get("status"):
        head.append(f" ({view['status']})", style="dim")
    head.append(f"  pred: {view.get('pred')!s}  gold: {view['answer']}  agreement o*sum w*a: {view['agreement']:+.3f}")
    prob = Text("problem: ", style="dim")
    prob.append(view["problem"])
    tab = Table(title="teachers", title_justify="left", expand=False)
    for c, kw in (("k", {"justify": "right"}), ("skill", {"overflow": "fold", "ratio": 2}),
                  ("mistake", {"overflow": "fold", "ratio": 2}), ("w", {"justify": "right"}),
                  ("a_k", {"justify": "right"}), ("σ", {"justify": "right"}), ("ρ", {"justify": "right"}),
                  ("category", {"no_wrap": True})):
        tab.add_column(c, **kw)
    for x in view["teachers"]:
        tab.add_row(str(x["rank"]), Text(f"{x['skill_id']} {x['skill']}".strip()),
                    Text(f"{x['mistake_id']} {x['mistake']}".strip()), f"{x['weight']:.3f}", f"{x['support']:+.3f}",
                    f"{x['stance']:+d}", f"{x['polarity']:+d}",
                    Text(x["category"], style=CATEGORY_STYLE.get(x["category"], "")))
    vals, label = _values(view, teacher)
    body = Text()
    for tok, d, m in zip(view["tokens"], vals, view["mask"]):
        if not m:
            body.append(tok, style="dim")
        else:
            r, g, b = delta_rgb(d)
            body.append(tok, style=f"black on rgb({r},{g},{b})")
    legend = Text(f"completion coloured by {label}: green = teacher supports the token (Δ > 0), red = suppresses, "
                  f"saturated at |Δ| = {CLIP:g}; dim = outside the mask m_t", style="dim")
    return Group(head, prob, tab, legend, body)


def _values(view: dict, teacher: str) -> tuple[list[float], str]:
    if teacher in ("weighted", "sum", "w"):
        return view["weighted"], "Σ_k w_k Δ_k"
    try:
        k = int(teacher)
    except ValueError:
        raise InputError(None, f"--teacher must be 'weighted' or a teacher rank, not '{teacher}'") from None
    ranks = [x["rank"] for x in view["teachers"]]
    if k not in ranks:
        raise InputError(None, f"--teacher {k}: this rollout has teachers {ranks}")
    return view["deltas"][ranks.index(k)], f"Δ of teacher {k}"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:17px;margin-top:32px;border-top:1px solid #ddd;padding-top:16px}
.meta span{margin-right:18px} .ok{color:#1a7f37;font-weight:bold} .bad{color:#cf222e;font-weight:bold}
pre.problem{white-space:pre-wrap;background:#f6f8fa;padding:10px;border-radius:6px}
table{border-collapse:collapse;margin:10px 0;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.teacher{cursor:pointer} tr.teacher:hover{background:#f0f6ff} tr.sel{outline:2px solid #0969da}
.cat-helpful{color:#1a7f37}.cat-warning{color:#0a7ea4}.cat-misleading{color:#cf222e}.cat-over_suppressive{color:#8250df}
.cat-neutral{color:#666}
.buttons button{margin:2px;padding:4px 10px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
.buttons button.sel{background:#0969da;color:#fff;border-color:#0969da}
.completion{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;white-space:pre-wrap;line-height:1.7;
 border:1px solid #ddd;padding:10px;border-radius:6px}
.completion span{color:#111;box-shadow:inset -1px 0 0 rgba(0,0,0,.28);border-radius:2px}
.completion span.off{color:#999;box-shadow:none} .legend{font-size:12px;color:#555}
.scale{display:inline-block;width:200px;height:10px;vertical-align:middle;
 background:linear-gradient(90deg,rgb(235,110,110),#fff,rgb(55,195,55))}
"""

_JS = """
function rgb(d){var x=Math.max(-1,Math.min(1,d/CLIP)),a=Math.abs(x);
 return x>=0?'rgb('+Math.round(255-200*a)+','+Math.round(255-60*a)+','+Math.round(255-200*a)+')'
 :'rgb('+Math.round(255-20*a)+','+Math.round(255-145*a)+','+Math.round(255-145*a)+')';}
function show(i,which){var v=VIEWS[i],vals=which==='w'?v.weighted:v.deltas[which];
 var spans=document.querySelectorAll('#comp'+i+' span');
 for(var t=0;t<spans.length;t++){var s=spans[t];
  if(v.mask[t]){s.style.background=rgb(vals[t]);s.title='token '+t+' \\u0394 = '+vals[t].toFixed(3);}
  else{s.style.background='transparent';s.title='token '+t+' (outside m_t) \\u0394 = '+vals[t].toFixed(3);}}
 document.querySelectorAll('#r'+i+' .buttons button').forEach(function(b){b.classList.toggle('sel',b.dataset.t===String(which));});
 document.querySelectorAll('#r'+i+' tr.teacher').forEach(function(r){r.classList.toggle('sel',r.dataset.t===String(which));});
 document.getElementById('lab'+i).textContent=which==='w'?'\\u03a3 w_k \\u0394_k (weighted over teachers)':'\\u0394 of teacher '+v.teachers[which].rank;}
document.addEventListener('click',function(e){var el=e.target.closest('[data-t]');if(!el)return;
 var i=+el.closest('section').dataset.i,t=el.dataset.t;show(i,t==='w'?'w':+t);});
for(var i=0;i<VIEWS.length;i++)show(i,'w');
"""


def script_json(data) -> str:
    """JSON to embed in a <script>: ``<``, ``>``, ``&`` (and U+2028/9) as \\u escapes, so no string in it (model or
    skill text: ``</script>``, ``<!--<script>``) can end or change the script element.  Still the same JSON value."""
    out = json.dumps(data, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(ch, esc)
    return out


def render_html(views: Sequence[dict], title: str = "sgsd inspect") -> str:
    """One self-contained page (inline CSS/JS, no external resource) for the given rollout views.  Every value from
    the tables is escaped (a cell of any type); numbers are formatted before they reach the page."""

    def e(x) -> str:
        return html.escape("" if x is None else str(x))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head>"
             f"<body><h1>{e(title)}</h1><p class='legend'>Each token is coloured by Δ<sub>k,t</sub> = t<sub>k,t</sub> − "
             f"s<sub>t</sub> (teacher minus student log-prob of the sampled token): "
             f"<span class='scale'></span> red = suppressed, green = supported, saturated at |Δ| = {CLIP:g}; "
             "grey text = outside the mask m<sub>t</sub>. Click a teacher (row or button) to switch; "
             "hover a token for its value.</p>"]
    for i, v in enumerate(views):
        verdict = "<span class='ok'>correct</span>" if v["correct"] else "<span class='bad'>wrong</span>"
        parts.append(f"<section id='r{i}' data-i='{i}'><h2>{e(v['rollout_id'])}</h2><div class='meta'>"
                     f"<span>verdict: {verdict}{' (' + e(str(v['status'])) + ')' if v.get('status') else ''}</span>"
                     f"<span>gold: <b>{e(str(v['answer']))}</b></span><span>extracted: {e(str(v.get('pred')))}</span>"
                     f"<span>finish: {e(str(v.get('finish_reason')))}</span>"
                     f"<span>agreement o·Σw·a = {v['agreement']:+.3f}</span></div>"
                     f"<pre class='problem'>{e(v['problem'])}</pre>")
        parts.append("<table><tr><th>k</th><th>skill</th><th>mistake</th><th>weight</th><th>support a<sub>k</sub></th>"
                     "<th>stance σ</th><th>polarity ρ</th><th>category</th><th>N</th><th>clipped</th></tr>")
        for j, x in enumerate(v["teachers"]):
            clipped = "" if x.get("clipped_frac") is None else f"{x['clipped_frac']:.3f}"
            parts.append(f"<tr class='teacher' data-t='{j}'><td class='num'>{e(str(x['rank']))}</td>"
                         f"<td><code>{e(x['skill_id'])}</code> {e(x['skill'])}</td>"
                         f"<td><code>{e(x['mistake_id'])}</code> {e(x['mistake'])}</td>"
                         f"<td class='num'>{x['weight']:.3f}</td><td class='num'>{x['support']:+.3f}</td>"
                         f"<td class='num'>{x['stance']:+d}</td><td class='num'>{x['polarity']:+d}</td>"
                         f"<td class='cat-{e(x['category'])}'>{e(x['category'])}</td>"
                         f"<td class='num'>{'' if x.get('n_mask') is None else e(str(x['n_mask']))}</td>"
                         f"<td class='num'>{clipped}</td></tr>")
        parts.append("</table><div class='buttons'>colour by: <button data-t='w'>weighted Σ w·Δ</button>"
                     + "".join(f"<button data-t='{j}'>teacher {e(str(x['rank']))}</button>" for j, x in enumerate(v["teachers"]))
                     + f"</div><p class='legend' id='lab{i}'></p><div class='completion' id='comp{i}'>")
        parts.append("".join(f"<span{'' if m else ' class=off'}>{e(tok)}</span>" for tok, m in zip(v["tokens"], v["mask"])))
        parts.append("</div></section>")
    data = [{k: v[k] for k in ("deltas", "weighted", "mask", "teachers")} for v in views]
    blob = script_json(data)
    parts.append(f"<script>var CLIP={CLIP!r};var VIEWS={blob};{_JS}</script></body></html>")
    return "".join(parts)


def write_html(views: Sequence[dict], path: str | Path, title: str = "sgsd inspect") -> Path:
    return atomic_write_text(path, render_html(views, title))
