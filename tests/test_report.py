"""`sgsd report`, the run / eval summaries, skill statistics over a run: hand-made tables, hand-computed values;
report.html opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import polars as pl
import pytest
from rich.console import Console

from synthetic_run import summary, write_bank, write_step

from stages import report as R
from stages.engine.errors import InputError

METRICS = {
    "step": [1, 2, 3], "objective": ["sgsd"] * 3, "loss": [0.5, 0.4, 0.3], "reward": [0.25, 0.5, 0.75],
    "frac_helpful": [0.2, 0.4, 0.6], "frac_warning": [0.4, 0.2, 0.2], "frac_misleading": [0.2, 0.2, 0.0],
    "frac_over_suppressive": [0.1, 0.1, 0.1], "frac_neutral": [0.1, 0.1, 0.1],
    "support_mean": [0.1, 0.2, 0.3], "clipped_frac": [0.01, 0.02, 0.03], "grad_norm": [1.0, 0.5, 0.2],
    "lr": [1e-6, 2e-6, 3e-6], "tokens_per_s": [100.0, 110.0, 120.0], "completion_len_mean": [50.0, 60.0, 70.0],
    "completion_len_max": [80, 90, 100], "truncated_frac": [0.0, 0.5, 0.0],
    "wall_rollout_s": [10.0, 20.0, 30.0], "wall_train_s": [100.0, 100.0, 100.0],
}


def _render(obj, width=80) -> str:
    con = Console(width=width, record=True, file=open("/dev/null", "w"))
    con.print(obj)
    return con.export_text()


@pytest.fixture()
def run(tmp_path):
    bank = write_bank(tmp_path / "bank.json")
    rd = tmp_path / "runA"
    for n in (1, 2):
        write_step(rd / f"step_{n:04d}", bank)
    (rd / "step_0003").mkdir()
    pl.DataFrame(METRICS).write_parquet(rd / "metrics.parquet")
    for n, v in ((1, 0.1), (3, 0.3)):
        (rd / f"step_{n:04d}" / "eval").mkdir(parents=True)
        summary([{"bench": "aime24", "n": 2, "problems": 4, "avg_at_n": v, "avg_at_n_se": 0.05}]).write_parquet(
            rd / f"step_{n:04d}" / "eval" / "summary.parquet")
    return rd


def test_run_summary_hand_values_at_80_columns(run):
    txt = _render(R.run_summary(run, report_path="REPORT.html"))
    assert "…" not in txt and max(len(x) for x in txt.splitlines()) <= 80
    flat = " ".join(txt.split())
    assert "steps 3" in flat
    assert "25.0% -> 75.0%" in flat
    # polarity mix = mean over steps: helpful (0.2+0.4+0.6)/3, warning 0.8/3, misleading 0.4/3
    for s in ("helpful 40.0%", "warning 26.7%", "misleading 13.3%", "over_suppressive 10.0%", "neutral 10.0%"):
        assert s in flat
    # wall: rollout 60 s, train 300 s, total 360 s
    assert "6:00 total: rollout 1:00, train 5:00" in flat
    assert "eval aime24 avg@n 10.0% -> 30.0% (2 evals)" in flat
    assert "REPORT.html" in flat


def test_skill_stats_counts_over_the_run(run):
    df = R.skill_stats(run)
    rows = {(r["kind"], r["item_id"]): r for r in df.iter_rows(named=True)}
    # per step: s1 is teacher (p1#0,0) helpful and (p2#0,0) misleading; two steps -> doubled
    assert {k: rows[("skill", "s1")][k] for k in ("retrieved", "helpful", "misleading", "warning", "steps")} == \
        {"retrieved": 4, "helpful": 2, "misleading": 2, "warning": 0, "steps": 2}
    assert {k: rows[("skill", "s2")][k] for k in ("retrieved", "over_suppressive", "misleading")} == \
        {"retrieved": 4, "over_suppressive": 2, "misleading": 2}
    assert {k: rows[("mistake", "m1")][k] for k in ("retrieved", "helpful", "misleading")} == \
        {"retrieved": 4, "helpful": 2, "misleading": 2}
    assert {k: rows[("mistake", "m2")][k] for k in ("retrieved", "over_suppressive", "misleading")} == \
        {"retrieved": 4, "over_suppressive": 2, "misleading": 2}
    assert rows[("skill", "s3")]["retrieved"] == 0 and rows[("skill", "s3")]["label"] == "Never used"
    assert rows[("skill", "s1")]["label"] == "Use parity"
    # independent check: sum of category counts = retrieved; teacher rows in the run = 2 steps * 4 per kind
    assert all(sum(r[c] for c in ("helpful", "warning", "misleading", "over_suppressive", "neutral")) == r["retrieved"]
               for r in rows.values())
    assert df.filter(pl.col("kind") == "skill")["retrieved"].sum() == 8
    txt = _render(R.skill_stats_table(df))
    assert "Use parity" in txt and "…" not in txt


def test_eval_summary_readable_at_80_columns():
    s = summary([
        {"bench": "aime24", "n": 12, "problems": 30, "avg_at_n": 1.0, "avg_at_n_se": 0.0556, "mean_tokens": 38912.0,
         "protocol": "paper", "model": "Qwen/Qwen3-1.7B"},
        {"bench": "hmmt25", "n": 12, "problems": 30, "avg_at_n": 0.297, "truncation_rate": 1.0, "protocol": "paper",
         "model": "Qwen/Qwen3-1.7B"},
        {"bench": "math500", "n": 12, "problems": 500, "avg_at_n": 0.9, "protocol": "paper", "model": "Qwen/Qwen3-1.7B"},
        {"bench": "mean", "n": 12, "problems": 560, "avg_at_n": 0.7323, "protocol": "paper", "model": "Qwen/Qwen3-1.7B"},
    ])
    txt = _render(R.eval_summary(s))
    assert "…" not in txt and max(len(x) for x in txt.splitlines()) <= 80
    for h in ("bench", "probs", "avg@n", "±se", "p@1", "p@n", "maj", "fmt", "trunc", "tok"):
        assert h in txt
    assert "100.0" in txt and "38912" in txt and "5.6" in txt and "73.2" in txt and "math500" in txt


def test_compare_shows_protocol_n_and_problems(tmp_path):
    a, b = tmp_path / "quick_run", tmp_path / "paper_run"
    for d, proto, n, P, v in ((a, "quick", 2, 4, 0.25), (b, "paper", 12, 30, 0.5)):
        (d / "eval").mkdir(parents=True)
        summary([{"bench": x, "n": n, "problems": P, "avg_at_n": v, "protocol": proto}
                 for x in ("aime24", "aime25", "hmmt25")]).write_parquet(d / "eval" / "summary.parquet")
    cols, rows = R.compare_rows([a, b])
    by = {r["label"]: r for r in rows}
    assert (by[str(a)]["protocol"], by[str(a)]["n"], by[str(a)]["problems"]) == ("quick", 2, 12)
    assert (by[str(b)]["protocol"], by[str(b)]["n"], by[str(b)]["problems"]) == ("paper", 12, 90)
    assert by[str(a)]["values"] == pytest.approx([0.25, 0.25, 0.25, 0.25])
    paper = [r for r in rows if r["kind"] == "paper"]
    assert paper and all(r["protocol"] == "paper" and r["n"] == 12 for r in paper)
    txt = _render(R.compare_view([a, b]))
    line = next(x for x in txt.splitlines() if "quick" in x)
    assert re.search(r"quick\s+2\s+12\s+25\.0", line)  # protocol, n, problems, then the values
    assert "pro…" not in txt and "pass…" not in txt


def test_train_only_run(tmp_path):
    d = tmp_path / "train_run"
    d.mkdir()
    pl.DataFrame({"policy_step": [1, 2, 3, 4], "loss": [1.0, 0.9, 0.8, 0.7], "grad_norm": [1.0] * 4, "lr": [1e-6] * 4,
                  "accuracy": [0.0, 0.5, 0.5, 1.0], "wall_s": [1.0] * 4, "tokens_per_s": [10.0] * 4}).write_parquet(
        d / "train.parquet")
    r = R.load_run(d)
    assert r["kind"] == "train" and r["metrics"]["step"].to_list() == [1, 2, 3, 4]
    flat = " ".join(_render(R.run_summary(d)).split())
    assert "steps 4" in flat and "0.0% -> 100.0%" in flat and "loss 1 -> 0.7" in flat


def test_bad_run_dir(tmp_path):
    with pytest.raises(InputError, match="not a run directory"):
        R.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no metrics.parquet"):
        R.load_run(tmp_path / "empty")
    with pytest.raises(InputError, match="no step holds"):
        R.skill_stats(tmp_path / "empty")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_write_report_two_runs(run, tmp_path):
    b = tmp_path / "runB"
    shutil.copytree(run, b)
    pl.DataFrame({**METRICS, "reward": [0.1, 0.2, 0.3]}).write_parquet(b / "metrics.parquet")
    page = R.write_report([run, b], tmp_path / "rep")
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"reward", "loss", "polarity", "support", "clipped", "lengths", "grad_norm", "lr", "tokens_per_s", "wall",
            "eval_avg_at_n", "truncated"} <= names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(pngs)
    assert "http://" not in text and "https://" not in text
    assert "Use parity" in text  # the skills table of each run
    from sgsd_cli.common import app
    from sgsd_cli.main import _register
    from typer.testing import CliRunner

    _register()
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "rep1"), "--skills"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep1" / "report.html").exists() and "Use parity" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a run directory" in res.output


PROBE = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>300)ok++;}
var p=document.createElement('pre');p.id='probe';p.textContent=JSON.stringify({n:im.length,ok:ok});
document.body.appendChild(p);});</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install -y chromium)")
def test_report_html_in_headless_chromium(run, tmp_path):
    page = R.write_report([run], tmp_path / "rep")
    n_png = len(list((tmp_path / "rep").glob("*.png")))
    probe = tmp_path / "rep" / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE))
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    got = json.loads(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1).replace("&quot;", '"'))
    assert got == {"n": n_png, "ok": n_png}  # every embedded PNG decoded by the browser
    shot = tmp_path / "report.png"
    subprocess.run(args + ["--window-size=1300,1800", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000


def test_end_of_run_writes_the_report_and_names_it(run):
    flat = " ".join(_render(R.end_of_run(run), width=200).split())
    assert (run / "report" / "report.html").exists()
    assert f"report {run / 'report' / 'report.html'}" in flat and "25.0% -> 75.0%" in flat


def test_stage_by_stage_run_dir_has_steps(tmp_path):
    """A run made stage by stage (shell recipes, scripts/smoke.sh): no metrics.parquet, step_N/train.parquet; the
    report rebuilds the loop's rows from the step folders (a step that did not train yet is left out)."""
    bank = write_bank(tmp_path / "bank.json")
    rd = tmp_path / "sh"
    for n, loss in ((1, 0.5), (2, 0.25)):
        sd = write_step(rd / f"step_{n:04d}", bank)
        pl.DataFrame({"policy_step": [n], "loss": [loss], "grad_norm": [1.0], "lr": [1e-3], "tokens": [30],
                      "wall_s": [2.0]}).write_parquet(sd / "train.parquet")
    write_step(rd / "step_0003", bank)  # rolled out, not trained
    r = R.load_run(rd)
    assert r["kind"] == "steps" and r["metrics"]["step"].to_list() == [1, 2]
    assert r["metrics"]["loss"].to_list() == [0.5, 0.25] and "frac_misleading" in r["metrics"].columns
    assert R.x_label([r]) == "loop step"
    path = R.write_report([rd], tmp_path / "out")
    assert (tmp_path / "out" / "loss.png").exists() and path.exists()


def test_plots_name_their_axes_and_units(run, tmp_path, monkeypatch):
    """Every panel has a y label (with its unit), the x label names the axis used, wall times share one axes."""
    import matplotlib.figure

    seen = []
    orig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen.append([(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.axison])
        return orig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    R.write_report([run], tmp_path / "out")
    axes = [a for fig in seen for a in fig]
    assert axes and all(x in ("loop step", "loop step (last: the run's final eval/)") for _, x, _ in axes)
    for fig in seen:
        assert fig[0][2], fig  # the first axes of every figure carries the y label
    wall = [fig for fig in seen if fig[0][0] == "wall time per stage"]
    assert len(wall) == 1 and len(wall[0]) == 1 and wall[0][0][2] == "seconds"  # one shared scale
    assert R.x_label([{"kind": "train"}]) == "optimizer step"


def test_piped_output_does_not_wrap_at_80_columns(run, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    res = subprocess.run([sys.executable, "-m", "sgsd_cli.main", "report", str(run), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    title = next(line for line in lines if line.startswith("sgsd loop: "))
    assert title.rstrip() == f"sgsd loop: {run}"  # the whole path on one line, however long
    walls = [line for line in lines if "wall time" in line]
    assert len(walls) == 1 and "train" in walls[0]  # the row is not folded onto a second line


def test_health_panel_marks_alarm_steps_and_lists_them(tmp_path, monkeypatch):
    """The health metrics get one panel with a red line at every step whose alarms column is set; the page lists
    the alarms (escaped); a run without the column (older loops) gets it computed from its rows."""
    rd = tmp_path / "runH"
    rd.mkdir()
    m = dict(METRICS, format_rate=[1.0, 1.0, 0.5], entropy_mean=[0.9, 0.8, 0.1],
             alarms=["", "format: <b>down</b>", "entropy: low"])
    pl.DataFrame(m).write_parquet(rd / "metrics.parquet")
    run = R.load_run(rd)
    assert R.alarm_steps(run) == [2, 3]
    marked = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, *a, **k: (marked.append(x), real(self, x, *a, **k))[1])
    out = R.write_report([rd], tmp_path / "rep")
    assert (tmp_path / "rep" / "health.png").exists()
    assert marked.count(2) >= 4 and marked.count(3) >= 4  # every axes of every panel, the health panel's 4 included
    html = out.read_text()
    assert "collapse alarms of runH" in html and "format: &lt;b&gt;down&lt;/b&gt;" in html and "<b>down" not in html
    # no alarms column: computed from the rows (12 steps, the length doubles from step 6 on -> fires at step 10)
    rd2 = tmp_path / "runOld"
    rd2.mkdir()
    pl.DataFrame({"step": list(range(1, 13)), "loss": [0.1] * 12,
                  "completion_len_mean": [10.0] * 5 + [25.0] * 7}).write_parquet(rd2 / "metrics.parquet")
    assert R.alarm_steps(R.load_run(rd2)) == [10, 11, 12]
