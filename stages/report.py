"""`sgsd report`: plots and summaries from the tables the stages already wrote (nothing is recomputed).

* :func:`load_run` -> per-step metrics of a run: ``metrics.parquet`` of ``sgsd loop`` (one row per loop step),
  for a standalone ``sgsd train`` run its ``train.parquet`` (one row per optimizer step), for a stage-by-stage
  run (shell recipes, scripts/smoke.sh) the rows rebuilt from its ``step_N/`` folders; plus every eval
  summary found (``step_*/eval/summary.parquet`` and ``eval/summary.parquet``).
* :func:`write_report` -> PNG files (matplotlib) and one self-contained HTML page embedding them; several
  runs are overlaid with a legend.
* :func:`run_summary` / :func:`eval_summary` -> short rich tables printed at the end of ``sgsd loop`` /
  ``sgsd eval``, readable at 80 columns; :func:`compare_view` is ``eval --compare`` with protocol, n and
  problem count per row.
* :func:`skill_stats` -> per bank item over a whole run: times retrieved (teacher rows holding it) and its
  teachers' helpful / warning / misleading / over_suppressive / neutral counts.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from stages.engine.alarms import alarm_column
from stages.engine.tables import METRICS, POLARIZE, SCORE_TEACHERS, TRAIN
from stages.engine.atomic import atomic_write_bytes, atomic_write_text
from stages.engine.errors import InputError
from stages.engine.manifest import read_manifest
from stages.engine.tableio import read_table
from stages.engine.objectives.sgsd import CATEGORIES

STAGE_WALLS = ("rollout", "score_teachers", "polarize", "grade", "train", "eval", "skills")


def _step_no(p: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", p.name)
    return int(m.group(1)) if m else None


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    return sorted((n, d) for d in run_dir.glob("step_*") if d.is_dir() and (n := _step_no(d)) is not None)


def steps_metrics(run_dir: Path) -> pl.DataFrame | None:
    """The loop's per-step metrics rebuilt from a stage-by-stage run's ``step_N/`` folders (each with its train
    table): what ``sgsd loop`` would have written to metrics.parquet.  None when no step has trained."""
    from stages.engine.step_metrics import step_metrics  # lazy: loads torch

    rows = []
    for n, d in step_dirs(run_dir):
        if not TRAIN.file(d).exists():
            continue
        objective = "sgsd" if POLARIZE.file(d).exists() else "grpo"
        try:
            objective = read_manifest(TRAIN.manifest(d))["config"]["objective"]
        except (OSError, KeyError, TypeError, ValueError):
            pass
        try:
            rows.append(step_metrics(d, n, objective))
        except (InputError, OSError, pl.exceptions.PolarsError):
            continue  # a step whose rollout table is missing: nothing to plot for it
    return pl.DataFrame(rows, infer_schema_length=None) if rows else None


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """{'name', 'path', 'kind' (loop | train), 'metrics' (DataFrame with a 'step' column), 'evals'
    (DataFrame: step, bench, n, problems, avg_at_n, avg_at_n_se, protocol)}."""
    p = Path(run_dir)
    if not p.is_dir():
        raise InputError(p, "not a run directory")
    if METRICS.file(p).exists():
        m = read_table(METRICS.file(p), required={"step": int})
        kind = "loop"
    elif TRAIN.find(p):
        m = read_table(TRAIN.find(p), required={"policy_step": int, "loss": float})
        # a standalone train run: x = optimizer step; rename to the loop's metric names where they match
        m = m.with_columns(pl.col("policy_step").alias("step")).rename(
            {k: v for k, v in {"accuracy": "reward", "mean_support": "support_mean", "completion_len": "completion_len_mean",
                               "clip_frac": "clipped_frac_grpo"}.items() if k in m.columns and v not in m.columns})
        kind = "train"
    elif (m := steps_metrics(p)) is not None:
        kind = "steps"  # stage by stage (scripts/recipe_*.sh, scripts/smoke.sh): step_N/ folders, no metrics.parquet
    else:
        m = pl.DataFrame({"step": []}, schema={"step": pl.Int64})
        kind = "eval"
    evals = []
    cands = [(n, d / "eval" / "summary.parquet") for n, d in step_dirs(p)] + [(None, p / "eval" / "summary.parquet")]
    for n, sp in cands:
        if sp.exists():
            s = read_table(sp, required={"bench": str, "avg_at_n": float})
            cols = [c for c in ("bench", "n", "problems", "avg_at_n", "avg_at_n_se", "protocol") if c in s.columns]
            evals.append(s.select(cols).with_columns(step=pl.lit(n, dtype=pl.Int64)))
    if kind in ("loop", "steps") and m.height and "alarms" not in m.columns:  # older loops, stage-by-stage runs
        m = m.sort("step")
        m = m.with_columns(pl.Series("alarms", alarm_column(m.to_dicts()), dtype=pl.String))
    ev = pl.concat(evals, how="diagonal_relaxed") if evals else None
    if m.height == 0 and ev is None:
        raise InputError(p, "no metrics.parquet, train table or eval summary here (run `sgsd loop`, `sgsd train` or `sgsd eval`)")
    return {"name": p.name if p.name else str(p), "path": p, "kind": kind, "metrics": m, "evals": ev}


# --------------------------------------------------------------------------------------------------
# plots

PANELS: list[tuple[str, str, list[str], str]] = [
    # (file stem, title, columns, y-axis label with its unit); polarity: one small axes per category
    ("reward", "reward / accuracy per step", ["reward"], "fraction of rollouts correct"),
    ("loss", "loss", ["loss"], "loss (objective's units, mean per step)"),
    ("polarity", "polarity fractions", [f"frac_{c}" for c in CATEGORIES], "fraction of teachers"),
    ("support", "mean support a_k", ["support_mean", "support_abs_mean"], "a_k (log-prob units)"),
    ("clipped", "clipped fraction (|Δ| > 3)", ["clipped_frac"], "fraction of tokens"),
    ("lengths", "completion length (tokens)", ["completion_len_mean", "completion_len_max"], "tokens"),
    ("truncated", "truncated fraction", ["truncated_frac"], "fraction of rollouts"),
    ("health", "collapse health (stages/engine/health.py); dotted lines: steps with an alarm (stages/engine/alarms.py)",
     ["completion_len_mean", "truncated_frac", "format_rate", "entropy_mean", "sampled_nll_mean",
      "teacher_weight_entropy"], "tokens / fraction / nats"),
    ("dynamic_sampling", "GRPO dynamic sampling: share of drawn groups dropped, extra prompts drawn",
     ["ds_drop_frac", "ds_extra_prompts", "ds_groups_kept"], "fraction / prompts"),
    ("agreement", "engine/trainer agreement on sampled tokens (|Δ logp|, k3 KL, share over threshold, refresh probe)",
     ["agree_abs_mean", "agree_abs_max", "agree_kl", "agree_frac_over", "probe_gap_mean"], "nats / fraction"),
    ("grad_norm", "grad norm (before clipping)", ["grad_norm"], "L2 norm"),
    ("lr", "learning rate", ["lr"], "learning rate"),
    ("tokens_per_s", "train tokens / s", ["tokens_per_s"], "tokens / s"),
    ("wall", "wall time per stage", [f"wall_{s}_s" for s in STAGE_WALLS] + ["wall_s"], "seconds"),
]

# one small axes per column (the wall times share one axes, hence one scale)
SPLIT = {"polarity", "agreement", "health", "dynamic_sampling"}
PRETTY = {**{f"wall_{s}_s": s for s in STAGE_WALLS}, "wall_s": "train step", **{f"frac_{c}": c for c in CATEGORIES},
          "completion_len_mean": "mean", "completion_len_max": "max", "support_mean": "mean a_k",
          "support_abs_mean": "mean |a_k|", "entropy_mean": "token entropy (nats)",
          "sampled_nll_mean": "sampled-token NLL (nats)", "teacher_weight_entropy": "teacher-weight entropy (nats)",
          "format_rate": "format rate (boxed answer)", "truncated_frac": "truncated fraction",
          "ds_drop_frac": "groups dropped (share)", "ds_extra_prompts": "extra prompts", "ds_groups_kept": "groups kept"}


TITLES = {"completion_len_mean": "completion length (mean, tokens)"}  # a split panel's axes title, where PRETTY is short


def alarm_steps(run: dict) -> list[int]:
    """The steps of a run whose ``alarms`` column is not empty."""
    m = run["metrics"]
    if "alarms" not in m.columns:
        return []
    return [int(n) for n, a in zip(m["step"].to_list(), m["alarms"].to_list()) if a]


def x_label(runs: Sequence[dict]) -> str:
    """The x axis actually plotted: loop steps (metrics.parquet or a stage-by-stage run's step_N folders) or
    optimizer steps (a standalone train table)."""
    kinds = {"train" if r["kind"] == "train" else "loop" for r in runs}
    if kinds == {"train"}:
        return "optimizer step"
    return "loop step" if kinds == {"loop"} else "loop step (loop runs) / optimizer step (train runs)"


def _label(run: dict, runs: Sequence[dict]) -> str:
    names = [r["name"] for r in runs]
    return run["name"] if names.count(run["name"]) == 1 else str(run["path"])


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_panel(runs: Sequence[dict], title: str, columns: Sequence[str], path: Path, split: bool = False,
               ylabel: str = "") -> Path | None:
    """One PNG: each run a colour; several columns are line styles of one axes, or with ``split`` one small
    axes each.  None when no run has any of the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols_used = [c for c in columns if any(c in r["metrics"].columns and r["metrics"][c].drop_nulls().len() > 0
                                           for r in runs)]
    if not cols_used:
        return None
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1)), (0, (5, 3))]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = [[c] for c in cols_used] if split else [cols_used]
    nc = min(3, len(groups))
    nr = math.ceil(len(groups) / nc)
    fig, axes = plt.subplots(nr, nc, figsize=(6.4 if nc == 1 else 4.2 * nc, 3.6 if nr == 1 else 2.9 * nr),
                             dpi=110, squeeze=False)
    for gi, group in enumerate(groups):
        ax = axes[gi // nc][gi % nc]
        for ri, r in enumerate(runs):
            m = r["metrics"].sort("step")
            for ci, c in enumerate(group):
                if c not in m.columns:
                    continue
                d = m.select("step", c).drop_nulls()
                if d.height == 0:
                    continue
                lab = " ".join(x for x in ((_label(r, runs) if len(runs) > 1 else ""),
                                           (PRETTY.get(c, c) if len(group) > 1 else "")) if x) or PRETTY.get(c, c)
                ki = ri if len(runs) > 1 else ci  # one run: a colour per column, several: a colour per run
                ax.plot(d["step"].to_list(), d[c].cast(pl.Float64).to_list(), color=colors[ki % len(colors)],
                        linestyle=styles[ci % len(styles)], marker="o" if d.height < 30 else None, markersize=3,
                        label=lab)
        for ri, r in enumerate(runs):  # the steps where a collapse alarm fired (several runs: the run's colour)
            if not any(c in r["metrics"].columns and r["metrics"][c].drop_nulls().len() for c in group):
                continue  # only on the axes that show this run
            for x in alarm_steps(r):
                ax.axvline(x, color="red" if len(runs) == 1 else colors[ri % len(colors)], linestyle=":", linewidth=1.2,
                           alpha=0.8)
        ax.set_title(TITLES.get(group[0], PRETTY.get(group[0], group[0])) if split else title, fontsize=10 if split else 12)
        ax.set_xlabel(x_label(runs), fontsize=9)
        if ylabel and (not split or gi % nc == 0):
            ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.tick_params(labelsize=9)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        if ylabel == "seconds":
            ax.set_ylim(bottom=0)
        if all(c.startswith("frac_") for c in group):  # polarity shares: the whole [0, 1] range
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(group) > 1:
            ax.legend(fontsize=7, loc="best")
    for gi in range(len(groups), nr * nc):
        axes[gi // nc][gi % nc].axis("off")
    if split:
        fig.suptitle(title)
    fig.tight_layout()
    return atomic_write_bytes(path, _png(fig))


def _step_axis(ax) -> None:
    """An axis over steps: integer ticks, small labels, a light grid, the legend."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_evals(runs: Sequence[dict], path: Path) -> Path | None:
    """avg@n with its standard error per benchmark over steps, every run overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(r, r["evals"]) for r in runs if r["evals"] is not None]
    if not data:
        return None
    benches = []
    for _, e in data:
        benches += [b for b in e["bench"].unique(maintain_order=True).to_list() if b not in benches]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(benches), figsize=(max(6.4, 3.4 * len(benches)), 3.6), dpi=110, squeeze=False)
    for bi, b in enumerate(benches):
        ax = axes[0][bi]
        for ri, (r, e) in enumerate(data):
            d = e.filter(pl.col("bench") == b).sort("step", nulls_last=True)
            if d.height == 0:
                continue
            last = max([s for s in d["step"].to_list() if s is not None] or [0])
            xs = [s if s is not None else last + 1 for s in d["step"].to_list()]  # a final eval/ after the steps
            ys = [100 * v for v in d["avg_at_n"].to_list()]
            se = [100 * v if v is not None and not math.isnan(v) else 0.0 for v in
                  (d["avg_at_n_se"].to_list() if "avg_at_n_se" in d.columns else [0.0] * d.height)]
            n = d["n"][0] if "n" in d.columns else None
            P = d["problems"][0] if "problems" in d.columns else None
            ax.errorbar(xs, ys, yerr=se, color=colors[ri % len(colors)], marker="o", markersize=3, capsize=3,
                        label=f"{_label(r, runs)} (n={n}, {P} problems)")
        ax.set_title(f"{b}: avg@n ± se")
        ax.set_xlabel("loop step (last: the run's final eval/)" if any(s is None for s in d["step"].to_list())
                      else "loop step", fontsize=9)
        if bi == 0:
            ax.set_ylabel("avg@n (% correct)", fontsize=9)
        _step_axis(ax)
    fig.tight_layout()
    return atomic_write_bytes(path, _png(fig))


def plot_checkpoint_choice(run: dict, path: Path) -> Path | None:
    """``sgsd eval --checkpoints``: the validation curve (avg@n ± se per saved step; with several seeds the band of
    the seeds' min..max) with the chosen step marked, and the test sets' avg@n ± se at that step.  None when the
    run directory has no ``select/validation.parquet`` and ``select/choice.parquet``."""
    sel = Path(run["path"]) / "select"
    if not ((sel / "validation.parquet").exists() and (sel / "choice.parquet").exists()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = read_table(sel / "validation.parquet", required={"step": int, "bench": str, "avg_at_n": float})
    choice = read_table(sel / "choice.parquet", required={"rule": str, "step": int, "val_bench": str}).row(0, named=True)
    test = (read_table(sel / "test.parquet", required={"bench": str, "avg_at_n": float})
            if (sel / "test.parquet").exists() else None)
    v = val.filter(pl.col("bench") == choice["val_bench"]).sort("step")
    pct = lambda xs: [100 * x if x is not None and not math.isnan(x) else float("nan") for x in xs]  # noqa: E731
    se = pct(v["avg_at_n_se"].to_list()) if "avg_at_n_se" in v.columns else [0.0] * v.height
    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=110)
    xs = v["step"].to_list()
    ax.errorbar(xs, pct(v["avg_at_n"].to_list()), yerr=[0.0 if math.isnan(e) else e for e in se], marker="o",
                markersize=3, capsize=3, color="C0", label=f"validation {choice['val_bench']} (all saved steps)")
    if "seeds" in v.columns and (v["seeds"].max() or 1) > 1:
        ax.fill_between(xs, pct(v["seed_min"].to_list()), pct(v["seed_max"].to_list()), color="C0", alpha=0.15,
                        label=f"validation: min..max over {v['seeds'].max()} seeds")
    ax.axvline(choice["step"], color="0.4", linestyle="--", linewidth=1,
               label=f"chosen: step {choice['step']} ({choice['rule']})")
    if test is not None:
        for i, r in enumerate(test.iter_rows(named=True)):
            e = r.get("avg_at_n_se")
            ax.errorbar([choice["step"]], [100 * r["avg_at_n"]], yerr=[0.0 if e is None or math.isnan(e) else 100 * e],
                        marker="s" if r["bench"] != "mean" else "D", markersize=5, capsize=3, linestyle="none",
                        color=f"C{(i + 1) % 10}", label=f"test {r['bench']} (chosen step only)")
    ax.set_title("checkpoint choice: validation curve, test at the chosen step", fontsize=11)
    ax.set_xlabel("policy step (optimizer steps)", fontsize=9)
    ax.set_ylabel("avg@n (% correct) ± se", fontsize=9)
    _step_axis(ax)
    fig.tight_layout()
    return atomic_write_bytes(path, _png(fig))


def checkpoint_choice_figs(runs: Sequence[dict], out: Path) -> list[tuple[str, Path]]:
    """The checkpoint-choice figure of every run that has one (``checkpoint_choice.png``, a suffix per run)."""
    figs = []
    for i, r in enumerate(runs):
        p = plot_checkpoint_choice(r, out / ("checkpoint_choice.png" if len(runs) == 1 else f"checkpoint_choice_{i}.png"))
        if p:
            figs.append((f"checkpoint choice of {_label(r, runs)}: validation avg@n per saved step, test at the chosen step", p))
    return figs


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """PNGs + ``report.html`` (the PNGs embedded as data: URIs, so the page is one self-contained file)."""
    runs = [load_run(r) for r in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, Path]] = []
    p = plot_evals(runs, out / "eval_avg_at_n.png")
    if p:
        figs.append(("eval avg@n ± standard error per benchmark", p))
    figs += checkpoint_choice_figs(runs, out)
    for stem, title, cols, ylabel in PANELS:
        p = plot_panel(runs, title, cols, out / f"{stem}.png", split=stem in SPLIT, ylabel=ylabel)
        if p:
            figs.append((title, p))
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sgsd report</title><style>"
             "body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
             ".grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #ddd;padding:6px}"
             "figcaption{font-size:13px;color:#555}img{max-width:100%;height:auto;display:block}"
             "table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px}"
             "td.num{text-align:right}</style></head><body><h1>sgsd report</h1><table><tr><th>run</th><th>kind</th>"
             "<th>steps</th><th>path</th></tr>"]
    for r in runs:
        parts.append(f"<tr><td>{e(_label(r, runs))}</td><td>{e(str(r['kind']))}</td><td class='num'>{r['metrics'].height}</td>"
                     f"<td>{e(str(r['path']))}</td></tr>")
    parts.append("</table><div class='grid'>")
    for title, p in figs:
        b64 = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<figure><img alt='{e(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{e(title)} ({e(p.name)})</figcaption></figure>")
    parts.append("</div>")
    for r in runs:
        m = r["metrics"]
        if "alarms" in m.columns and alarm_steps(r):
            parts.append(f"<h2>collapse alarms of {e(_label(r, runs))}</h2><table><tr><th>step</th><th>alarms</th></tr>")
            for n, a in zip(m["step"].to_list(), m["alarms"].to_list()):
                if a:
                    parts.append(f"<tr><td class='num'>{e(str(n))}</td><td>{e(str(a))}</td></tr>")
            parts.append("</table>")
    for r in runs:
        try:
            st = skill_stats(r["path"])
        except InputError:
            continue
        parts.append(f"<h2>skills of {e(_label(r, runs))}: retrieved and their teachers' polarity over the run</h2>"
                     "<table><tr><th>kind</th><th>id</th><th>item</th><th>retrieved</th>"
                     + "".join(f"<th>{c}</th>" for c in CATEGORIES) + "</tr>")
        for x in st.iter_rows(named=True):
            parts.append(f"<tr><td>{e(str(x['kind']))}</td><td>{e(str(x['item_id']))}</td><td>{e(str(x['label'] or ''))}</td>"
                         f"<td class='num'>{e(str(x['retrieved']))}</td>"
                         + "".join(f"<td class='num'>{e(str(x[c]))}</td>" for c in CATEGORIES)
                         + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "".join(parts))


# --------------------------------------------------------------------------------------------------
# summaries printed by the loop / eval commands


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _hms(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_summary(run_dir: str | Path, report_path: str | Path | None = None):
    """rich Table: steps, reward first -> last, polarity mix, eval avg@n first -> last, wall time per stage."""
    from rich.table import Table

    r = load_run(run_dir)
    m = r["metrics"].sort("step")
    t = Table(title=f"sgsd {r['kind']}: {r['path']}", title_justify="left", show_header=False, box=None,
              padding=(0, 1))
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("steps", str(m.height))
    if "reward" in m.columns and m["reward"].drop_nulls().len():
        rw = m["reward"].drop_nulls()
        t.add_row("accuracy", f"{_pct(rw[0])}% -> {_pct(rw[-1])}% (first -> last step)")
    if "loss" in m.columns and m["loss"].drop_nulls().len():
        ls = m["loss"].drop_nulls()
        t.add_row("loss", f"{ls[0]:.4g} -> {ls[-1]:.4g}")
    fr = [c for c in CATEGORIES if f"frac_{c}" in m.columns]
    if fr:
        t.add_row("polarity mix", ", ".join(f"{c} {_pct(m[f'frac_{c}'].mean())}%" for c in fr))
    if r["evals"] is not None:
        e = r["evals"].sort("step", nulls_last=True)
        for b in e["bench"].unique(maintain_order=True).to_list():
            d = e.filter(pl.col("bench") == b)
            a = d["avg_at_n"].to_list()
            t.add_row(f"eval {b}", f"avg@n {_pct(a[0])}% -> {_pct(a[-1])}% ({d.height} evals)")
    walls = [(s, float(m[f"wall_{s}_s"].sum())) for s in STAGE_WALLS if f"wall_{s}_s" in m.columns]
    if walls:
        tot = sum(w for _, w in walls)
        t.add_row("wall time", f"{_hms(tot)} total: " + ", ".join(f"{s} {_hms(w)}" for s, w in walls if w > 0))
    if report_path:
        t.add_row("report", str(report_path))
    return t


def end_of_run(run_dir: str | Path):
    """What ``sgsd loop`` prints at its end: writes RUN_DIR/report/ and returns :func:`run_summary` with the
    report's path.  Plotting never fails the finished run: an error becomes the table's 'report' row."""
    run_dir = Path(run_dir)
    try:
        path: str | Path = write_report([run_dir], run_dir / "report")
    except Exception as e:  # noqa: BLE001 - the run is done; say why there is no report instead of failing it
        path = f"not written ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return run_summary(run_dir, report_path=path)


def eval_summary(summary: str | Path | pl.DataFrame):
    """rich Table of an eval summary (one row per benchmark + mean) that fits 80 columns."""
    from rich.table import Table

    if isinstance(summary, pl.DataFrame):
        s = summary
    else:
        from stages.eval import read_summary

        s = read_summary(summary)
    first = s.row(0, named=True)
    t = Table(title=f"eval: {first.get('model', '')} ({first.get('protocol', '')} protocol), %",
              title_justify="left", padding=(0, 1), pad_edge=False)
    cols = [("bench", "bench"), ("probs", "problems"), ("n", "n"), ("avg@n", "avg_at_n"), ("±se", "avg_at_n_se"),
            ("p@1", "pass_at_1"), ("p@n", "pass_at_n"), ("maj", "maj_at_n"), ("fmt", "format_rate"),
            ("trunc", "truncation_rate"), ("tok", "mean_tokens")]
    for h, _ in cols:
        t.add_column(h, justify="left" if h == "bench" else "right", no_wrap=h != "bench", overflow="fold",
                     style="bold" if h == "avg@n" else None)
    for r in s.iter_rows(named=True):
        if r["bench"] == "mean":
            t.add_section()
        t.add_row(r["bench"], str(r.get("problems", "")), "-" if r.get("n") is None else str(r["n"]),
                  _pct(r["avg_at_n"]), _pct(r.get("avg_at_n_se")), _pct(r.get("pass_at_1")), _pct(r.get("pass_at_n")),
                  _pct(r.get("maj_at_n")), _pct(r.get("format_rate")), _pct(r.get("truncation_rate")),
                  "-" if r.get("mean_tokens") is None else f"{r['mean_tokens']:.0f}")
    return t


def compare_rows(runs: Sequence[str | Path], metric: str = "avg_at_n", with_paper: bool = True):
    """``stages.eval.compare_table`` plus, per row, the protocol and the problem count (paper rows: the paper's
    protocol; problems = the benchmarks' sizes when the runs evaluated the full sets, else '?')."""
    from stages import eval as ev

    cols, rows = ev.compare_table(runs, metric=metric, with_paper=with_paper)
    info: dict[str, tuple[str, int | None]] = {}
    for r in runs:
        s = ev.read_summary(r).filter(pl.col("bench") != "mean")
        protos = s["protocol"].unique().to_list() if "protocol" in s.columns else []
        probs = int(s["problems"].sum()) if "problems" in s.columns else None
        info[str(Path(r))] = (protos[0] if len(protos) == 1 else "mixed", probs)
    out = []
    for label, n, vals, kind in rows:
        proto, probs = ("paper", None) if kind == "paper" else info.get(label, ("?", None))
        out.append({"label": label, "kind": kind, "protocol": proto, "n": n, "problems": probs, "values": vals})
    return cols, out


def compare_view(runs: Sequence[str | Path], metric: str = "avg_at_n", with_paper: bool = True):
    """rich Table for ``eval --compare``: run, protocol, n, problems, then the metric per benchmark and mean."""
    from rich.table import Table

    from stages import eval as ev

    cols, rows = compare_rows(runs, metric, with_paper)
    model = ev.paper_results()[0].get("model", "") if with_paper else ""
    title = f"{metric} (%)" + (f"; paper rows: {model} as published" if model and any(r["kind"] == "paper" for r in rows) else "")
    from rich import box

    # no vertical rules, and a paper row says "paper SGSD" (its model is in the title): readable at 80 columns
    t = Table(title=title, title_justify="left", padding=(0, 1), pad_edge=False, box=box.SIMPLE_HEAD)
    t.add_column("run", overflow="fold", min_width=min(12, max((len(r["label"]) for r in rows), default=3)))
    for h in ("proto", "n", "probs"):
        t.add_column(h, justify="right", no_wrap=True)
    for c in cols:
        t.add_column(c, justify="right", no_wrap=True, style="bold" if c == "mean" else None)
    sep = False
    for r in rows:
        if r["kind"] == "run" and not sep and any(x["kind"] == "paper" for x in rows):
            t.add_section()
            sep = True
        label = r["label"].replace(f" {model} ", " ") if r["kind"] == "paper" and model else r["label"]
        t.add_row(label, r["protocol"], "-" if r["n"] is None else str(r["n"]),
                  "-" if r["problems"] is None else str(r["problems"]), *[_pct(v) for v in r["values"]],
                  style="dim" if r["kind"] == "paper" else None)
    return t


# --------------------------------------------------------------------------------------------------
# skills over a run


def _run_bank_labels(run_dir: Path, steps: Sequence[Path]) -> dict[tuple[str, str], tuple[str, str]]:
    from stages.engine.skills.bank import KINDS, item_label, load_bank

    cands: list[Path] = sorted((run_dir / "bank").glob("v*.json"), reverse=True) if (run_dir / "bank").is_dir() else []
    seen = set()
    for sd in steps:
        man = SCORE_TEACHERS.manifest(sd)
        if man.exists():
            try:
                b = (read_manifest(man).get("inputs") or {}).get("bank")
            except (OSError, ValueError):
                b = None
            if b and b not in seen:
                seen.add(b)
                cands.append(Path(b))
    labels: dict[tuple[str, str], tuple[str, str]] = {}
    for c in cands:
        try:
            bank = load_bank(c)
        except InputError:
            continue
        for kind, (_, fields) in KINDS.items():
            for it in bank.items(kind):
                labels.setdefault((kind, it[fields[0]]), (item_label(kind, it), it.get("origin", "static")))
    return labels


def skill_stats(run_dir: str | Path) -> pl.DataFrame:
    """Per bank item over every step of a run: ``retrieved`` = teacher rows (rollout, teacher) holding it, and
    the counts of those teachers' polarity categories.  Items of the run's bank(s) never retrieved have 0.

    Columns: kind, item_id, label, origin, retrieved, helpful, warning, misleading, over_suppressive, neutral,
    steps (steps in which it was retrieved); sorted by kind, then retrieved (most first)."""
    p = Path(run_dir)
    steps = [d for _, d in step_dirs(p)] or [p]
    frames = []
    for sd in steps:
        sc, po = SCORE_TEACHERS.find(sd), POLARIZE.find(sd)
        if sc is None or po is None:
            continue
        s = read_table(sc, required={"rollout_id": str, "teacher_rank": int, "skill_id": str, "mistake_id": str},
                       allow_empty=True).select("rollout_id", "teacher_rank", "skill_id", "mistake_id")
        c = read_table(po, required={"rollout_id": str, "teacher_rank": int, "category": str},
                       allow_empty=True).select("rollout_id", "teacher_rank", "category")
        bad = c.filter(~pl.col("category").is_in(list(CATEGORIES)))
        if bad.height:
            raise InputError(po, f"unknown category '{bad['category'][0]}'")
        frames.append(s.join(c, on=["rollout_id", "teacher_rank"], how="inner").with_columns(step=pl.lit(sd.name)))
    if not frames:
        raise InputError(p, "no step holds both score_teachers and polarize tables (sgsd objective)")
    rows = pl.concat(frames)
    long = pl.concat([
        rows.select(pl.lit("skill").alias("kind"), pl.col("skill_id").alias("item_id"), "category", "step"),
        rows.select(pl.lit("mistake").alias("kind"), pl.col("mistake_id").alias("item_id"), "category", "step"),
    ])
    agg = long.group_by("kind", "item_id").agg(
        retrieved=pl.len().cast(pl.Int64),
        **{c: (pl.col("category") == c).sum().cast(pl.Int64) for c in CATEGORIES},
        steps=pl.col("step").n_unique().cast(pl.Int64),
    )
    labels = _run_bank_labels(p, steps)
    known = pl.DataFrame({"kind": [k for k, _ in labels], "item_id": [i for _, i in labels],
                          "label": [v[0] for v in labels.values()], "origin": [v[1] for v in labels.values()]},
                         schema={"kind": pl.String, "item_id": pl.String, "label": pl.String, "origin": pl.String})
    out = known.join(agg, on=["kind", "item_id"], how="full", coalesce=True)
    fill = ["retrieved", *CATEGORIES, "steps"]
    out = out.with_columns([pl.col(c).fill_null(0) for c in fill])
    return out.select("kind", "item_id", "label", "origin", *fill).sort(
        ["kind", "retrieved", "item_id"], descending=[True, True, False])


def skill_stats_table(df: pl.DataFrame, top: int = 0):
    """rich Table of :func:`skill_stats` (one per call; both kinds, most retrieved first)."""
    from rich.table import Table

    t = Table(title="skills over the run: retrieved = teacher rows holding the item; then its teachers' categories",
              title_justify="left", padding=(0, 1), pad_edge=False)
    t.add_column("kind", no_wrap=True)
    t.add_column("id", no_wrap=True)
    t.add_column("item", overflow="fold", ratio=1)
    for h in ("ret", "help", "warn", "misl", "over", "neut"):
        t.add_column(h, justify="right", no_wrap=True)
    for kind in ("skill", "mistake"):
        sub = df.filter(pl.col("kind") == kind)
        for x in (sub.head(top) if top else sub).iter_rows(named=True):
            t.add_row(kind, x["item_id"], x["label"] or "", str(x["retrieved"]), *[str(x[c]) for c in CATEGORIES])
        t.add_section()
    return t
