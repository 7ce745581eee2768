"""`sgsd inspect` on a hand-made step (tests/synthetic_run.py): every number below is computed by hand from
the values written there; the HTML page is opened in headless Chromium and clicked."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import polars as pl
import pytest

from synthetic_run import write_bank, write_step

from stages import inspect as ins
from stages.engine.errors import InputError


@pytest.fixture()
def step(tmp_path):
    bank = write_bank(tmp_path / "bank.json")
    return write_step(tmp_path / "run" / "step_0001", bank)


def test_view_has_hand_computed_deltas_and_weighted_sum(step):
    t = ins.load_step(step)
    v = ins.rollout_view(t, "p1#0")
    # Delta = teacher - student: [0-(-1), -4-(-2), -0.5-(-0.5)] and [2+1, 0+2, 0]
    assert v["deltas"] == [pytest.approx([1.0, -2.0, 0.0]), pytest.approx([3.0, 2.0, 0.0])]
    # 0.75*[1,-2,0] + 0.25*[3,2,0]
    assert v["weighted"] == pytest.approx([1.5, -1.0, 0.0])
    assert v["mask"] == [True, True, False]
    assert v["correct"] is True and v["pred"] == "yes" and v["status"] == "ok" and v["answer"] == "yes"
    assert [x["skill"] for x in v["teachers"]] == ["Use parity", "Draw a picture"]
    assert [x["mistake"] for x in v["teachers"]] == ["Sign slip", "Off by one"]
    assert [x["category"] for x in v["teachers"]] == ["helpful", "over_suppressive"]
    assert [x["weight"] for x in v["teachers"]] == [0.75, 0.25]
    # o * sum_k w_k a_k = +1 * (0.75*0.5 + 0.25*(-0.2))
    assert v["agreement"] == pytest.approx(0.325)
    assert ins.rollout_view(t, "p2#0")["agreement"] == pytest.approx(-(0.6 * 1.0 + 0.4 * 0.2))
    assert ins.weighted_delta([[1.0, 2.0], [3.0, -4.0]], [0.5, 0.5]) == [2.0, -1.0]


def test_selectors(step):
    t = ins.load_step(step.parent)  # a run directory means its last step
    assert t.step_dir == step
    assert ins.select_rollouts(t, worst=True) == ["p2#0"]
    assert ins.select_rollouts(t, best=True) == ["p1#0"]
    assert ins.select_rollouts(t, worst=True, limit=5) == ["p2#0", "p1#0"]
    assert ins.select_rollouts(t, category="misleading") == ["p2#0"]
    assert ins.select_rollouts(t, category="over_suppressive") == ["p1#0"]
    assert ins.select_rollouts(t, rollout_id="p2#0") == ["p2#0"]
    assert ins.select_rollouts(t) == ["p1#0"]
    with pytest.raises(InputError, match="no teacher is 'warning'"):
        ins.select_rollouts(t, category="warning")
    with pytest.raises(InputError, match="--category must be one of"):
        ins.select_rollouts(t, category="bogus")
    with pytest.raises(InputError, match="no rollout 'p9#0'"):
        ins.select_rollouts(t, rollout_id="p9#0")
    with pytest.raises(InputError, match="at most one"):
        ins.select_rollouts(t, worst=True, best=True)


def test_bad_inputs_are_one_line_errors(step, tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        ins.load_step(tmp_path / "nope")
    sc = pl.read_parquet(step / "score_teachers.parquet")
    sc.with_columns(pl.when(pl.col("teacher_rank") == 1).then(pl.lit([float("nan")] * 3))
                    .otherwise(pl.col("teacher_logprobs")).alias("teacher_logprobs")).write_parquet(step / "score_teachers.parquet")
    with pytest.raises(InputError, match="teacher_logprobs"):
        ins.load_step(step)
    sc.write_parquet(step / "score_teachers.parquet")
    (step / "polarize.parquet").unlink()
    with pytest.raises(InputError, match="polarize"):
        ins.load_step(step)


def test_terminal_rendering(step):
    from rich.console import Console

    v = ins.rollout_view(ins.load_step(step), "p1#0")
    con = Console(width=100, record=True, color_system="truecolor")
    con.print(ins.render_terminal(v, "1"))
    txt = con.export_text(clear=False)
    assert "p1#0" in txt and "correct" in txt and "Use parity" in txt and "over_suppressive" in txt
    assert "<10>" in txt  # no tokenizer: ids
    # teacher 1, token 0: Delta = +3 = the clip -> full green rgb(55,195,55) (= #37c337)
    assert "#37c337" in con.export_html(inline_styles=True).lower()
    with pytest.raises(InputError, match="teachers \\[0, 1\\]"):
        ins.render_terminal(v, "7")


def test_html_is_self_contained_and_escaped(step, tmp_path):
    t = ins.load_step(step)
    page = ins.render_html([ins.rollout_view(t, r) for r in ("p1#0", "p2#0")])
    assert "Is 7 &lt; 9 &amp; odd? &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    data = json.loads(re.search(r"var VIEWS=(\[.*?\]);\s*function", page, re.S).group(1))
    assert data[0]["weighted"] == pytest.approx([1.5, -1.0, 0.0])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rgb(d: float) -> str:
    """Independent colour rule: white at 0, (55,195,55) at +3, (235,110,110) at -3, linear in between."""
    x = max(-1.0, min(1.0, d / 3.0))
    a = abs(x)
    c = (255 - 200 * a, 255 - 60 * a, 255 - 200 * a) if x >= 0 else (255 - 20 * a, 255 - 145 * a, 255 - 145 * a)
    return "rgb({}, {}, {})".format(*(int(math.floor(v + 0.5)) for v in c))


PROBE = """<script>
function state(){return Array.from(document.querySelectorAll('.completion')).map(function(c){
  return Array.from(c.querySelectorAll('span')).map(function(s){return s.style.background||'none';});});}
var before=state();
document.querySelector('#r0 .buttons button[data-t="1"]').click();
var after=state();
document.querySelector('#r1 tr.teacher[data-t="0"] td').click();
var row=state();
var out=document.createElement('pre');out.id='probe';
out.textContent=JSON.stringify({before:before,after:after,row:row,
  label0:document.getElementById('lab0').textContent,
  shadow:getComputedStyle(document.querySelector('.completion span')).boxShadow,
  ink:getComputedStyle(document.querySelector('.completion span')).color,
  sel:document.querySelector('#r0 .buttons button.sel').dataset.t});
document.body.appendChild(out);
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install -y chromium)")
def test_html_in_headless_chromium_click_switches_teacher(step, tmp_path):
    t = ins.load_step(step)
    page = tmp_path / "inspect.html"
    ins.write_html([ins.rollout_view(t, r) for r in ("p1#0", "p2#0")], page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE))
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000"]
    dom = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    got = json.loads(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1).replace("&quot;", '"'))
    off = "none"  # masked-out token: no colour
    # initial view: weighted sum, p1 = [1.5, -1.0, (masked)], p2 = [0.3, 0.3, 0.3]
    assert got["before"][0][:2] == [_rgb(1.5), _rgb(-1.0)] and got["before"][0][2] in (off, "transparent")
    assert got["before"][1] == [_rgb(0.3)] * 3
    # click "teacher 1" of the first rollout: Delta = [3, 2, (masked)]; the second rollout is unchanged
    assert got["after"][0][:2] == ["rgb(55, 195, 55)", _rgb(2.0)]
    assert got["after"][1] == [_rgb(0.3)] * 3
    assert got["sel"] == "1" and "teacher 1" in got["label0"]
    # click the row of teacher 0 in the second rollout: Delta = [0.5, 0.5, 0.5]
    assert got["row"][1] == [_rgb(0.5)] * 3
    # neighbouring tokens of one colour stay apart: every coloured token carries a thin right edge
    assert got["shadow"] not in ("", "none") and "inset" in got["shadow"]
    ink = tuple(int(x) for x in re.findall(r"\d+", got["ink"])[:3])
    assert _contrast(ink, ins.delta_rgb(-ins.CLIP)) >= 6.0 and _contrast(ink, ins.delta_rgb(ins.CLIP)) >= 6.0
    shot = tmp_path / "inspect.png"
    subprocess.run(args + ["--window-size=1200,900", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_cli(step, tmp_path):
    from typer.testing import CliRunner

    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()
    r = CliRunner().invoke(app, ["inspect", str(step), "--worst", "--html", str(tmp_path / "p.html")])
    assert r.exit_code == 0, r.output
    assert "p2#0" in r.output and "misleading" in r.output and (tmp_path / "p.html").exists()
    r = CliRunner().invoke(app, ["inspect", str(step), "--rollout", "zz#1"])
    assert r.exit_code == 2 and "no rollout 'zz#1'" in r.output
    assert len([x for x in r.output.splitlines() if x.strip()]) <= 2


def test_token_pieces_keep_split_characters_whole(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "héllo 数学 ok"
    ids = tok.encode(text)
    pieces = ins.token_pieces(ids, tok)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces) and "数" in pieces and "学" in pieces
    assert ins.token_pieces([5, 6], None) == ["<5>", "<6>"]


def _contrast(fg, bg) -> float:
    """WCAG contrast ratio of two sRGB colours."""
    def lum(c):
        lin = [(v / 255) / 12.92 if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    a, b = sorted((lum(fg), lum(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)


def test_token_text_stays_readable_on_the_saturated_colours():
    ink = (17, 17, 17)  # the completion's text colour (#111)
    assert ".completion span{color:#111" in ins._CSS
    assert _contrast(ink, ins.delta_rgb(-ins.CLIP)) >= 6.0  # the darkest red (was 4.5 with rgb(215,55,55))
    assert _contrast(ink, ins.delta_rgb(ins.CLIP)) >= 6.0


def test_worst_is_the_rollout_whose_teachers_contradict_the_verifier(tmp_path):
    """a#0: its one teacher confirms the verdict, weakly (agreement +0.1); b#0: half its teacher weight contradicts
    the verdict (rho = -1) though its weighted support nets +0.5.  --worst is b#0, --best a#0."""
    from types import SimpleNamespace

    scores = pl.DataFrame({"rollout_id": ["a#0", "b#0", "b#0"], "teacher_rank": [0, 0, 1],
                           "weight": [1.0, 0.5, 0.5]})
    pol = pl.DataFrame({"rollout_id": ["a#0", "b#0", "b#0"], "teacher_rank": [0, 0, 1], "outcome": [1, 1, 1],
                        "support": [0.1, -2.0, 3.0], "stance": [1, -1, 1], "polarity": [1, -1, 1],
                        "category": ["helpful", "over_suppressive", "helpful"]})
    t = SimpleNamespace(rollouts=pl.DataFrame({"rollout_id": ["a#0", "b#0"]}), scores=scores, polarize=pol,
                        step_dir=tmp_path)
    ag = ins.agreement(t)
    assert ag["agreement"].to_list() == pytest.approx([0.1, 0.5]) and ag["disagree"].to_list() == [0.0, 0.5]
    assert ins.select_rollouts(t, worst=True) == ["b#0"]
    assert ins.select_rollouts(t, best=True) == ["a#0"]


# issue 21: text from the tables and the bank is data, in the page and in the terminal

HOSTILE_SKILL = "<!--<script>alert(1)</script> [red]red[/red] [/x] \x1b]0;pwned\x07\x1b[2J"


def _hostile_step(tmp_path):
    from synthetic_run import BANK

    bank = json.loads(json.dumps(BANK))
    bank["general_skills"][0]["title"] = HOSTILE_SKILL
    (tmp_path / "bank.json").write_text(json.dumps(bank))
    sd = write_step(tmp_path / "run" / "step_0001", tmp_path / "bank.json")
    po = pl.read_parquet(sd / "polarize.parquet")
    po.with_columns(pl.lit("<img src=x onerror=alert(1)>").alias("n_mask")).write_parquet(sd / "polarize.parquet")
    return sd


def test_html_escapes_every_cell_and_the_embedded_json(tmp_path):
    sd = _hostile_step(tmp_path)
    page = ins.render_html([ins.rollout_view(ins.load_step(sd), "p1#0")])
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script") == 1 and page.count("</script>") == 1 and "<!--" not in page
    blob = re.search(r"var VIEWS=(\[.*?\]);\s*function", page, re.S).group(1)
    assert not set("<>&") & set(blob) and "\\u003c!--\\u003cscript\\u003e" in blob
    assert json.loads(blob)[0]["teachers"][0]["skill"] == HOSTILE_SKILL  # still the same value


def test_terminal_shows_bank_text_as_plain_visible_text(tmp_path):
    from typer.testing import CliRunner

    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    sd = _hostile_step(tmp_path)
    _register()
    for args in (["inspect", str(sd), "--rollout", "p1#0"], ["skills", "show", str(tmp_path / "bank.json")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (args, r.output)
        assert "\x1b" not in r.output and "\x07" not in r.output, args
        # rich drops BEL itself; ESC is shown as an escape; markup is printed as it is written
        assert "[red]red[/red] [/x] \\x1b]0;pwned" in r.output and "\\x1b[2J" in r.output, (args, r.output)
