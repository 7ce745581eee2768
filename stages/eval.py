"""`sgsd eval`: the paper's evaluation protocol and its metrics (docs/DESIGN.md 1.6).

Protocol (``paper`` preset): Qwen3 thinking mode on, T=1.0, top_p 0.95, n=12 samples per problem, up to
38,912 new tokens, the student prompt ``Problem: {problem}\\n\\nPlease reason step by step, and put your
final answer within \\boxed{}.`` through the chat template; completions graded by ``stages.engine.grading`` (the
same grader as training: last ``\\boxed{}``, math-verify, hard timeouts).

Metrics per benchmark (and their macro mean over benchmarks):

* ``avg_at_n``  mean over problems of (correct samples / n): the headline number; ``avg_at_n_se`` is its
  standard error across problems (sample std of the per-problem accuracies / sqrt(#problems)).
* ``pass_at_1``, ``pass_at_n``  the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over problems
  (Chen et al. 2021); pass@1 equals avg@n.
* ``maj_at_n``  majority vote over the normalised extracted answers of the n samples (samples without an
  answer do not vote; a problem with no vote scores 0).  A tie between several top answers scores the
  share of tied answers that are correct, i.e. the expected score of a uniformly random tie-break.
* ``format_rate``  share of samples with an extracted answer; ``truncation_rate`` share that hit
  max_new_tokens; ``mean_tokens`` mean completion length; ``timeout_rate`` share whose grading timed out.

Outputs under ``<run_dir>/eval/``: ``<bench>.parquet`` (one row per (problem, sample)) with its manifest,
``summary.parquet`` (one row per benchmark plus a ``mean`` row) with its manifest.  Generation runs in
chunks of problems; each finished chunk is written atomically to ``<bench>.parts/part-XXXXX.parquet``, so a
killed run resumes where it stopped.  Each chunk's sampling seed is derived from (seed, benchmark, the
chunk's problem ids), so a chunk produces the same samples whatever ran before it.

Fault injection for tests: ``SGSD_EVAL_CRASH_AFTER=K`` makes the stage raise :class:`InjectedCrash` once
K rows have been generated in this process, before the chunk holding the K-th row is written (what a
kill in the middle of that chunk leaves behind).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from stages.engine import benchmarks
from stages.engine.generation.base import GenerationBackend, SamplingConfig
from stages.engine.generation.factory import make_backend, resolve_backend, vllm_available
from stages.engine.atomic import atomic_write_json, to_jsonable, write_parquet
from stages.engine.config import Checked, opt, shared_opt
from stages.engine.errors import InputError
from stages.engine.locks import lock_run_dir
from stages.engine.manifest import ProgressFn, StageRun, read_manifest
from stages.engine.paths import DATA_DIR
from stages.engine.tableio import read_table
from stages.engine.tables import EVAL_SUMMARY
from stages.engine.prompts import chat_prompt_ids, load_template, student_prompt
from stages.engine.skills.bank import load_bank
from stages.engine.grading import grade_texts
from stages.engine.verify import normalize_answer
from stages.engine.prompts import teacher_prompt
from stages.engine.skills.retrieval import make_retriever, retrieve_many
from stages.engine.models import ModelSpec
from stages.engine.models import load_tokenizer
from stages.engine.models import load_model

PROTOCOLS: dict[str, dict[str, Any]] = {
    # docs/DESIGN.md 1.6: the paper's evaluation settings
    "paper": dict(n=12, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38912, thinking=True),
    # smoke runs: two short non-thinking samples per problem, same prompt and grader
    "quick": dict(n=2, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=512, thinking=False),
}

CRASH_ENV = "SGSD_EVAL_CRASH_AFTER"

ROW_SCHEMA = {
    "bench": pl.String,
    "problem_id": pl.String,
    "sample_index": pl.Int64,
    "problem": pl.String,
    "answer": pl.String,
    "completion": pl.String,
    "extracted_answer": pl.String,
    "normalized_answer": pl.String,
    "correct": pl.Boolean,
    "status": pl.String,
    "tokens": pl.Int64,
    "finish_reason": pl.String,
    "chunk": pl.Int64,
    "seed": pl.Int64,
}

METRIC_COLUMNS = ["avg_at_n", "avg_at_n_se", "pass_at_1", "pass_at_n", "maj_at_n", "format_rate",
                  "truncation_rate", "mean_tokens", "timeout_rate"]

SUMMARY_SCHEMA = {
    "bench": pl.String,
    "n": pl.Int64,
    "problems": pl.Int64,
    "samples": pl.Int64,
    **{m: pl.Float64 for m in METRIC_COLUMNS},
    "model": pl.String,
    "protocol": pl.String,
    "source": pl.String,
    # across sampling seeds (--seeds): how many, and the spread of the seeds' avg@n (std: null for one seed)
    "seeds": pl.Int64,
    "seed_std": pl.Float64,
    "seed_min": pl.Float64,
    "seed_max": pl.Float64,
}

MAX_SEEDS = 100


class InjectedCrash(RuntimeError):
    """Raised by the SGSD_EVAL_CRASH_AFTER fault injection (tests of resume)."""

@dataclass
class EvalConfig(Checked):
    model: str | None = opt(None, "HF model folder, hub id, .gguf file, or LoRA adapter folder from `sgsd train` (loaded on its base model). Required unless --checkpoints.", group="Model")
    benches: list[str] = opt(help="Benchmark from the registry (data/benchmarks.toml): aime24, aime25, hmmt25, math500, train, or all; repeatable.", group="Benchmarks", flag="bench", factory=list)
    problems: list[str] = opt(help="JSONL/Parquet file with id, problem, answer columns (repeatable); named after the file.", group="Benchmarks", factory=list)
    protocol: str = opt("paper", "Preset: paper (thinking, T=1.0, top_p 0.95, n=12, 38,912 tokens) or quick (n=2, 512 tokens, no thinking) for smoke runs. The options below override it.", group="Protocol", choices=("paper", "quick"))
    # None: take the protocol preset's value
    n: int | None = opt(None, "Samples per problem (paper: 12).", group="Protocol", ge=1)
    temperature: float | None = opt(None, "Sampling temperature (paper: 1.0; 0 = greedy).", group="Protocol", ge=0)
    top_p: float | None = opt(None, "Nucleus sampling mass (paper: 0.95).", group="Protocol", gt=0, le=1)
    top_k: int | None = opt(None, "Top-k sampling (paper: 0 = off).", group="Protocol", ge=0)
    max_new_tokens: int | None = opt(None, "Maximum completion tokens (paper: 38,912).", group="Protocol", ge=1)
    thinking: bool | None = opt(None, "Qwen3 thinking mode of the chat template (paper: on).", group="Protocol")
    seed: int = opt(0, "Random seed (sampling, shuffling).", group="Protocol", ge=0)
    backend: str = opt("auto", "Generation backend: auto (vLLM if installed, except for GGUF files; else hf-fast on CUDA, else hf), vllm, hf-fast, hf.", group="Engine", choices=("auto", "vllm", "hf-fast", "hf"))
    batch_size: int = opt(32, "Decode batch: sequences generated together (transformers backends).", group="Engine", ge=1, flag="decode-batch", old=("--batch-size",))
    chunk_problems: int | None = opt(None, "Problems per resumable chunk (default: one decode batch for transformers, ~256 sequences for vLLM).", group="Engine", ge=1)
    limit: int | None = opt(None, "Evaluate only the first N problems of each benchmark.", group="Benchmarks", ge=1)
    verify_timeout_s: float = opt(5.0, "Hard timeout per verifier call (one graded completion), seconds (a timeout scores 0).", group="Engine", flag="verify-timeout", gt=0, old=("--grade-timeout", "grade_timeout_s"))
    grade_workers: int | None = opt(None, "Grading worker processes (default: the verifier's).", group="Engine", flag="workers", ge=1, key=False)
    gguf_file: str | None = shared_opt("gguf_file", group="Model")
    data_dir: str | None = opt(None, "Folder holding benchmark files (else $SGSD_DATA_DIR, ../shared/data, then the hub).", group="Benchmarks")
    device: str = shared_opt("device", group="Model")
    dtype: str = shared_opt("dtype", group="Model")
    # base+skills at inference (the paper's "+skills" rows): the retrieved bank guidance in the eval prompt
    guidance_bank: str | None = opt(None, "Skill bank whose top-ranked (skill, mistake) pair for each problem goes into the eval prompt as the teacher prompt's guidance block (base+skills at inference). Default: the plain student prompt.", group="Protocol")
    guidance_retrieval: str = opt("lexical", "Retrieval of --guidance-bank: lexical, embedding, hybrid or random.", group="Protocol", choices=("embedding", "lexical", "hybrid", "random"))
    # several sampling seeds: each a full eval; the summary gives their mean and spread (see summarize_seeds)
    seeds: str | None = opt(None, "Sampling seeds, each a full eval: a count N (--seed, --seed+1, ..., N seeds) or a list such as 0,1,2 (a single listed seed: 5,). The summary gives the mean over seeds of every metric and the spread of avg@n across seeds (sample std, min, max) beside avg@n ± se. Default: --seed alone.", group="Protocol", metavar="N|S1,S2,...")
    # checkpoint choice on a validation set (run_checkpoints): the test benchmarks never decide it
    checkpoints: str | None = opt(None, "Run directory of `sgsd train` (checkpoint/, checkpoints/step_N/) or `sgsd loop` (step_N/checkpoint/): evaluate every saved checkpoint on --val, pick one by --select, then evaluate only that one on --bench/--problems (the test sets).", group="Checkpoint choice", metavar="RUN")
    val: list[str] = opt(help="With --checkpoints: validation set the checkpoint is chosen on, a benchmark name (math500 ...) or a JSONL/Parquet problems file (e.g. a held-out split of the training pool); repeatable (the rule then uses their macro mean). Must not be one of the test sets.", group="Checkpoint choice", factory=list)
    val_limit: int | None = opt(None, "With --checkpoints: use only the first N problems of each --val set (--limit applies to the test sets).", group="Checkpoint choice", ge=1)
    select: str = opt("best-avg", "With --checkpoints: rule that picks the checkpoint from the validation curve. best-avg: highest validation avg@n (mean over --seeds; macro mean over --val sets), ties (within 1e-12) to the earlier step; last: the last saved step (the validation curve is still reported).", group="Checkpoint choice", choices=("best-avg", "last"))

    def __post_init__(self) -> None:
        super().__post_init__()
        seed_values(self.seed, self.seeds)  # range-checks --seeds wherever the config is built

    def resolved(self) -> "EvalConfig":
        """The config with the protocol preset filled in for every unset sampling option, validated."""
        if self.protocol not in PROTOCOLS:
            raise InputError(None, f"unknown protocol '{self.protocol}' (use {' or '.join(PROTOCOLS)})")
        preset = PROTOCOLS[self.protocol]
        cfg = replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        checks = [
            (bool(cfg.model) or bool(cfg.checkpoints), "--model is required (or --checkpoints RUN)"),
            (not (cfg.model and cfg.checkpoints), "--model and --checkpoints exclude each other (--checkpoints "
                                                  "evaluates the run's own checkpoints)"),
            (bool(cfg.checkpoints) or not (cfg.val or cfg.val_limit is not None),
             "--val and --val-limit are taken with --checkpoints RUN only"),
            (not cfg.checkpoints or bool(cfg.val), "--checkpoints needs --val NAME_OR_FILE: the validation set the "
                                                   "checkpoint is chosen on (the --bench test sets never are)"),
            (cfg.n >= 1, f"--n must be at least 1, got {cfg.n}"),
            (cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}"),
            (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}"),
            (cfg.top_k >= -1, f"--top-k must be >= 0 (0 = off), got {cfg.top_k}"),
            (cfg.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}"),
            (cfg.batch_size >= 1, f"--decode-batch must be at least 1, got {cfg.batch_size}"),
            (cfg.chunk_problems is None or cfg.chunk_problems >= 1, "--chunk-problems must be at least 1"),
            (cfg.limit is None or cfg.limit >= 1, f"--limit must be at least 1, got {cfg.limit}"),
            (cfg.verify_timeout_s > 0, "--verify-timeout must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(None, msg)
        return cfg

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed, batch_size=self.batch_size)


# --------------------------------------------------------------------------------------------------
# metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """maj@n of one problem: the top-voted normalised answer's correctness, ties scored by their share.

    ``answers`` are normalised extracted answers (None: no answer, no vote).  A group of equal answers is
    correct when any of its samples was graded correct (equal answers can differ only by a grading
    timeout).
    """
    votes: dict[str, list[int]] = {}
    for a, c in zip(answers, correct, strict=True):
        if a is None:
            continue
        v = votes.setdefault(a, [0, 0])
        v[0] += 1
        v[1] |= bool(c)
    if not votes:
        return 0.0
    top = max(v[0] for v in votes.values())
    tied = [v[1] for v in votes.values() if v[0] == top]
    return sum(tied) / len(tied)


def per_problem(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per problem (in first-seen order): n, c, maj, acc."""
    base = rows.group_by("problem_id", maintain_order=True).agg(
        n=pl.len(), c=pl.col("correct").sum().cast(pl.Int64),
    )
    votes = (
        rows.filter(pl.col("normalized_answer").is_not_null())
        .group_by("problem_id", "normalized_answer")
        .agg(count=pl.len(), correct=pl.col("correct").any())
    )
    maj = (
        votes.filter(pl.col("count") == pl.col("count").max().over("problem_id"))
        .group_by("problem_id")
        .agg(maj=pl.col("correct").cast(pl.Float64).mean())
    )
    return (
        base.join(maj, on="problem_id", how="left", maintain_order="left")
        .with_columns(pl.col("maj").fill_null(0.0), acc=pl.col("c") / pl.col("n"))
    )


def bench_metrics(rows: pl.DataFrame) -> dict[str, Any]:
    """Metrics of one benchmark's rows (columns problem_id, correct, normalized_answer, extracted_answer,
    finish_reason, tokens, status)."""
    if rows.height == 0:
        raise ValueError("no rows to summarise")
    pp = per_problem(rows)
    ns = pp["n"].unique().to_list()
    if len(ns) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ns)}; avg@n needs the same n")
    n = int(ns[0])
    P = pp.height
    acc = pp["acc"]
    se = float(acc.std(ddof=1)) / math.sqrt(P) if P > 1 else float("nan")
    nc = list(zip(pp["n"].to_list(), pp["c"].to_list()))
    return {
        "n": n,
        "problems": P,
        "samples": rows.height,
        "avg_at_n": float(acc.mean()),
        "avg_at_n_se": se,
        "pass_at_1": sum(pass_at_k(a, b, 1) for a, b in nc) / P,
        "pass_at_n": sum(pass_at_k(a, b, n) for a, b in nc) / P,
        "maj_at_n": float(pp["maj"].mean()),
        "format_rate": float(rows["extracted_answer"].is_not_null().mean()),
        "truncation_rate": float((rows["finish_reason"] == "length").mean()),
        "mean_tokens": float(rows["tokens"].mean()),
        "timeout_rate": float((rows["status"] == "timeout").mean()),
    }


def mean_row(summary: pl.DataFrame) -> dict[str, Any]:
    """Macro mean over benchmark rows (each benchmark weighs the same, as in the paper's "Avg." column)."""
    B = summary.height
    ns = summary["n"].unique().to_list()
    row: dict[str, Any] = {
        "bench": "mean",
        "n": int(ns[0]) if len(ns) == 1 else None,
        "problems": int(summary["problems"].sum()),
        "samples": int(summary["samples"].sum()),
    }
    for m in METRIC_COLUMNS:
        row[m] = float(summary[m].mean())
    # the benchmarks are independent samples: se of their mean = sqrt(sum se^2) / B
    row["avg_at_n_se"] = math.sqrt(float((summary["avg_at_n_se"] ** 2).sum())) / B
    for c in ("model", "protocol"):
        vals = summary[c].unique().to_list()
        row[c] = vals[0] if len(vals) == 1 else "mixed"
    row["source"] = ",".join(summary["bench"].to_list())
    return row


def summarize(tables: dict[str, pl.DataFrame], model: str, protocol: str,
              sources: dict[str, str] | None = None) -> pl.DataFrame:
    """Summary table: one row per benchmark, then a ``mean`` row when there are several (one seed: seeds = 1,
    seed_min = seed_max = avg@n, seed_std null)."""
    rows = []
    for name, df in tables.items():
        rows.append({"bench": name, **bench_metrics(df), "model": model, "protocol": protocol,
                     "source": (sources or {}).get(name, "")})
    summary = pl.DataFrame(rows, schema=SUMMARY_SCHEMA)
    if summary.height > 1:
        summary = pl.concat([summary, pl.DataFrame([mean_row(summary)], schema=SUMMARY_SCHEMA)])
    return summary.with_columns(seeds=pl.lit(1, pl.Int64), seed_std=pl.lit(None, pl.Float64),
                                seed_min=pl.col("avg_at_n"), seed_max=pl.col("avg_at_n"))


def seed_values(seed: int, seeds: str | int | None) -> list[int]:
    """The sampling seeds of ``--seeds``: None -> [seed]; a count N -> seed, seed+1, ..., seed+N-1; a comma
    list ``0,3,7`` (or ``5,`` for one) -> those seeds.  Out of range -> InputError (1 to MAX_SEEDS distinct
    seeds, each in [0, 2^31))."""
    if seeds is None:
        return [seed]
    text = str(seeds).strip()
    bad = f"--seeds must be a count N or a comma list of seeds such as 0,1,2 (got {str(seeds)!r})"
    if "," not in text:
        try:
            n = int(text)
        except ValueError:
            raise InputError(None, bad) from None
        if not 1 <= n <= MAX_SEEDS:
            raise InputError(None, f"--seeds: the count must be between 1 and {MAX_SEEDS} (got {n})")
        out = list(range(seed, seed + n))
    else:
        try:
            out = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise InputError(None, bad) from None
        if not out:
            raise InputError(None, bad)
        if len(out) > MAX_SEEDS:
            raise InputError(None, f"--seeds: at most {MAX_SEEDS} seeds (got {len(out)})")
        if len(set(out)) != len(out):
            raise InputError(None, f"--seeds lists a seed twice ({text})")
    if any(not 0 <= v < 2 ** 31 for v in out):
        raise InputError(None, f"--seeds: every seed must be in [0, 2^31) (got {text}, from --seed {seed})")
    return out


def seed_spread(values: Sequence[float]) -> dict[str, float | None]:
    """Spread of one metric across sampling seeds: sample std (ddof 1; None for one seed), min and max."""
    if not values:
        raise ValueError("no seeds")
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite value among {vals}")
    m = sum(vals) / len(vals)
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"seed_std": std, "seed_min": min(vals), "seed_max": max(vals)}


def summarize_seeds(per_seed: dict[int, dict[str, pl.DataFrame]], model: str, protocol: str,
                    sources: dict[str, str] | None = None) -> pl.DataFrame:
    """Summary over several sampling seeds (each seed a full set of rows per benchmark; benchmarks missing from
    one seed are left out).

    Every metric is the mean over seeds of that seed's value (avg@n: the same as pooling the seeds' samples).
    ``avg_at_n_se`` is the standard error across problems of the per-problem accuracy pooled over all seeds'
    samples (the mean row: sqrt(sum se^2) / B, as for one seed); ``seed_std`` / ``seed_min`` / ``seed_max`` are
    the spread of the seeds' avg@n (the mean row: of each seed's macro mean)."""
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("no seeds")
    names = [b for b in per_seed[seeds[0]] if all(b in per_seed[s] for s in seeds)]
    if not names:
        raise ValueError("no benchmark was evaluated with every seed")
    if len(seeds) == 1:
        return summarize({b: per_seed[seeds[0]][b] for b in names}, model, protocol, sources)
    each = {s: summarize({b: per_seed[s][b] for b in names}, model, protocol, sources) for s in seeds}
    rows = []
    for i, bench in enumerate(each[seeds[0]]["bench"].to_list()):
        per = [each[s].row(i, named=True) for s in seeds]
        row: dict[str, Any] = {"bench": bench, "n": per[0]["n"], "problems": per[0]["problems"],
                               "samples": sum(r["samples"] for r in per), "model": model, "protocol": protocol,
                               "source": per[0]["source"]}
        for m in METRIC_COLUMNS:
            row[m] = sum(r[m] for r in per) / len(per)
        if bench != "mean":
            row["avg_at_n_se"] = bench_metrics(pl.concat([per_seed[s][bench] for s in seeds]))["avg_at_n_se"]
        rows.append({**row, "seeds": len(seeds), **seed_spread([r["avg_at_n"] for r in per])})
    out = pl.DataFrame(rows, schema=SUMMARY_SCHEMA)
    if out.height > 1:  # the mean row's se from the pooled per-benchmark se
        ses = out.filter(pl.col("bench") != "mean")["avg_at_n_se"]
        out = out.with_columns(avg_at_n_se=pl.when(pl.col("bench") == "mean")
                               .then(pl.lit(math.sqrt(float((ses ** 2).sum())) / ses.len()))
                               .otherwise(pl.col("avg_at_n_se")))
    return out


# --------------------------------------------------------------------------------------------------
# model identity, seeds, chunking


def model_fingerprint(spec) -> str:
    """Identifies the weights behind a model spec, so a retrained model in the same folder is not mistaken
    for the old one.  Files up to 64 MiB are hashed whole; larger ones by size and three 1 MiB windows."""
    h = hashlib.sha256()
    local = False
    for root in (spec.path, spec.adapter):
        if not root:
            continue
        p = Path(root)
        if not p.exists():
            h.update(f"hub:{root}".encode())
            continue
        local = True
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
        if spec.gguf_file and p.is_dir():  # a folder of several quantisations: only the chosen one counts
            files = [f for f in files if f.suffix != ".gguf" or f.name == spec.gguf_file]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                if size <= 64 << 20:
                    h.update(fh.read())
                else:
                    for off in (0, size // 2, size - (1 << 20)):
                        fh.seek(off)
                        h.update(fh.read(1 << 20))
    return ("local:" if local else "") + h.hexdigest()[:32]


def chunk_seed(seed: int, bench: str, problem_ids: Sequence[str]) -> int:
    """Sampling seed of one chunk: a function of the run seed, the benchmark and the chunk's problems only."""
    h = hashlib.sha256(f"{seed}\x00{bench}\x00".encode() + "\x00".join(problem_ids).encode())
    return int.from_bytes(h.digest()[:4], "little") & 0x7FFFFFFF


def resolve_backend_kind(kind: str, spec) -> str:
    """make_backend's choice, made before any model is loaded (a fully resumed eval loads nothing)."""
    import torch

    return resolve_backend(kind, spec, cuda=torch.cuda.is_available())


def default_chunk_problems(kind: str, batch_size: int, n: int) -> int:
    """Problems per chunk: one decode batch for transformers; ~256 sequences for vLLM (it batches itself)."""
    per = 256 if kind == "vllm" else batch_size
    return max(1, per // n)


# --------------------------------------------------------------------------------------------------
# the stage


class _Generator:
    """Loads the model and builds the backend on first use (a fully resumed run loads nothing)."""
    def __init__(self, cfg: EvalConfig, spec, kind: str, loaded=None, backend: GenerationBackend | None = None):
        self.cfg, self.spec, self.kind = cfg, spec, kind
        self.model, self.tok = (loaded[0], loaded[1]) if loaded else (None, None)
        self.backend = backend

    def get(self) -> tuple[GenerationBackend, Any]:
        if self.backend is None or self.tok is None:
            if self.kind == "vllm" and self.model is None:

                self.tok = self.tok or load_tokenizer(self.spec)
                self.backend = self.backend or make_backend("vllm", tokenizer=self.tok, spec=self.spec,
                                                            dtype=self.cfg.dtype, seed=self.cfg.seed)
            else:
                if self.model is None:

                    self.model, self.tok, _ = load_model(self.spec, device=self.cfg.device, dtype=self.cfg.dtype)
                self.backend = self.backend or make_backend(self.kind, model=self.model, tokenizer=self.tok,
                                                            spec=self.spec)
        return self.backend, self.tok

    def close(self) -> None:
        """Free the model and engine this generator built (several checkpoints are evaluated in one process)."""
        import gc

        import torch

        if self.backend is not None and hasattr(self.backend, "close"):
            self.backend.close()
        self.backend = self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _bank_id(bank: str | None, retrieval: str) -> str | None:
    """The guidance bank's content version and retrieval mode (None: plain student prompt)."""
    if not bank:
        return None

    return f"{load_bank(bank).version}:{retrieval}"


def bench_key(cfg: EvalConfig, ps: benchmarks.Problems, spec, fingerprint: str, kind: str, chunk: int) -> dict:
    """Everything that decides the rows of one benchmark: the manifest config and the resume key."""
    return {
        "bench": ps.name,
        "problems_source": ps.source,
        "problems_hash": ps.content_hash(),
        "problems": ps.df.height,
        "model": spec.to_json(),
        "model_fingerprint": fingerprint,
        "protocol": cfg.protocol,
        "n": cfg.n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "thinking": cfg.thinking,
        "seed": cfg.seed,
        "prompt_template": load_template("student"),
        "guidance_bank": _bank_id(cfg.guidance_bank, cfg.guidance_retrieval),
        "backend": kind,
        "chunk_problems": chunk,
        "dtype": cfg.dtype,
        "grade_timeout_s": cfg.verify_timeout_s,  # manifest key kept: earlier runs' results stay reusable
    }


def _crash_after() -> int | None:
    v = os.environ.get(CRASH_ENV)
    return int(v) if v else None


@dataclass
class _Counter:
    rows: int = 0


def _grade(texts: list[str], golds: list[str], cfg: EvalConfig):

    grades = grade_texts(texts, golds, timeout_s=cfg.verify_timeout_s, workers=cfg.grade_workers)
    norm = [normalize_answer(g.pred) if g.pred is not None else None for g in grades]
    return grades, norm


def eval_prompts(cfg: EvalConfig, problems: list[str]) -> list[str]:
    """User-turn texts: the student prompt, or with ``guidance_bank`` the teacher prompt carrying each
    problem's top-ranked (skill, mistake) pair (stages.engine.skills.retrieval, as score-teachers does)."""
    if not cfg.guidance_bank:
        return [student_prompt(p) for p in problems]

    retriever = make_retriever(load_bank(cfg.guidance_bank), mode=cfg.guidance_retrieval, seed=cfg.seed)
    pools = retrieve_many(retriever, problems, k=1)
    out = []
    for p, pool in zip(problems, pools):
        out.append(teacher_prompt(p, pool[0].skill, pool[0].mistake) if pool else student_prompt(p))
    return out


def generate_chunk(gen: _Generator, cfg: EvalConfig, bench: str, chunk_df: pl.DataFrame, chunk_index: int,
                   on_done: Callable[[int], None] | None, counter: _Counter) -> pl.DataFrame:
    backend, tok = gen.get()
    ids, probs, golds = (chunk_df[c].to_list() for c in ("id", "problem", "answer"))
    prompts = [chat_prompt_ids(tok, t, cfg.thinking) for t in eval_prompts(cfg, probs)]
    seed = chunk_seed(cfg.seed, bench, ids)
    comps = backend.generate(prompts, cfg.sampling(seed), on_done=on_done)
    counter.rows += len(comps)
    limit = _crash_after()
    if limit is not None and counter.rows >= limit:
        raise InjectedCrash(f"{CRASH_ENV}={limit}: crashed after {counter.rows} generated rows")
    grades, norm = _grade([c.text for c in comps], [golds[c.prompt_index] for c in comps], cfg)
    return pl.DataFrame({
        "bench": [bench] * len(comps),
        "problem_id": [ids[c.prompt_index] for c in comps],
        "sample_index": [c.sample_index for c in comps],
        "problem": [probs[c.prompt_index] for c in comps],
        "answer": [golds[c.prompt_index] for c in comps],
        "completion": [c.text for c in comps],
        "extracted_answer": [g.pred for g in grades],
        "normalized_answer": norm,
        "correct": [bool(g.correct) for g in grades],
        "status": [g.status for g in grades],
        "tokens": [len(c.token_ids) for c in comps],
        "finish_reason": [c.finish_reason for c in comps],
        "chunk": [chunk_index] * len(comps),
        "seed": [seed] * len(comps),
    }, schema=ROW_SCHEMA)


def _part_ok(path: Path, chunk_df: pl.DataFrame, n: int) -> bool:
    """A part file is usable when it reads and holds exactly (chunk problems x n samples)."""
    try:
        part = pl.read_parquet(path)
    except Exception:
        return False
    want = {(i, s) for i in chunk_df["id"].to_list() for s in range(n)}
    have = set(zip(part["problem_id"].to_list(), part["sample_index"].to_list()))
    return part.height == len(want) and have == want and part.schema == pl.Schema(ROW_SCHEMA)


def prepare_parts(ps: benchmarks.Problems, key: dict, eval_dir: Path, force: bool) -> Path:
    """The part-file folder of one benchmark, checked against the settings that wrote it (resume key)."""
    parts_dir = eval_dir / f"{ps.name}.parts"
    key_path = parts_dir / "key.json"
    key_json = to_jsonable(key)
    if parts_dir.exists():
        old = None
        try:
            old = json.loads(key_path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        if old != key_json:
            if not force and old is not None:
                diff = sorted(k for k in set(old) | set(key_json) if old.get(k) != key_json.get(k))
                raise InputError(parts_dir, f"partial results of an eval with other settings ({', '.join(diff)}); "
                                            "pass --force to discard them")
            shutil.rmtree(parts_dir)
        elif force:
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(key_path, key_json)
    return parts_dir


def evaluate_bench(gen: _Generator, cfg: EvalConfig, ps: benchmarks.Problems, key: dict, parts_dir: Path,
                   progress: ProgressFn | None, counter: _Counter) -> pl.DataFrame:
    """Generate and grade every (problem, sample) of one benchmark, resuming from finished part files."""
    step = key["chunk_problems"]
    df = ps.df
    chunks = [df.slice(i, step) for i in range(0, df.height, step)]
    advance = progress(f"eval {ps.name}", df.height * cfg.n) if progress else None
    tables = []
    for ci, chunk_df in enumerate(chunks):
        part = parts_dir / f"part-{ci:05d}.parquet"
        if part.exists() and _part_ok(part, chunk_df, cfg.n):
            tables.append(pl.read_parquet(part))
            if advance:
                advance(chunk_df.height * cfg.n)
            continue
        t = generate_chunk(gen, cfg, ps.name, chunk_df, ci, advance, counter)
        write_parquet(t, part)
        tables.append(t)
    return pl.concat(tables)


def run(
    cfg: EvalConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
    loaded=None,
    backend: GenerationBackend | None = None,
    join_earlier: bool = True,
) -> Path:
    """Stage entry point.  Returns the path of ``<run_dir>/eval/summary.parquet``.

    ``progress(description, total)`` returns an advance callback (the CLI passes rich bars); ``loaded`` =
    (model, tokenizer, spec) reuses a resident model and ``backend`` a built generation backend (the loop).
    ``join_earlier=False`` keeps earlier benchmarks of the run directory out of the summary.  A model this call
    loaded itself is released before it returns.  ``--checkpoints`` is :func:`run_checkpoints`.
    """

    cfg = cfg.resolved()
    if cfg.checkpoints:
        raise InputError(None, "--checkpoints is run by `sgsd eval --checkpoints RUN` (stages.eval.run_checkpoints), "
                               "not as a plain eval")
    if loaded is not None:
        spec = loaded[2]
    else:
        spec = ModelSpec.parse(cfg.model, cfg.gguf_file)
        spec.check()
    # load every problem set first: bad input fails before any model is loaded or file written
    sets: list[benchmarks.Problems] = []
    names = benchmarks.expand_bench_names(cfg.benches) if cfg.benches else []
    sets += [benchmarks.load_benchmark(b, data_dir=cfg.data_dir) for b in names]
    sets += [benchmarks.load(Path(p)) for p in cfg.problems]
    if not sets:
        raise InputError(None, "nothing to evaluate: pass --bench NAME (" + ", ".join(benchmarks.known_benchmarks())
                               + ", all) or --problems FILE")
    seen: dict[str, str] = {}
    for ps in sets:
        if ps.name in seen:
            raise InputError(ps.source, f"benchmark name '{ps.name}' is used twice (also {seen[ps.name]}); "
                                        "rename the problems file")
        if ps.name == "summary":
            raise InputError(ps.source, "'summary' is reserved for the summary table; rename the problems file")
        seen[ps.name] = ps.source
        if cfg.limit is not None:
            ps.df = ps.df.head(cfg.limit)

    kind = backend.name if backend is not None else resolve_backend_kind(cfg.backend, spec)
    if backend is None and kind == "vllm":
        if not vllm_available():
            raise InputError(None, "backend 'vllm' requested but vllm is not installed (pip install 'sgsd[vllm]')")
        if spec.gguf_file:
            raise InputError(spec.path, "the vllm backend does not load GGUF files (use --backend hf)")
    chunk = cfg.chunk_problems or default_chunk_problems(kind, cfg.batch_size, cfg.n)
    fingerprint = model_fingerprint(spec)
    model_name = spec.adapter or (f"{spec.path}/{spec.gguf_file}" if spec.gguf_file else spec.path)
    eval_dir = Path(run_dir) / "eval"
    seeds = seed_values(cfg.seed, cfg.seeds)
    multi = len(seeds) > 1
    owns = loaded is None and backend is None
    gen = _Generator(cfg, spec, kind, loaded=loaded, backend=backend)
    counter = _Counter()

    # check every (seed, benchmark)'s manifest and partial results before generating anything; several seeds:
    # each seed's tables under eval/seed_<s>/, the summary over seeds in eval/summary.parquet
    plans = []
    for s in seeds:
        scfg = replace(cfg, seed=s, seeds=None)
        d = eval_dir / f"seed_{s}" if multi else eval_dir
        for ps in sets:
            key = bench_key(scfg, ps, spec, fingerprint, kind, chunk)
            stage = StageRun(d, "eval", config=key, inputs={"problems": ps.path}, force=force, seed=s,
                             output_name=ps.name)
            plans.append((s, scfg, d, ps, key, stage, None if stage.done else prepare_parts(ps, key, d, force)))

    per_seed: dict[int, dict[str, pl.DataFrame]] = {s: {} for s in seeds}
    sources: dict[str, str] = {}
    try:
        for s, scfg, d, ps, key, stage, parts_dir in plans:
            if parts_dir is None:
                rows = pl.read_parquet(stage.output)
            else:
                rows = evaluate_bench(gen, scfg, ps, key, parts_dir, progress, counter)
                stage.finish(rows, extra={"metrics": bench_metrics(rows), "backend": kind, "model_name": model_name})
                shutil.rmtree(parts_dir, ignore_errors=True)
            per_seed[s][ps.name] = rows
            sources[ps.name] = ps.source
    finally:
        if owns:
            gen.close()

    # earlier benchmarks of this run directory evaluated with the same model and settings join the summary
    if join_earlier:
        for s in seeds:
            scfg = replace(cfg, seed=s, seeds=None)
            d = eval_dir / f"seed_{s}" if multi else eval_dir
            for name, (rows, src) in _compatible_earlier(d, scfg, fingerprint, kind, chunk,
                                                         exclude=set(per_seed[s])).items():
                per_seed[s][name], sources[name] = rows, src
    summary = summarize_seeds(per_seed, model_name, cfg.protocol, sources)
    names = [b for b in summary["bench"].to_list() if b != "mean"]
    inputs = {f"{name}@{s}" if multi else name: (eval_dir / f"seed_{s}" if multi else eval_dir) / f"{name}.parquet"
              for s in seeds for name in names}
    sum_cfg = {"benches": names, "model": model_name, "protocol": cfg.protocol}
    if multi:
        sum_cfg["seeds"] = seeds
    sum_stage = StageRun(eval_dir, "eval-summary", config=sum_cfg, inputs=inputs, force=True, seed=cfg.seed,
                         output_name="summary")
    settings = {k: key[k] for k in _SETTINGS_KEYS}
    settings["seeds"] = seeds
    sum_stage.finish(summary, extra={"settings": settings})
    return sum_stage.output


_SETTINGS_KEYS = ("model", "model_fingerprint", "protocol", "n", "temperature", "top_p", "top_k", "max_new_tokens",
                  "thinking", "seed", "prompt_template", "backend", "dtype", "grade_timeout_s")


def _compatible_earlier(eval_dir: Path, cfg: EvalConfig, fingerprint: str, kind: str, chunk: int,
                        exclude: set[str]) -> dict[str, tuple[pl.DataFrame, str]]:
    out: dict[str, tuple[pl.DataFrame, str]] = {}
    if not eval_dir.is_dir():
        return out
    want = {"model_fingerprint": fingerprint, "protocol": cfg.protocol, "n": cfg.n, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens, "thinking": cfg.thinking,
            "seed": cfg.seed, "prompt_template": load_template("student"), "dtype": cfg.dtype,
            "guidance_bank": _bank_id(cfg.guidance_bank, cfg.guidance_retrieval),
            "grade_timeout_s": cfg.verify_timeout_s}
    for mpath in sorted(eval_dir.glob("*.manifest.json")):
        name = mpath.name[: -len(".manifest.json")]
        if name in exclude or name == "summary":
            continue
        try:
            m = read_manifest(mpath)
        except (OSError, json.JSONDecodeError):
            continue
        conf = m.get("config") or {}
        table = eval_dir / f"{name}.parquet"
        if m.get("stage") != "eval" or not m.get("complete") or not table.exists():
            continue
        if any(conf.get(k) != v for k, v in to_jsonable(want).items()):
            continue
        out[name] = (pl.read_parquet(table), conf.get("problems_source", ""))
    return out


# --------------------------------------------------------------------------------------------------
# checkpoint choice on a validation set (`sgsd eval --checkpoints RUN`)
#
# Every saved checkpoint of a training run is evaluated on the validation set(s) (--val), one is picked by a
# named rule from that curve alone, and only the picked one is evaluated on the test sets (--bench/--problems).
# Outputs under <run_dir>/select/: val/step_<N>/eval/ and test/step_<N>/eval/ (plain eval runs: manifests,
# resume), validation.parquet (the curve: one row per (step, val set [+ mean])), choice.parquet (one row: rule,
# step, value), test.parquet (the chosen step's test summary); <run_dir>/eval/summary.parquet is that test
# summary too (so `sgsd eval --compare` and `sgsd report` read it like any eval).

SELECT_RULES = ("best-avg", "last")
TIE_TOL = 1e-12  # validation values this close count as a tie (the earlier step wins)
SELECT_DIR = "select"
_LOOP_STEP_RE = re.compile(r"^step_(\d+)$")

CHOICE_SCHEMA = {
    "rule": pl.String, "step": pl.Int64, "loop_step": pl.Int64, "checkpoint": pl.String, "val_bench": pl.String,
    "val_metric": pl.String, "val_value": pl.Float64, "val_se": pl.Float64, "val_seed_std": pl.Float64,
    "candidates": pl.Int64, "first_step": pl.Int64, "last_step": pl.Int64, "val_sets": pl.String,
    "test_sets": pl.String, "val_test_overlap": pl.Int64, "seeds": pl.String, "run": pl.String,
}


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint of a training run: its policy step (optimizer steps since training began), folder and,
    for a loop run, the loop step whose folder holds it."""
    step: int
    path: Path
    loop_step: int | None = None

    @property
    def label(self) -> str:
        return f"step_{self.step:06d}"


def _policy_step(path: Path) -> int:
    """The policy step of a checkpoint folder, after checking every file against its checksums."""
    from stages.engine import checkpoint as ckpt

    ckpt.validate(path)
    meta_path = path / ckpt.META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(meta_path, "checkpoint metadata is not readable JSON") from None
    step = meta.get("policy_step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InputError(meta_path, f"checkpoint metadata has no valid policy_step (got {step!r})")
    return step


def list_checkpoints(run: str | Path) -> list[SavedCheckpoint]:
    """Every saved checkpoint of a training run, by policy step: ``sgsd train``'s checkpoint/ and
    checkpoints/step_N/, ``sgsd loop``'s step_N/checkpoint/ (and step_N/checkpoints/step_M/).  Each is validated
    (checksums); none found, an invalid one or a policy step saved twice -> InputError."""
    from stages.engine import checkpoint as ckpt

    run = Path(run)
    if not run.is_dir():
        raise InputError(run, "training run directory not found (--checkpoints RUN)")
    if ckpt.is_checkpoint(run):
        raise InputError(run, "this is a checkpoint folder, not a run directory: pass the run directory holding it "
                              "to --checkpoints, or evaluate it alone with --model")
    found: list[tuple[int | None, Path]] = [(None, p) for p in ckpt.candidates(run)]
    loop_steps = sorted((int(m.group(1)), d) for d in run.iterdir()
                        if d.is_dir() and (m := _LOOP_STEP_RE.match(d.name)))
    for n, d in loop_steps:
        found += [(n, p) for p in ckpt.candidates(d)]
    if not found:
        raise InputError(run, "no checkpoints in this run directory (looked for checkpoint/ and checkpoints/step_N/ "
                              "of `sgsd train`, step_N/checkpoint/ of `sgsd loop`; the loop keeps only --keep-last "
                              "step checkpoints, 0 keeps all)")
    out: dict[int, SavedCheckpoint] = {}
    for loop_step, p in found:
        step = _policy_step(p)
        if step in out:
            raise InputError(p, f"policy step {step} is saved twice in this run (also {out[step].path})")
        out[step] = SavedCheckpoint(step, p, loop_step)
    return [out[k] for k in sorted(out)]


def choose_step(curve: Sequence[tuple[int, float]], rule: str) -> int:
    """The step a rule picks from a validation curve [(step, value)].

    ``best-avg``: the highest value; values within TIE_TOL of it tie and the earliest of them wins.  ``last``:
    the highest step.  Non-finite values and repeated steps are refused (ValueError)."""
    if not curve:
        raise ValueError("empty validation curve")
    steps = [int(st) for st, _ in curve]
    if len(set(steps)) != len(steps):
        raise ValueError(f"a step appears twice in the curve {steps}")
    if rule == "last":
        return max(steps)
    if rule != "best-avg":
        raise ValueError(f"unknown selection rule {rule!r} (use {', '.join(SELECT_RULES)})")
    for st, v in curve:
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"step {st}: validation value {v} is not a finite number")
    best = max(float(v) for _, v in curve)
    return min(int(st) for st, v in curve if float(v) >= best - TIE_TOL)


def _load_sets(names: list[str], files: list[str], data_dir: str | None, limit: int | None) -> list[benchmarks.Problems]:
    sets = [benchmarks.load_benchmark(b, data_dir=data_dir) for b in (benchmarks.expand_bench_names(names) if names else [])]
    sets += [benchmarks.load(Path(f)) for f in files]
    for ps in sets:
        if limit is not None:
            ps.df = ps.df.head(limit)
    return sets


def _split_val(val: list[str]) -> tuple[list[str], list[str]]:
    """--val entries -> (registry names, problem files): a bare known name is a benchmark, anything else a file."""
    names, files = [], []
    for v in val:
        if benchmarks.is_bare_name(v):
            try:
                names.append(benchmarks.get_benchmark(v).name)
                continue
            except InputError:
                if not Path(v).is_file():
                    raise
        files.append(v)
    return names, files


def _norm_problem(text: str) -> str:
    return " ".join(text.split()).lower()


def run_checkpoints(cfg: EvalConfig, run_dir: str | Path, *, force: bool = False,
                    progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``sgsd eval --checkpoints RUN``: validation curve, choice by ``cfg.select``, test eval of the chosen step.

    Returns the paths of the tables {validation, choice, test (absent without test sets), summary}.  Each
    per-checkpoint eval is a plain :func:`run` (manifests, part files): a rerun evaluates only what is missing,
    checkpoints saved since the last run included."""
    say = log or (lambda m: None)
    cfg = cfg.resolved()
    if not cfg.checkpoints:
        raise InputError(None, "run_checkpoints needs --checkpoints RUN")
    out = Path(run_dir)
    sel = out / SELECT_DIR
    # everything that can be refused is refused before any model is loaded or file written
    cks = list_checkpoints(cfg.checkpoints)
    val_names, val_files = _split_val(cfg.val)
    val_sets = _load_sets(val_names, val_files, cfg.data_dir, cfg.val_limit)
    test_sets = _load_sets(cfg.benches, cfg.problems, cfg.data_dir, cfg.limit)
    for group, label in ((val_sets, "--val"), (test_sets, "test")):
        seen: dict[str, str] = {}
        for ps in group:
            if ps.name in seen or ps.name == "summary":
                raise InputError(ps.source, f"{label} set name '{ps.name}' is used twice or reserved; rename the file")
            seen[ps.name] = ps.source
    test_texts = {_norm_problem(t): ps.name for ps in test_sets for t in ps.df["problem"].to_list()}
    overlap = 0
    for v in val_sets:
        for t in test_sets:
            if v.content_hash() == t.content_hash() or v.name == t.name:
                raise InputError(v.source, f"validation set '{v.name}' is also a test set ('{t.name}'): choosing the "
                                           "checkpoint on it would peek at the test set; pass another --val")
        shared = [p for p in v.df["problem"].to_list() if _norm_problem(p) in test_texts]
        if shared:
            overlap += len(shared)
            say(f"warning: {len(shared)} of the {v.df.height} problems of validation set '{v.name}' are also in the "
                f"test sets (e.g. one of '{test_texts[_norm_problem(shared[0])]}'); their test scores are not "
                "independent of the choice")
    seeds = seed_values(cfg.seed, cfg.seeds)
    release = lock_run_dir(out)
    try:
        base = replace(cfg, checkpoints=None, val=[], val_limit=None, model=None, gguf_file=None)
        val_cfg = replace(base, benches=val_names, problems=val_files, limit=cfg.val_limit)
        val_key = "mean" if len(val_sets) > 1 else val_sets[0].name
        rows, curve, inputs = [], [], {}
        for ck in cks:
            path = run(replace(val_cfg, model=str(ck.path)), sel / "val" / ck.label, force=force, progress=progress,
                       join_earlier=False)
            summ = pl.read_parquet(path)
            inputs[ck.label] = path
            rows.append(summ.select(pl.lit(ck.step, pl.Int64).alias("step"),
                                    pl.lit(ck.loop_step, pl.Int64).alias("loop_step"),
                                    pl.lit(str(ck.path)).alias("checkpoint"), pl.all()))
            r = summ.filter(pl.col("bench") == val_key).row(0, named=True)
            curve.append((ck.step, r["avg_at_n"]))
            say(f"step {ck.step}: validation {val_key} avg@n {100 * r['avg_at_n']:.1f}%"
                + (f" (seed std {100 * r['seed_std']:.1f})" if r.get("seed_std") is not None else ""))
        validation = pl.concat(rows, how="vertical_relaxed")
        common = {"run": str(Path(cfg.checkpoints).resolve()), "val": [ps.source for ps in val_sets],
                  "val_limit": cfg.val_limit, "seeds": seeds, "protocol": cfg.protocol}
        val_stage = StageRun(sel, "eval-validation", config=common, inputs=inputs, force=True, seed=cfg.seed,
                             output_name="validation")
        val_stage.finish(validation)

        chosen_step = choose_step(curve, cfg.select)
        chosen = next(c for c in cks if c.step == chosen_step)
        cr = validation.filter((pl.col("step") == chosen_step) & (pl.col("bench") == val_key)).row(0, named=True)
        choice = pl.DataFrame([{
            "rule": cfg.select, "step": chosen.step, "loop_step": chosen.loop_step, "checkpoint": str(chosen.path),
            "val_bench": val_key, "val_metric": "avg_at_n", "val_value": cr["avg_at_n"], "val_se": cr["avg_at_n_se"],
            "val_seed_std": cr["seed_std"], "candidates": len(cks), "first_step": cks[0].step, "last_step": cks[-1].step,
            "val_sets": ",".join(ps.name for ps in val_sets), "test_sets": ",".join(ps.name for ps in test_sets),
            "val_test_overlap": overlap, "seeds": ",".join(map(str, seeds)), "run": common["run"],
        }], schema=CHOICE_SCHEMA)
        StageRun(sel, "eval-choice", config={**common, "rule": cfg.select}, inputs={"validation": val_stage.output},
                 force=True, seed=cfg.seed, output_name="choice").finish(choice)
        say(f"chosen: step {chosen.step} ({cfg.select}) of {len(cks)} checkpoints: {chosen.path}")
        paths = {"validation": val_stage.output, "choice": sel / "choice.parquet"}
        if test_sets:
            test_cfg = replace(base, limit=cfg.limit, model=str(chosen.path))
            path = run(test_cfg, sel / "test" / chosen.label, force=force, progress=progress, join_earlier=False)
            summ = pl.read_parquet(path)
            test = summ.select(pl.lit(cfg.select).alias("rule"), pl.lit(chosen.step, pl.Int64).alias("step"),
                               pl.lit(str(chosen.path)).alias("checkpoint"), pl.all())
            StageRun(sel, "eval-test", config={**common, "rule": cfg.select, "step": chosen.step},
                     inputs={"summary": path}, force=True, seed=cfg.seed, output_name="test").finish(test)
            StageRun(out / "eval", "eval-summary", config={"chosen_step": chosen.step, "rule": cfg.select, **common},
                     inputs={"summary": path}, force=True, seed=cfg.seed, output_name="summary").finish(summ)
            paths.update(test=sel / "test.parquet", summary=EVAL_SUMMARY.file(out))
        return paths
    finally:
        release()


# --------------------------------------------------------------------------------------------------
# reading results back (compare)


def read_summary(run: str | Path) -> pl.DataFrame:
    """The summary table of a run directory (``RUN/eval/summary.parquet``), its eval folder, or the file."""
    p = Path(run)
    for cand in (EVAL_SUMMARY.file(p), p / "summary.parquet", p):
        if cand.is_file():

            return read_table(cand, required={"bench": str, "avg_at_n": float})
    raise InputError(p, "no eval summary here (expected RUN/eval/summary.parquet; run `sgsd eval` first)")


def paper_results(path: str | Path | None = None) -> tuple[dict, pl.DataFrame]:
    """(meta, table) of the paper's published rows in data/paper_results.toml; values are fractions."""
    import tomllib


    p = Path(path) if path else DATA_DIR / "paper_results.toml"
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(p, f"cannot read paper results ({e})") from None
    meta = data.get("meta", {})
    scale = 100.0 if meta.get("units") == "percent" else 1.0
    benches = list(meta.get("benches", []))
    rows = []
    for r in data.get("rows", []):
        vals = {b: (r[b] / scale if b in r else None) for b in benches}
        present = [v for v in vals.values() if v is not None]
        rows.append({"method": r["method"], **vals, "mean": sum(present) / len(present) if present else None})
    schema = {"method": pl.String, **{b: pl.Float64 for b in benches}, "mean": pl.Float64}
    return meta, pl.DataFrame(rows, schema=schema)


def compare_table(runs: Sequence[str | Path], metric: str = "avg_at_n", with_paper: bool = True
                  ) -> tuple[list[str], list[tuple[str, int | None, list[float | None], str]]]:
    """Benchmarks (columns) and rows (label, n, values, kind) of a side-by-side comparison.

    The last column is the mean over the paper's benchmarks (aime24, aime25, hmmt25) when the paper rows
    are shown, else over every column; a row missing one of them has no mean.
    """
    summaries = [(Path(r), read_summary(r)) for r in runs]
    for r, s in summaries:
        if metric not in s.columns:
            raise InputError(r, f"summary has no metric '{metric}' (has: {', '.join(s.columns)})")
    meta, paper = paper_results() if with_paper else ({}, None)
    benches: list[str] = list(meta.get("benches", [])) if with_paper else []
    for _, s in summaries:
        benches += [b for b in s["bench"].to_list() if b != "mean" and b not in benches]
    mean_over = list(meta.get("benches", [])) if with_paper else benches
    rows: list[tuple[str, int | None, dict[str, float | None], str]] = []
    if paper is not None and metric == "avg_at_n":
        for r in paper.iter_rows(named=True):
            rows.append((f"paper {meta.get('model', '')} {r['method']}".replace("  ", " "), meta.get("n"),
                         {b: r.get(b) for b in benches}, "paper"))
    for path, s in summaries:
        d = dict(zip(s["bench"].to_list(), s[metric].to_list()))
        ns = [x for x in s.filter(pl.col("bench") != "mean")["n"].unique().to_list() if x is not None]
        rows.append((str(path), ns[0] if len(ns) == 1 else None, {b: d.get(b) for b in benches}, "run"))
    out = []
    for label, n, vals, kind in rows:
        sel = [vals.get(b) for b in mean_over]
        mean = sum(sel) / len(sel) if sel and all(v is not None for v in sel) else None
        out.append((label, n, [vals.get(b) for b in benches] + [mean], kind))
    return benches + ["mean"], out
