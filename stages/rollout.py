"""`sgsd rollout`: sample student completions for a problem set.  docs/DESIGN.md 1.2-1.3.

One row per (problem, sample) with prompt and completion text and token ids, the sampling log-prob of
each completion token, the finish reason, the gold answer, the model and the policy step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from stages.engine.generation.base import GenerationBackend, SamplingConfig, prompt_key_of
from stages.engine.generation.factory import make_backend
from stages.engine.config import Checked, opt, shared_opt
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import shard_output_name, shard_rows
from stages.engine.prompts import chat_prompt_text, student_prompt
from stages.engine import benchmarks
from stages.engine.models import load_model
from stages.engine.tables import ROLLOUT, ROLLOUT_SCHEMA



@dataclass
class RolloutConfig(Checked):
    model: str = opt(help="HF model folder, hub id, .gguf file, or LoRA adapter folder.", group="Model")
    problems: str = opt("", "JSONL/Parquet file with id, problem, answer, or a benchmark name (aime24, aime25, hmmt25, math500, train), required (smoke runs: data/demo/problems.jsonl).", group="Data")
    gguf_file: str | None = shared_opt("gguf_file", group="Model")
    n: int = opt(1, "Samples per problem (1 for SGSD/OPSD, 8 for GRPO).", group="Sampling", ge=1)
    temperature: float = opt(1.1, "Sampling temperature (0 = greedy).", group="Sampling", ge=0)
    top_p: float = opt(0.95, "Nucleus sampling mass (1.0 = off).", group="Sampling", gt=0, le=1)
    top_k: int = opt(20, "Top-k sampling (0 = off).", group="Sampling", ge=0)
    max_new_tokens: int = opt(1024, "Maximum completion tokens.", group="Sampling", ge=1)
    thinking: bool = opt(False, "Qwen3 thinking mode of the chat template (the student uses non-thinking mode by default).", group="Sampling")
    seed: int = opt(0, "Random seed (sampling, shuffling).", group="Sampling", ge=0)
    backend: str = opt("auto", "Generation backend: auto (vLLM if installed, else hf-fast on CUDA, else hf), vllm, hf-fast (static-cache engine with slot refill), hf.", group="Engine", choices=("auto", "vllm", "hf-fast", "hf"))
    batch_size: int = opt(32, "Decode batch: sequences generated together (transformers backends).", group="Engine", ge=1, flag="decode-batch", old=("--batch-size",))
    limit: int | None = opt(None, "Use only the first N problems.", group="Data", ge=1)
    policy_step: int = opt(0, "Policy step recorded in every row.", group="Data", ge=0)
    shard: tuple[int, int] = opt((0, 1), "i/n: process the i-th of n contiguous blocks of the problems and write rollout/part-i-of-n.parquet (the parts in order are the unsharded table).", group="Data", metavar="i/n")
    data_dir: str | None = opt(None, "Folder holding benchmark files (else $SGSD_DATA_DIR, ../shared/data, hub).", group="Data")
    device: str = shared_opt("device", group="Model")
    dtype: str = shared_opt("dtype", group="Model")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            max_new_tokens=self.max_new_tokens, seed=self.seed, batch_size=self.batch_size,
        )


def select_problems(problems: pl.DataFrame, limit: int | None, shard: tuple[int, int]) -> pl.DataFrame:
    """First ``limit`` rows, then the i-th of n contiguous blocks for shard i/n (:func:`stages.engine.tableio.shard_rows`)."""
    if limit is not None:
        problems = problems.head(limit)
    return shard_rows(problems, shard)


def generate_rollouts(
    backend: GenerationBackend,
    tokenizer,
    problems: pl.DataFrame,
    cfg: RolloutConfig,
    model_name: str,
    on_done: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """In-process rollout over a problems table (columns id, problem, answer); the loop calls this."""
    texts = [student_prompt(p) for p in problems["problem"].to_list()]
    prompt_texts = [chat_prompt_text(tokenizer, t, cfg.thinking) for t in texts]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    ids, probs, answers = problems["id"].to_list(), problems["problem"].to_list(), problems["answer"].to_list()
    sampling = cfg.sampling()
    sampling.prompt_keys = [prompt_key_of(i) for i in ids]  # seeded per problem: the same draw in any shard or batch
    comps = backend.generate(prompt_ids, sampling, on_done=on_done)
    rows = {k: [] for k in ROLLOUT_SCHEMA}
    for c in comps:
        p = c.prompt_index
        rows["rollout_id"].append(f"{ids[p]}#{c.sample_index}")
        rows["problem_id"].append(ids[p])
        rows["sample_index"].append(c.sample_index)
        rows["problem"].append(probs[p])
        rows["answer"].append(answers[p])
        rows["prompt"].append(prompt_texts[p])
        rows["prompt_ids"].append(prompt_ids[p])
        rows["completion"].append(c.text)
        rows["completion_ids"].append(c.token_ids)
        rows["sample_logprobs"].append(c.logprobs)
        rows["finish_reason"].append(c.finish_reason)
        rows["model"].append(model_name)
        rows["policy_step"].append(cfg.policy_step)
        rows["temperature"].append(cfg.temperature)
        rows["top_p"].append(cfg.top_p)
        rows["top_k"].append(cfg.top_k)
        rows["thinking"].append(cfg.thinking)
        rows["backend"].append(backend.name)
    return pl.DataFrame(rows, schema=ROLLOUT_SCHEMA)


def run(
    cfg: RolloutConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
    loaded=None,
    backend: GenerationBackend | None = None,
) -> Path:
    """Stage entry point: read problems, generate, write ``rollout.parquet`` (or a shard part file).

    ``progress(description, total)`` returns an advance callback (the CLI passes a rich bar).
    ``loaded`` = (model, tokenizer, spec) to reuse a resident model (the loop); ``backend`` a resident
    generation engine (e.g. one vLLM engine kept across loop steps, refreshed with ``update_weights``).
    """

    if not cfg.problems:
        raise InputError(None, "--problems is required: a problems file (id, problem, answer) or a benchmark name "
                               "(smoke runs: data/demo/problems.jsonl)")
    src = benchmarks.load(cfg.problems, data_dir=cfg.data_dir)
    problems = select_problems(src.df, cfg.limit, cfg.shard)
    key = {"config": cfg, "problems_source": src.source}
    if src.path is None:  # from the hub: no file to hash, so hash the table itself
        key["problems_hash"] = hashlib.sha256(src.df.write_csv().encode()).hexdigest()
    stage = StageRun(run_dir, ROLLOUT.name, key, inputs={"problems": src.path}, force=force, seed=cfg.seed,
                     output_name=shard_output_name(ROLLOUT.name, cfg.shard))
    if stage.done:
        return stage.output
    model, tok, spec = loaded or load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype)
    from stages.engine.models import check_problem_lengths

    check_problem_lengths(problems, tok, model, cfg.max_new_tokens, src.path or cfg.problems)
    backend = backend or make_backend(cfg.backend, model=model, tokenizer=tok, spec=spec)
    advance = progress("rollout", problems.height * cfg.n) if progress else None
    df = generate_rollouts(backend, tok, problems, cfg, spec.adapter or spec.path, on_done=advance)
    stage.finish(df, extra={"backend": backend.name, "model": spec.to_json(),
                            "logprob_definition": "log_softmax(logits / temperature) at the sampled token, before top-k/top-p"})
    return stage.output
