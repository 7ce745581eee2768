"""`sgsd update-skills` and `sgsd skills show|diff|stats`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sgsd_cli.common import UTILS, Seed, app, cli_errors, out, progress_bars
from sgsd_cli.mine_skills_cmd import WRITER_CONVERTERS, writer_on_stage_device
from sgsd_cli.options import stage_command
from stages.update_skills import UpdateSkillsConfig
from stages.engine.errors import InputError

skills_app = typer.Typer(help="Inspect skill banks: print one, diff two versions, retrieval statistics.",
                         no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(skills_app, name="skills", rich_help_panel=UTILS)


UpdRunDir = Annotated[Path, typer.Option("--run-dir", help="Run directory: the bank history lives in RUN_DIR/bank/, rollouts in RUN_DIR/step_*/.")]
UpdBank = Annotated[str | None, typer.Option("--bank", help="Starting bank when the run has no bank history yet (it becomes bank/v0000).", rich_help_panel="Inputs")]
UpdRollouts = Annotated[list[Path] | None, typer.Option("--rollouts", help="Rollout table(s) of the window (repeatable). Unset: the last --last-steps step directories of --run-dir.", rich_help_panel="Inputs")]


@stage_command("update-skills", UpdateSkillsConfig, section="update_skills", converters=WRITER_CONVERTERS)
def update_skills_cmd(cfg: UpdateSkillsConfig, run_dir: UpdRunDir, bank: UpdBank = None, rollouts: UpdRollouts = None) -> None:
    """Online skill update from the rollouts of the last steps; writes the next bank/vNNNN when it changes."""
    from stages import update_skills

    cfg = writer_on_stage_device(cfg)
    with progress_bars() as bars:
        res = update_skills.run(cfg, run_dir, rollouts=rollouts or None, bank=bank, progress=bars)
    rate = "n/a" if res.success_rate is None else f"{res.success_rate:.3f}"
    out.print(f"{res.decision}: {res.reason} ({res.rollouts} rollouts, success rate {rate})")
    if res.gate:
        out.print(f"gate {res.gate.get('metric')}: {res.gate['old']:.4f} -> {res.gate['new']:.4f}")
    for kind in ("skill", "mistake"):
        st = res.stats.get(kind)
        if st:
            out.print(f"{kind}s: {st['candidates']} candidates, dynamic {st['dynamic_before']} -> {st['dynamic_after']} "
                      f"({st.get('added', 0)} new)")
    out.print(f"bank: {res.version.path} ({res.version.label})")


# --------------------------------------------------------------------------------------------------
# skills show | diff | stats


def _resolve_bank(spec: str, run_dir: Path | None):
    from stages.engine.skills.versions import bank_dir
    from stages.engine.skills.bank import load_bank

    if run_dir is not None and re.fullmatch(r"v\d{4,}", spec):
        return load_bank(bank_dir(run_dir) / f"{spec}.json")
    return load_bank(spec)


BankArg = Annotated[str, typer.Argument(help="Bank: .json, .parquet, a run's bank/ folder (latest version), or vNNNN with --run-dir.")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run directory whose bank/ history vNNNN labels refer to.")]


@skills_app.command("show")
@cli_errors
def show_cmd(
    bank: BankArg,
    kind: Annotated[str, typer.Option("--kind", help="all | skills | mistakes.")] = "all",
    full: Annotated[bool, typer.Option("--full", help="Also print principle / why_it_happens.")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Print a bank's skills and mistakes."""
    b = _resolve_bank(bank, run_dir)
    if kind not in ("all", "skills", "mistakes"):
        raise InputError(None, f"--kind must be all, skills or mistakes, not '{kind}'")
    out.print(f"[bold]{escape(str(b.path))}[/]: {len(b.skills)} skills, {len(b.mistakes)} mistakes, version "
              + escape(f"{b.version}" + (f" ({b.metadata['bank_version']})" if b.metadata.get("bank_version") else "")),
              markup=True)
    if kind in ("all", "skills"):
        t = Table(title="general skills")
        for c in ("id", "title") + (("principle",) if full else ()) + ("when to apply", "origin"):
            t.add_column(c, overflow="fold")
        for s in b.skills:
            t.add_row(s["skill_id"], s["title"], *((s["principle"],) if full else ()), s["when_to_apply"],
                      s.get("origin", "static") + (f" {s['added_in']}" if s.get("added_in") else ""))
        out.print(t)
    if kind in ("all", "mistakes"):
        t = Table(title="common mistakes")
        for c in ("id", "description") + (("why it happens",) if full else ()) + ("how to avoid", "origin"):
            t.add_column(c, overflow="fold")
        for m in b.mistakes:
            t.add_row(m["mistake_id"], m["description"], *((m["why_it_happens"],) if full else ()), m["how_to_avoid"],
                      m.get("origin", "static") + (f" {m['added_in']}" if m.get("added_in") else ""))
        out.print(t)


@skills_app.command("diff")
@cli_errors
def diff_cmd(old: BankArg, new: BankArg, run_dir: RunDirOpt = None) -> None:
    """Items added, removed, changed or renamed between two banks (e.g. two versions of a run)."""
    from stages.engine.skills.diff import diff_banks

    a, b = _resolve_bank(old, run_dir), _resolve_bank(new, run_dir)
    rows = diff_banks(a, b)
    out.print(f"{a.path} ({a.version}) -> {b.path} ({b.version})")
    if not rows:
        out.print("no differences in the items")
        return
    t = Table(title="bank diff")
    for c in ("status", "kind", "old id", "new id", "item", "fields"):
        t.add_column(c, overflow="fold")
    style = {"added": "green", "removed": "red", "changed": "yellow", "renamed": "cyan"}
    for r in rows:
        t.add_row(Text(r["status"], style=style[r["status"]]), r["kind"], r["old_id"] or "", r["new_id"] or "",
                  r["label"], ", ".join(r["fields"]))
    out.print(t)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@skills_app.command("stats")
@cli_errors
def stats_cmd(
    bank: Annotated[str | None, typer.Argument(help="Bank: .json, .parquet, a run's bank/ folder (latest version), or vNNNN with --run-dir. Not needed with --run.")] = None,
    problems: Annotated[str | None, typer.Option("--problems", help="Problem set: file with a 'problem' column or a benchmark name (needed without --run).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="A training run: per bank item, how often it was retrieved and how its teachers were judged (helpful, warning, misleading, over_suppressive, neutral) over every step.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Retrieval mode: lexical, embedding, hybrid, random.")] = "lexical",
    index: Annotated[str | None, typer.Option("--index", help="Index from `sgsd build-index` (must match the bank version).")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="Sentence encoder for embedding / hybrid retrieval without an index.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Top-k skills and mistakes per problem.")] = 8,
    top: Annotated[int, typer.Option("--top", min=0, help="Rows printed per kind (most retrieved first); 0 = all.")] = 0,
    output: Annotated[Path | None, typer.Option("--output", help="Also write the statistics table to this Parquet file.")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Folder holding benchmark files.")] = None,
    seed: Seed = 0,
    run_dir: RunDirOpt = None,
) -> None:
    """Which items are retrieved how often over a problem set, or (--run) how their teachers fared over a run."""
    if run is not None:
        from stages import report
        from stages.engine.atomic import write_parquet

        df = report.skill_stats(run)
        if output:
            write_parquet(df, output)
        out.print(report.skill_stats_table(df, top))
        if output:
            out.print(f"statistics: {output}")
        return
    if bank is None or problems is None:
        raise InputError(None, "skills stats needs a BANK and --problems, or --run RUN_DIR")
    import polars as pl

    from stages.engine.benchmarks import load_problems
    from stages.engine.atomic import write_parquet
    from stages.engine.skills.retrieval import make_retriever, retrieval_stats

    b = _resolve_bank(bank, run_dir)
    probs = load_problems(problems, data_dir=data_dir)["problem"].to_list()
    retr = make_retriever(b, mode=mode, index_path=index, encoder=encoder, seed=seed)
    with progress_bars() as bars:
        df = retrieval_stats(retr, probs, k=k, on_done=bars("retrieve", len(set(probs))))
    if output:
        write_parquet(df, output)
    out.print(f"{len(probs)} problems, mode {mode}, k={k}, bank version {b.version}")
    for kind in ("skill", "mistake"):
        sub = df.filter(pl.col("kind") == kind)
        never = int((sub["retrieved"] == 0).sum())
        t = Table(title=f"{kind}s: {sub.height} items, {never} never retrieved "
                        f"(n: problems retrieving it, top1: as teacher 0, rank / weight: means)")
        t.add_column("id", no_wrap=True)
        t.add_column("item", overflow="fold", ratio=1)
        t.add_column("origin", no_wrap=True)
        for c in ("n", "share", "top1", "rank", "weight"):
            t.add_column(c, justify="right", no_wrap=True)
        for r in (sub.head(top) if top else sub).iter_rows(named=True):
            t.add_row(r["item_id"], r["label"], r["origin"], str(r["retrieved"]), f"{r['share']:.2f}", str(r["top1"]),
                      "-" if r["mean_rank"] is None else f"{r['mean_rank']:.2f}",
                      "-" if r["mean_weight"] is None else f"{r['mean_weight']:.3f}")
        out.print(t)
    if output:
        out.print(f"statistics: {output}")
