"""`sgsd eval`: the paper's evaluation protocol on registered benchmarks or a problems file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sgsd_cli.common import PIPELINE, Device, Dtype, Force, GgufFile, Seed, app, cli_errors, out, progress_bars
from stages import eval as ev
from stages.engine.io import InputError

_BENCH_HELP = ("Benchmark name, repeatable: aime24, aime25, hmmt25, math500 (local files or hub), amc23, minerva "
               "(hub only), train, or 'all' (aime24, aime25, hmmt25, math500).")


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def print_summary(summary_path: Path) -> None:
    s = ev.read_summary(summary_path)
    first = s.row(0, named=True)
    t = Table(title=f"sgsd eval — {first['model']} ({first['protocol']} protocol)", title_justify="left")
    t.add_column("bench", no_wrap=True)
    t.add_column("probs", justify="right")
    t.add_column("n", justify="right")
    t.add_column("avg@n", justify="right", style="bold", no_wrap=True)
    t.add_column("±se", justify="right")
    t.add_column("pass@1", justify="right")
    t.add_column("pass@n", justify="right")
    t.add_column("maj@n", justify="right")
    t.add_column("format", justify="right")
    t.add_column("trunc", justify="right")
    t.add_column("tokens", justify="right")
    for r in s.iter_rows(named=True):
        if r["bench"] == "mean":
            t.add_section()
        t.add_row(r["bench"], str(r["problems"]), "—" if r["n"] is None else str(r["n"]), _pct(r["avg_at_n"]),
                  _pct(r["avg_at_n_se"]), _pct(r["pass_at_1"]), _pct(r["pass_at_n"]), _pct(r["maj_at_n"]),
                  _pct(r["format_rate"]), _pct(r["truncation_rate"]), f"{r['mean_tokens']:.0f}")
    out.print(t)
    out.print(f"summary: {summary_path}")


def print_compare(runs: list[Path], metric: str, paper: bool) -> None:
    cols, rows = ev.compare_table(runs, metric=metric, with_paper=paper)
    meta, _ = ev.paper_results() if paper else ({}, None)
    t = Table(title=f"{metric} (%)", title_justify="left")
    t.add_column("run")
    t.add_column("n", justify="right")
    for c in cols[:-1]:
        t.add_column(c, justify="right")
    t.add_column("mean", justify="right", style="bold")
    shown_sep = False
    for label, n, vals, kind in rows:
        if kind == "run" and not shown_sep and any(r[3] == "paper" for r in rows):
            t.add_section()
            shown_sep = True
        t.add_row(label, "—" if n is None else str(n), *[_pct(v) for v in vals], style="dim" if kind == "paper" else None)
    out.print(t)
    if paper and metric == "avg_at_n":
        over = ", ".join(meta.get("benches", []))
        out.print(f"mean = mean over {over} (rows missing one have none); paper rows: {meta.get('model')} "
                  f"avg@{meta.get('n')} as published (docs/DESIGN.md 1.6)")


@app.command("eval", rich_help_panel=PIPELINE)
@cli_errors
def eval_cmd(
    runs: Annotated[list[Path] | None, typer.Argument(help="With --compare: run directories (or summary.parquet files) to show side by side.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", help="HF model folder, hub id, .gguf file, or LoRA adapter folder from `sgsd train` (loaded on its base model).")] = None,
    bench: Annotated[list[str] | None, typer.Option("--bench", help=_BENCH_HELP, show_default=False)] = None,
    problems: Annotated[list[Path] | None, typer.Option("--problems", help="JSONL/Parquet file with id, problem, answer columns (repeatable); named after the file.", show_default=False)] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory: writes eval/<bench>.parquet, eval/summary.parquet and manifests; a rerun resumes.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="Preset: paper (thinking, T=1.0, top_p 0.95, n=12, 38,912 tokens) or quick (n=2, 512 tokens, no thinking) for smoke runs. The options below override it.")] = "paper",
    n: Annotated[int | None, typer.Option("--n", help="Samples per problem (paper: 12).", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Sampling temperature (paper: 1.0; 0 = greedy).", show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass (paper: 0.95).", show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Top-k sampling (paper: 0 = off).", show_default=False)] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Maximum completion tokens (paper: 38,912).", show_default=False)] = None,
    thinking: Annotated[bool | None, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode of the chat template (paper: on).", show_default=False)] = None,
    seed: Seed = 0,
    backend: Annotated[str, typer.Option("--backend", help="Generation backend: auto (vLLM if installed, except for GGUF files; else hf-fast on CUDA, else hf), vllm, hf-fast, hf.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (transformers backend).")] = 32,
    chunk_problems: Annotated[int | None, typer.Option("--chunk-problems", help="Problems per resumable chunk (default: one decode batch for transformers, ~256 sequences for vLLM).", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate only the first N problems of each benchmark.", show_default=False)] = None,
    grade_timeout: Annotated[float, typer.Option("--grade-timeout", help="Hard timeout per graded completion, seconds (a timeout scores 0).")] = 5.0,
    workers: Annotated[int | None, typer.Option("--workers", help="Grading worker processes (default: the verifier's).", show_default=False)] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Folder holding benchmark files (else $SGSD_DATA_DIR, ../shared/data, then the hub).", show_default=False)] = None,
    gguf_file: GgufFile = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Force = False,
    compare: Annotated[bool, typer.Option("--compare", help="Print the summaries of the given RUN directories side by side with the paper's Qwen3-1.7B rows.")] = False,
    metric: Annotated[str, typer.Option("--metric", help="With --compare: summary column to compare (avg_at_n, pass_at_n, maj_at_n, format_rate ...).")] = "avg_at_n",
    paper: Annotated[bool, typer.Option("--paper/--no-paper", help="With --compare: show the paper's rows.")] = True,
) -> None:
    """Evaluate a model with the paper's protocol: avg@n, pass@1/pass@n, maj@n, format and truncation rates."""
    if compare:
        if not runs:
            raise InputError(None, "--compare needs one or more run directories: sgsd eval --compare RUN_A RUN_B")
        print_compare(list(runs), metric, paper)
        return
    if runs:
        raise InputError(None, f"unexpected argument '{runs[0]}' (run directories are only taken with --compare)")
    if model is None:
        raise InputError(None, "--model is required (or use --compare RUN ...)")
    if run_dir is None:
        raise InputError(None, "--run-dir is required")
    cfg = ev.EvalConfig(
        model=model, benches=list(bench or []), problems=[str(p) for p in problems or []], protocol=protocol,
        n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, thinking=thinking,
        seed=seed, backend=backend, batch_size=batch_size, chunk_problems=chunk_problems, limit=limit,
        grade_timeout_s=grade_timeout, grade_workers=workers, gguf_file=gguf_file, data_dir=data_dir,
        device=device, dtype=dtype,
    )
    with progress_bars() as bars:
        path = ev.run(cfg, run_dir, force=force, progress=bars)
    print_summary(path)
