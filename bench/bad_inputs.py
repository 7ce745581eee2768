"""Bad-input matrix (issue 15): every stage fed missing, empty, corrupt, wrong-typed, non-finite and out-of-range
inputs, filesystem faults (read-only bind mount, a full tmpfs) and concurrent runs, through the real CLI.

    python bench/bad_inputs.py [--work DIR] [--only SUBSTRING] [--json OUT.json]

Per case it prints the exit code, whether a Python traceback was printed, whether every file that existed
before the command is byte-identical afterwards (the idle ``.sgsd.lock`` excepted), and the first line of
stderr.  A case is *clean* when it exits 2 with exactly one ``error:`` line (shown as its first line), no traceback,
and nothing changed.
Filesystem cases need root (mount); without it they are reported as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
SGSD = [sys.executable, "-m", "sgsd_cli.main"]
CPU = ["--device", "cpu"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SGSD_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def sh(argv, timeout=600, env=None):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or ENV)


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else (sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else [])
        for p in files:
            if p.name == ".sgsd.lock":
                continue
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    name: str
    stage: str
    argv: Callable[["Ctx"], list] | None = None  # built after setup
    setup: Callable[["Ctx"], None] | None = None
    watch: Callable[["Ctx"], list] | None = None  # extra paths whose files must stay byte-identical
    needs_root: bool = False
    special: Callable[["Ctx"], tuple] | None = None  # runs the case itself: (rc, stderr, same)
    lead: bool = False  # fixed by the per-option range checks in the config dataclasses (the lead's part)


@dataclass
class Ctx:
    work: Path
    base: Path  # a complete sgsd run dir (rollout, score_teachers, polarize, train + checkpoint)
    model: Path
    run: Path = None  # this case's copy of base
    tmp: Path = None  # this case's scratch folder
    mounts: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# fixtures


def build_base(work: Path) -> tuple[Path, Path]:
    model = work / "model"
    base = work / "base"
    if not (base / "train.manifest.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        if not (model / "config.json").exists():
            r = sh([sys.executable, "-c", f"from stages.engine.models import make_tiny_model; make_tiny_model({str(model)!r})"])
            assert r.returncode == 0, r.stderr
        steps = [
            ["rollout", "--run-dir", base, "--model", model, "--problems", DEMO / "problems.jsonl", "--limit", 3,
             "--max-new-tokens", 8, "--backend", "hf", *CPU],
            ["score-teachers", "--run-dir", base, "--model", model, "--k", 2, "--retrieval", "lexical",
             "--bank", DEMO / "skill_bank.json", *CPU],
            ["polarize", "--run-dir", base, "--workers", 1],
            ["train", "--run-dir", base, "--model", model, "--steps", 1, "--batch-size", 2, "--micro-batch-size", 2,
             "--teacher-mode", "fixed", *CPU],
        ]
        for s in steps:
            r = sh(SGSD + s)
            assert r.returncode == 0, (s, r.stderr[-2000:])
    return base, model


def fresh(ctx: Ctx, name: str) -> None:
    safe = "".join(c if c.isalnum() else "_" for c in name)[:80]
    ctx.tmp = ctx.work / "cases" / safe
    shutil.rmtree(ctx.tmp, ignore_errors=True)
    ctx.tmp.mkdir(parents=True)
    ctx.run = ctx.tmp / "run"
    shutil.copytree(ctx.base, ctx.run)


def poison(path: Path, col: str, fn: Callable[[list], list], dtype=None) -> None:
    df = pl.read_parquet(path)
    vals = fn(df[col].to_list())
    df = df.with_columns(pl.Series(col, vals, dtype=dtype or df.schema[col]))
    buf = path.with_suffix(".tmpw")
    df.write_parquet(buf)
    os.replace(buf, path)


def first_row(f):  # apply f to the first row's value
    return lambda vals: [f(vals[0])] + vals[1:]


def nan_at(i=0, v=float("nan")):
    return first_row(lambda lst: [v if j == i else x for j, x in enumerate(lst)])


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def bank_json(ctx: Ctx, skills: int, mistakes: int, name="bank.json", mutate=None) -> Path:
    b = json.loads((DEMO / "skill_bank.json").read_text())
    b["general_skills"] = b["general_skills"][:skills]
    b["common_mistakes"] = b["common_mistakes"][:mistakes]
    if mutate:
        mutate(b)
    return write(ctx.tmp / name, json.dumps(b))


def model_copy(ctx: Ctx, damage: str) -> Path:
    d = ctx.tmp / f"model_{damage}"
    shutil.copytree(ctx.model, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(4096))
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "bad_config":
        (d / "config.json").write_text("{not json")
    return d


# filesystem faults --------------------------------------------------------------------------------


def mount_ro(ctx: Ctx) -> None:
    """ctx.run becomes a read-only bind mount of itself."""
    subprocess.run(["mount", "--bind", ctx.run, ctx.run], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", ctx.run], check=True)
    ctx.mounts.append(ctx.run)


def mount_full(ctx: Ctx, keep_free_kb: int, size="4m", with_checkpoint=False) -> None:
    """ctx.run on a small tmpfs holding the base tables, filled up to ``keep_free_kb`` free."""
    src = ctx.tmp / "src"
    os.replace(ctx.run, src)
    ctx.run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", ctx.run], check=True)
    ctx.mounts.append(ctx.run)
    for p in src.iterdir():
        if p.is_file():
            shutil.copy2(p, ctx.run / p.name)
        elif with_checkpoint:
            shutil.copytree(p, ctx.run / p.name)
    free = shutil.disk_usage(ctx.run).free
    fill = max(0, free - keep_free_kb * 1024)
    with open(ctx.run / "filler.bin", "wb") as f:
        try:
            f.write(b"\0" * fill)
        except OSError:
            pass


def unmount(ctx: Ctx) -> None:
    for m in reversed(ctx.mounts):
        subprocess.run(["umount", "-l", m], capture_output=True)
    ctx.mounts.clear()


# concurrency --------------------------------------------------------------------------------------


def concurrent(ctx: Ctx, first: list, second: list, wait_for: Path) -> tuple:
    """Start ``first``; once it holds the lock on ``wait_for`` (seen in /proc/locks), run ``second``; report the second."""
    from stages.engine.locks import lock_holder

    p = subprocess.Popen([str(a) for a in first], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO, env=ENV)
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and p.poll() is None:
            if wait_for.exists() and lock_holder(wait_for).get("pid") == p.pid:
                break
            time.sleep(0.05)
        before = snapshot(ctx.run)
        r = sh(second)
        # the files the first process writes meanwhile are its own; "same" asks whether the second changed any
        same = p.poll() is not None or all(before.get(k) == v for k, v in before.items())
        return r.returncode, r.stderr, same
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------------
# the matrix


def cases() -> list[Case]:
    C: list[Case] = []
    R = lambda c: c.run  # noqa: E731

    def add(name, stage, argv, setup=None, watch=None, **kw):
        C.append(Case(name, stage, argv, setup, watch, **kw))

    # ---------------- rollout
    def ro(*extra, problems=None, model=None, run=None):
        return lambda c: SGSD + ["rollout", "--run-dir", run(c) if run else c.run,
                                 "--model", model(c) if model else c.model,
                                 "--problems", problems(c) if problems else DEMO / "problems.jsonl", "--limit", 2,
                                 "--max-new-tokens", 4, "--backend", "hf", *CPU, "--force", *extra]

    P = lambda n: (lambda c: c.tmp / n)  # noqa: E731
    add("problems file missing", "rollout", ro(problems=P("nope.jsonl")))
    add("problems file empty", "rollout", ro(problems=P("e.jsonl")), lambda c: write(c.tmp / "e.jsonl", ""))
    add("problems file not JSON", "rollout", ro(problems=P("b.jsonl")), lambda c: write(c.tmp / "b.jsonl", "{oops\n"))
    add("problems line not an object", "rollout", ro(problems=P("b.jsonl")), lambda c: write(c.tmp / "b.jsonl", "[1,2]\n"))
    add("problems without answer column", "rollout", ro(problems=P("b.jsonl")),
        lambda c: write(c.tmp / "b.jsonl", '{"id": "a", "problem": "1+1"}\n'))
    add("problems without problem column", "rollout", ro(problems=P("b.jsonl")),
        lambda c: write(c.tmp / "b.jsonl", '{"id": "a", "answer": "2"}\n'))
    add("problem text wrong type (list)", "rollout", ro(problems=P("b.jsonl")),
        lambda c: write(c.tmp / "b.jsonl", '{"id": "a", "problem": [1, 2], "answer": "2"}\n'))
    add("problems parquet corrupt", "rollout", ro(problems=P("b.parquet")),
        lambda c: write(c.tmp / "b.parquet", b"PAR1garbagePAR1"))
    add("problems parquet 0 rows", "rollout", ro(problems=P("b.parquet")),
        lambda c: pl.DataFrame({"id": [], "problem": [], "answer": []}, schema={"id": pl.String, "problem": pl.String,
                                                                             "answer": pl.String}).write_parquet(c.tmp / "b.parquet"))
    add("problems path is a directory", "rollout", ro(problems=P("d")), lambda c: (c.tmp / "d").mkdir())
    add("unknown benchmark name", "rollout", ro(problems=lambda c: "no_such_bench_xyz"))
    add("10 MB problem text", "rollout", ro(problems=P("big.jsonl")),
        lambda c: write(c.tmp / "big.jsonl", json.dumps({"id": "a", "problem": "1 + " * 2_500_000, "answer": "2"}) + "\n"))
    add("model path missing", "rollout", ro(model=lambda c: c.tmp / "no_model"))
    add("model folder without config.json", "rollout", ro(model=lambda c: model_copy(c, "no_config")))
    add("model config.json corrupt", "rollout", ro(model=lambda c: model_copy(c, "bad_config")))
    add("model.safetensors truncated", "rollout", ro(model=lambda c: model_copy(c, "truncated")))
    add("model.safetensors garbage", "rollout", ro(model=lambda c: model_copy(c, "garbage")))
    add("model.safetensors empty", "rollout", ro(model=lambda c: model_copy(c, "empty")))
    add("--device tpu", "rollout", ro("--device", "tpu"))
    add("--device cuda:7 (absent)", "rollout", ro("--device", "cuda:7"))
    add("--dtype fp8", "rollout", ro("--dtype", "fp8"))
    add("--backend bogus", "rollout", ro("--backend", "bogus"))
    add("--shard 3/2", "rollout", ro("--shard", "3/2"))
    add("--n 0", "rollout", ro("--n", "0"), lead=True)
    add("--n -1", "rollout", ro("--n", "-1"), lead=True)
    add("--temperature -1", "rollout", ro("--temperature", "-1"), lead=True)
    add("--top-p 2", "rollout", ro("--top-p", "2"), lead=True)
    add("--top-k -5", "rollout", ro("--top-k", "-5"), lead=True)
    add("--max-new-tokens 0", "rollout", ro("--max-new-tokens", "0"), lead=True)
    add("--limit -1", "rollout", ro("--limit", "-1"), lead=True)
    add("--decode-batch 0", "rollout", ro("--decode-batch", "0"), lead=True)
    add("run dir is a file", "rollout", ro(run=lambda c: c.tmp / "afile"), lambda c: write(c.tmp / "afile", "x"),
        watch=lambda c: [c.tmp / "afile"])
    add("run dir read-only (bind mount)", "rollout", ro(), mount_ro, needs_root=True)
    add("run dir on a full tmpfs", "rollout", ro(), lambda c: mount_full(c, 0), needs_root=True)

    # ---------------- score-teachers
    def sc(*extra, bank=None, model=None):
        return lambda c: SGSD + ["score-teachers", "--run-dir", c.run, "--model", model(c) if model else c.model,
                                 "--bank", bank(c) if bank else DEMO / "skill_bank.json", "--retrieval", "lexical", *CPU, "--force",
                                 *extra]

    rl = lambda c: c.run / "rollout.parquet"  # noqa: E731
    add("rollout table missing", "score-teachers", sc(), lambda c: (c.run / "rollout.parquet").unlink())
    add("rollout table corrupt", "score-teachers", sc(), lambda c: write(rl(c), b"PAR1\x00\x01broken"))
    add("rollout table 0 rows", "score-teachers", sc(),
        lambda c: pl.read_parquet(rl(c)).head(0).write_parquet(rl(c)))
    add("rollout table without completion_ids", "score-teachers", sc(),
        lambda c: pl.read_parquet(rl(c)).drop("completion_ids").write_parquet(rl(c)))
    add("rollout prompt_ids wrong type (string)", "score-teachers", sc(),
        lambda c: pl.read_parquet(rl(c)).with_columns(pl.lit("1 2 3").alias("prompt_ids")).write_parquet(rl(c)))
    add("completion token id beyond vocab", "score-teachers", sc(),
        lambda c: poison(rl(c), "completion_ids", first_row(lambda l: [10 ** 6] + l[1:])))
    add("negative prompt token id", "score-teachers", sc(),
        lambda c: poison(rl(c), "prompt_ids", first_row(lambda l: [-5] + l[1:])))
    add("all completions empty", "score-teachers", sc(),
        lambda c: (poison(rl(c), "completion_ids", lambda vals: [[] for _ in vals]),
                   poison(rl(c), "sample_logprobs", lambda vals: [[] for _ in vals])))
    add("NaN sample log-prob", "score-teachers", sc(), lambda c: poison(rl(c), "sample_logprobs", nan_at(0)))
    add("inf sample log-prob", "score-teachers", sc(),
        lambda c: poison(rl(c), "sample_logprobs", nan_at(0, float("inf"))))
    add("bank missing", "score-teachers", sc(bank=lambda c: c.tmp / "none.json"))
    add("bank not JSON", "score-teachers", sc(bank=lambda c: write(c.tmp / "b.json", "{x")))
    add("bank not an object", "score-teachers", sc(bank=lambda c: write(c.tmp / "b.json", "[1]")))
    add("bank with empty lists", "score-teachers", sc(bank=lambda c: bank_json(c, 0, 0)))
    add("bank without mistakes", "score-teachers", sc(bank=lambda c: bank_json(c, 3, 0)))
    add("bank item missing a field", "score-teachers",
        sc(bank=lambda c: bank_json(c, 3, 3, mutate=lambda b: b["general_skills"][0].pop("principle"))))
    add("bank duplicate ids", "score-teachers",
        sc(bank=lambda c: bank_json(c, 3, 3, mutate=lambda b: b["general_skills"].append(dict(b["general_skills"][0])))))
    add("--k 0", "score-teachers", sc("--k", "0"))
    add("--k -3", "score-teachers", sc("--k", "-3"))
    add("--retrieval bogus", "score-teachers", sc("--retrieval", "bogus"))
    add("--weight-temperature 0", "score-teachers", sc("--weight-temperature", "0"), lead=True)
    add("--scoring-temperature -1", "score-teachers", sc("--scoring-temperature", "-1"), lead=True)
    add("--index of another bank", "score-teachers", lambda c: sc("--index", c.tmp / "ix" / "index.parquet",
                                                                  bank=lambda c: DEMO / "skill_bank.json")(c),
        lambda c: sh(SGSD + ["build-index", "--run-dir", c.tmp / "ix", "--bank", bank_json(c, 2, 2), "--mode", "lexical"]))
    add("checkpoint as --model with truncated weights", "score-teachers",
        sc(model=lambda c: c.run / "checkpoint"),
        lambda c: write(c.run / "checkpoint" / "model.safetensors", (c.run / "checkpoint" / "model.safetensors").read_bytes()[:999]))

    # ---------------- polarize
    def po(*extra):
        return lambda c: SGSD + ["polarize", "--run-dir", c.run, "--workers", 1, "--force", *extra]

    st = lambda c: c.run / "score_teachers.parquet"  # noqa: E731
    add("score table missing", "polarize", po(), lambda c: st(c).unlink())
    add("score table corrupt", "polarize", po(), lambda c: write(st(c), b"garbage"))
    add("NaN teacher log-prob", "polarize", po(), lambda c: poison(st(c), "teacher_logprobs", nan_at(1)))
    add("inf student log-prob", "polarize", po(), lambda c: poison(st(c), "student_logprobs", nan_at(0, float("inf"))))
    add("NaN teacher weight", "polarize", po(), lambda c: poison(st(c), "weight", first_row(lambda v: float("nan"))))
    add("log-prob list one short", "polarize", po(), lambda c: poison(st(c), "teacher_logprobs", first_row(lambda l: l[:-1])))
    add("score row whose rollout is missing", "polarize", po(),
        lambda c: poison(st(c), "rollout_id", first_row(lambda v: "ghost#0")))
    add("rollout table without answer", "polarize", po(),
        lambda c: pl.read_parquet(rl(c)).drop("answer").write_parquet(rl(c)))
    add("teacher_rank wrong type (string)", "polarize", po(),
        lambda c: pl.read_parquet(st(c)).with_columns(pl.col("teacher_rank").cast(pl.String)).write_parquet(st(c)))
    add("--workers -2", "polarize", po("--workers", "-2"), lead=True)
    add("--verify-timeout -1", "polarize", po("--verify-timeout", "-1"), lead=True)
    add("--clip 0", "polarize", po("--clip", "0"), lead=True)
    add("--stance-threshold -1", "polarize", po("--stance-threshold", "-1"), lead=True)
    add("run dir read-only (bind mount)", "polarize", po(), mount_ro, needs_root=True)

    # ---------------- train
    def tr(*extra, model=None):
        return lambda c: SGSD + ["train", "--run-dir", c.run, "--model", model(c) if model else c.model, "--steps", 1,
                                 "--batch-size", 2, "--micro-batch-size", 2, "--teacher-mode", "fixed", *CPU,
                                 "--force", *extra]

    pz = lambda c: c.run / "polarize.parquet"  # noqa: E731
    add("no tables at all", "train", tr(), lambda c: [p.unlink() for p in c.run.glob("*.parquet")])
    add("NaN weight in polarize.parquet", "train", tr(), lambda c: poison(pz(c), "weight", first_row(lambda v: float("nan"))))
    add("inf support in polarize.parquet", "train", tr(), lambda c: poison(pz(c), "support", first_row(lambda v: float("inf"))))
    add("NaN fixed-teacher log-probs", "train", tr(), lambda c: poison(st(c), "teacher_logprobs", nan_at(0)))
    add("GRPO NaN sample log-probs", "train", lambda c: tr("--objective", "grpo")(c),
        lambda c: poison(rl(c), "sample_logprobs", nan_at(0)))
    add("token ids beyond vocab (--force)", "train", tr(),
        lambda c: poison(rl(c), "completion_ids", first_row(lambda l: [10 ** 6] + l[1:])))
    add("negative token ids", "train", tr(), lambda c: poison(rl(c), "prompt_ids", first_row(lambda l: [-1] + l[1:])))
    add("all completions empty", "train", tr("--objective", "grpo"),
        lambda c: poison(rl(c), "completion_ids", lambda vals: [[] for _ in vals]))
    add("token_mask length mismatch", "train", tr(), lambda c: poison(pz(c), "token_mask", first_row(lambda l: l[:-1])))
    add("polarize row without score row", "train", tr(), lambda c: poison(pz(c), "teacher_rank", first_row(lambda v: 99)))
    add("polarity wrong type (string)", "train", tr(),
        lambda c: pl.read_parquet(pz(c)).with_columns(pl.col("polarity").cast(pl.String)).write_parquet(pz(c)))
    add("--objective bogus", "train", tr("--objective", "bogus"))
    add("--teacher-mode bogus", "train", tr("--teacher-mode", "bogus"))
    add("--precision bogus", "train", tr("--precision", "bogus"))
    add("--resume a missing folder", "train", tr("--resume", "/nonexistent/ckpt"))
    add("resume from a truncated checkpoint", "train",
        lambda c: SGSD + ["train", "--run-dir", c.run, "--model", c.model, "--steps", 2, "--batch-size", 2,
                          "--micro-batch-size", 2, "--teacher-mode", "fixed", *CPU],
        lambda c: write(c.run / "checkpoint" / "optimizer.pt", (c.run / "checkpoint" / "optimizer.pt").read_bytes()[:100]))
    add("--model with truncated safetensors", "train", tr(model=lambda c: model_copy(c, "truncated")))
    add("--device tpu", "train", tr("--device", "tpu"))
    add("--lr -1", "train", tr("--lr", "-1"))
    add("--steps -1", "train", tr("--steps", "-1"))
    add("--micro-batch-size 0", "train", tr("--micro-batch-size", "0"))
    add("--lora-r 0 with --lora", "train", tr("--lora", "--lora-r", "0"))
    add("--ema-decay 1.5", "train", tr("--teacher-mode", "ema", "--ema-decay", "1.5"))
    add("--max-grad-norm nan", "train", tr("--max-grad-norm", "nan"), lead=True)
    add("--tau 0", "train", tr("--tau", "0"), lead=True)
    add("--warmup-steps -1", "train", tr("--warmup-steps", "-1"), lead=True)
    add("run dir read-only (bind mount)", "train", tr(), mount_ro, needs_root=True)
    add("full disk while saving (--force)", "train", tr(), lambda c: mount_full(c, 300, size="16m", with_checkpoint=True),
        needs_root=True)

    # ---------------- eval
    def ev(*extra, model=None):
        return lambda c: SGSD + ["eval", "--run-dir", c.run, "--model", model(c) if model else c.model, "--problems",
                                 DEMO / "problems.jsonl", "--limit", 1, "--max-new-tokens", 4, "--backend", "hf",
                                 *CPU, *extra]

    add("model path missing", "eval", ev(model=lambda c: c.tmp / "missing"))
    add("model.safetensors truncated", "eval", ev(model=lambda c: model_copy(c, "truncated")))
    add("unknown bench", "eval", lambda c: SGSD + ["eval", "--run-dir", c.run, "--model", c.model, "--bench",
                                                   "no_such_bench", *CPU])
    add("problems without answer", "eval", lambda c: SGSD + ["eval", "--run-dir", c.run, "--model", c.model,
                                                             "--problems", write(c.tmp / "p.jsonl", '{"id":"a","problem":"x"}\n'),
                                                             "--backend", "hf", *CPU])
    add("--device tpu", "eval", ev("--device", "tpu"))
    add("--temperature -1", "eval", ev("--temperature", "-1"), lead=True)
    add("--max-new-tokens 0", "eval", ev("--max-new-tokens", "0"), lead=True)
    add("--limit -1", "eval", ev("--limit", "-1"), lead=True)

    # ---------------- build-index
    def bi(bank, *extra):
        return lambda c: SGSD + ["build-index", "--run-dir", c.run, "--bank", bank(c), "--mode", "lexical", *extra]

    add("bank missing", "build-index", bi(lambda c: c.tmp / "none.json"))
    add("bank empty lists", "build-index", bi(lambda c: bank_json(c, 0, 0)))
    add("bank skills only", "build-index", bi(lambda c: bank_json(c, 2, 0)))
    add("bank invalid JSON", "build-index", bi(lambda c: write(c.tmp / "b.json", "{")))
    add("bank not UTF-8", "build-index", bi(lambda c: write(c.tmp / "b.json", b"\xff\xfe\x00bad")))
    add("bank field wrong type", "build-index",
        bi(lambda c: bank_json(c, 2, 2, mutate=lambda b: b["general_skills"][0].update(title=5))))
    add("--mode bogus", "build-index", bi(lambda c: DEMO / "skill_bank.json", "--mode", "bogus"))
    add("--encode-batch 0 (embedding)", "build-index",
        lambda c: SGSD + ["build-index", "--run-dir", c.run, "--bank", DEMO / "skill_bank.json", "--encode-batch", "0"],
        lead=True)
    add("encoder path missing", "build-index",
        lambda c: SGSD + ["build-index", "--run-dir", c.run, "--bank", DEMO / "skill_bank.json", "--encoder",
                          c.tmp / "no_encoder", "--mode", "embedding"])

    # ---------------- loop
    def lp(*extra, model=None):
        return lambda c: SGSD + ["loop", "--run-dir", c.run / "loop", "--model", model(c) if model else c.model,
                                 "--problems", DEMO / "problems.jsonl", "--bank", DEMO / "skill_bank.json", "--steps", 1,
                                 "--prompts-per-step", 2, "--device", "cpu", "--set", "rollout.max_new_tokens=4", *extra]

    add("loop: model missing", "loop", lp(model=lambda c: c.tmp / "missing"))
    add("loop: --steps 0", "loop", lp("--steps", "0"))
    add("loop: --prompts-per-step 0", "loop", lp("--prompts-per-step", "0"))
    add("loop: --objective bogus", "loop", lp("--objective", "bogus"))
    add("loop: bank missing", "loop", lp("--bank", "/nonexistent/bank.json"))
    add("loop: bank that forms no teacher", "loop", lambda c: lp("--bank", c.tmp / "bank.json")(c),
        lambda c: bank_json(c, 3, 0))
    add("loop: problems missing", "loop", lambda c: SGSD + ["loop", "--run-dir", c.run / "loop", "--model", c.model,
                                                            "--problems", c.tmp / "none.jsonl", "--bank", DEMO / "skill_bank.json",
                                                            "--steps", 1, "--device", "cpu"])
    add("loop: config not TOML", "loop", lambda c: SGSD + ["loop", "--config", write(c.tmp / "c.toml", "[loop\nx="),
                                                           "--run-dir", c.run / "loop"])
    add("loop: --set unknown key", "loop", lp("--set", "train.no_such_key=1"))
    add("loop: model.safetensors truncated", "loop", lp(model=lambda c: model_copy(c, "truncated")))

    # ---------------- concurrency
    def two_loops(c: Ctx):
        a = lp()(c)
        return concurrent(c, a, a, c.run / "loop" / ".sgsd.lock")

    def two_trains(c: Ctx):
        a = SGSD + ["train", "--run-dir", c.run, "--model", c.model, "--steps", 6, "--batch-size", 2,
                    "--micro-batch-size", 2, "--teacher-mode", "fixed", *CPU, "--force"]
        return concurrent(c, a, a, c.run / ".sgsd.lock")

    def train_vs_polarize(c: Ctx):
        a = SGSD + ["train", "--run-dir", c.run, "--model", c.model, "--steps", 6, "--batch-size", 2,
                    "--micro-batch-size", 2, "--teacher-mode", "fixed", *CPU, "--force"]
        return concurrent(c, a, SGSD + ["polarize", "--run-dir", c.run, "--force"], c.run / ".sgsd.lock")

    C.append(Case("two loops in one run dir", "loop", special=two_loops))
    C.append(Case("two trains in one run dir", "train", special=two_trains))
    C.append(Case("polarize while train runs", "polarize", special=train_vs_polarize))
    return C


# --------------------------------------------------------------------------------------------------


def run_case(case: Case, ctx: Ctx, is_root: bool) -> dict:
    fresh(ctx, f"{case.stage}-{case.name}")
    res = {"stage": case.stage, "case": case.name, "lead": case.lead}
    if case.needs_root and not is_root:
        return {**res, "skipped": "needs root (mount)"}
    try:
        if case.setup:
            case.setup(ctx)
        watch = [ctx.run] + (case.watch(ctx) if case.watch else [])
        before = snapshot(*watch)
        if case.special:
            rc, err, same = case.special(ctx)
        else:
            r = sh(case.argv(ctx), timeout=300)
            rc, err = r.returncode, r.stderr
            same = snapshot(*watch) == before or all(snapshot(*watch).get(k) == v for k, v in before.items())
    except subprocess.TimeoutExpired:
        rc, err, same = 124, "timeout", False
    finally:
        unmount(ctx)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    tb = "Traceback (most recent call last)" in err
    errs = [ln for ln in lines if ln.startswith("error:")]  # a stage may log progress lines before failing
    first = errs[0] if errs else (lines[0] if lines else "")
    clean = rc == 2 and not tb and same and len(errs) == 1
    return {**res, "rc": rc, "traceback": tb, "same": same, "first_line": first[:200], "clean": clean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--only", default=None, help="run the cases whose 'stage: name' contains this")
    ap.add_argument("--json", default=None, help="write the per-case results here")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at the same time (each in its own folder)")
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sgsd-bad-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    base, model = build_base(work)
    ctx = Ctx(work=work, base=base, model=model)
    is_root = os.geteuid() == 0
    todo = [c for c in cases() if not a.only or a.only in f"{c.stage}: {c.name}"]
    results = []
    print(f"{'#':>3} {'stage':<15} {'case':<44} {'rc':>3} {'tb':<3} {'same':<4} first line")
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace as dc_replace

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        outcomes = pool.map(lambda c: run_case(c, dc_replace(ctx, mounts=[]), is_root), todo)
        for i, (c, r) in enumerate(zip(todo, outcomes), 1):
            results.append(r)
            _print(i, c, r)
    _summary(results, a.json)


def _print(i: int, c: Case, r: dict) -> None:
    if True:
        if "skipped" in r:
            print(f"{i:>3} {c.stage:<15} {c.name[:44]:<44} {'-':>3} {'-':<3} {'-':<4} skipped: {r['skipped']}", flush=True)
            return
        mark = "" if r["clean"] else ("  <- option range check (lead)" if c.lead else "  <- NOT CLEAN")
        print(f"{i:>3} {c.stage:<15} {c.name[:44]:<44} {r['rc']:>3} {'yes' if r['traceback'] else 'no':<3} "
              f"{'yes' if r['same'] else 'NO':<4} {r['first_line'][:110]}{mark}", flush=True)


def _summary(results: list[dict], json_out: str | None) -> None:
    ran = [r for r in results if "skipped" not in r]
    clean = sum(r["clean"] for r in ran)
    lead = [r for r in ran if not r["clean"] and r["lead"]]
    other = [r for r in ran if not r["clean"] and not r["lead"]]
    print(f"\nclean: {clean}/{len(ran)} cases ({len(results) - len(ran)} skipped); not clean: {len(lead)} option range "
          f"checks (lead), {len(other)} others; tracebacks: {sum(r['traceback'] for r in ran)}, "
          f"exit 0: {sum(r['rc'] == 0 for r in ran)}, prior files changed: {sum(not r['same'] for r in ran)}")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
