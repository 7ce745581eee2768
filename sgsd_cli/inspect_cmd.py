"""`sgsd inspect`: one rollout and what each skill-conditioned teacher did on it (terminal + HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sgsd_cli.common import UTILS, app, cli_errors, out
from stages.engine.errors import InputError


@app.command("inspect", rich_help_panel=UTILS)
@cli_errors
def inspect_cmd(
    step_dir: Annotated[Path, typer.Argument(help="A step directory (RUN_DIR/step_N, or any folder with rollout, score_teachers and polarize tables); a run directory means its last step.", show_default=False)],
    rollout: Annotated[str | None, typer.Option("--rollout", help="Rollout id (problem_id#sample_index).", show_default=False)] = None,
    worst: Annotated[bool, typer.Option("--worst", metavar="", help="Rollouts whose teachers disagree most with the verifier (lowest o * sum_k w_k a_k).")] = False,
    best: Annotated[bool, typer.Option("--best", metavar="", help="Rollouts whose teachers agree most with the verifier (highest o * sum_k w_k a_k).")] = False,
    category: Annotated[str | None, typer.Option("--category", help="Rollouts with a teacher in this category: helpful, warning, misleading, over_suppressive, neutral (heaviest such teacher first).", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", help="How many selected rollouts to show.")] = 1,
    teacher: Annotated[str, typer.Option("--teacher", help="Colour the terminal view by 'weighted' (sum_k w_k Delta_k) or one teacher rank.")] = "weighted",
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML page (no network) where a click switches the teacher.", show_default=False)] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder for the token pieces (default: the rollout's model, from local files only).", show_default=False)] = None,
) -> None:
    """One rollout and what each teacher did on it, in the terminal and as an HTML page.

    Problem, gold answer, verdict; each teacher's skill, mistake, weight, support, stance, polarity and category;
    the completion coloured token by token by Delta (teacher minus student log-prob)."""
    from stages import inspect as ins

    if limit < 1:
        raise InputError(None, "--limit must be at least 1")
    t = ins.load_step(step_dir)
    ids = ins.select_rollouts(t, rollout_id=rollout, worst=worst, best=best, category=category, limit=limit)
    tok = ins.load_tokenizer(tokenizer) if tokenizer else ins.load_tokenizer(*ins.tokenizer_candidates(t))
    if tokenizer and tok is None:
        raise InputError(tokenizer, "no tokenizer here")
    if tok is None:
        out.print("no tokenizer found (rollout model, checkpoints, loop model): tokens are shown as ids; pass --tokenizer",
                  style="dim")
    views = [ins.rollout_view(t, i, tok) for i in ids]
    for v in views:
        out.print(ins.render_terminal(v, teacher))
        out.print()
    if html:
        path = ins.write_html(views, html, title=f"sgsd inspect {t.step_dir}")
        out.print(f"html: {path}")
