"""`sgsd mine-skills`, and the writer / mining options shared with `sgsd update-skills`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sgsd_cli.common import PIPELINE, Device, Dtype, Force, GgufFile, RunDir, Seed, app, cli_errors, out, progress_bars
from stages.engine.io import InputError
from stages.mine_skills import MineSkillsConfig
from stages.engine.skills.mining import MiningParams
from stages.engine.skills.writer import WriterConfig

WriterUrl = Annotated[str | None, typer.Option("--writer-url", help="OpenAI-compatible endpoint of the writer (base URL like http://host:8000/v1, or its /chat/completions URL). Unset: a local writer model.")]
WriterModel = Annotated[str | None, typer.Option("--writer-model", help="Writer model: the endpoint's model name, or a local model (HF folder, hub id, .gguf). Default: the policy --model (reference).")]
WriterKeyEnv = Annotated[str, typer.Option("--writer-key-env", help="Environment variable holding the endpoint's API key (none sent when unset).")]
WriterTimeout = Annotated[float, typer.Option("--writer-timeout", help="Seconds per writer request before it is retried.")]
WriterRetries = Annotated[int, typer.Option("--writer-retries", help="Retries per request after a timeout, connection error, 429 or 5xx (exponential backoff).")]
WriterConcurrency = Annotated[int, typer.Option("--writer-concurrency", help="Parallel requests to the endpoint.")]
WriterMaxTokens = Annotated[int, typer.Option("--writer-max-new-tokens", help="Maximum tokens of one writer reply.")]
WriterExtra = Annotated[str | None, typer.Option("--writer-extra", help="JSON object merged into each request body, e.g. '{\"chat_template_kwargs\": {\"enable_thinking\": false}}'.")]
WriterBackend = Annotated[str, typer.Option("--writer-backend", help="Local writer engine: auto (vLLM if installed), vllm, hf.")]
WriterBatch = Annotated[int, typer.Option("--writer-batch-size", help="Local writer: prompts decoded together.")]
MaxItems = Annotated[int, typer.Option("--max-items", help="Candidates kept per attempt (1-3 in the reference).")]
ExcerptChars = Annotated[int, typer.Option("--excerpt-chars", help="Characters of each completion shown to the writer (head and tail).")]
GroupSize = Annotated[int, typer.Option("--group-size", help="Items per merge group.")]
Patience = Annotated[int, typer.Option("--patience", help="Stop merging after this many consecutive layers that do not shrink.")]
NearDup = Annotated[float, typer.Option("--near-duplicate", help="rapidfuzz token_sort_ratio (0-100) at or above which two items are near duplicates; 0 turns it off.")]
VerifyTimeout = Annotated[float, typer.Option("--verify-timeout", help="Seconds per verifier call when the attempts are not graded yet.")]


def writer_config(url, model, key_env, timeout, retries, concurrency, max_new_tokens, extra, backend, batch_size,
                  device="auto", dtype="auto") -> WriterConfig:
    body = {}
    if extra:
        try:
            body = json.loads(extra)
        except json.JSONDecodeError as e:
            raise InputError(None, f"--writer-extra is not valid JSON ({e.msg})") from None
        if not isinstance(body, dict):
            raise InputError(None, "--writer-extra must be a JSON object")
    return WriterConfig(url=url, model=model, key_env=key_env, timeout_s=timeout, retries=retries,
                        concurrency=concurrency, max_new_tokens=max_new_tokens, extra_body=body, backend=backend,
                        batch_size=batch_size, device=device, dtype=dtype)


@app.command("mine-skills", rich_help_panel=PIPELINE)
@cli_errors
def mine_skills_cmd(
    run_dir: RunDir,
    rollouts: Annotated[Path | None, typer.Option("--rollouts", help="Rollout table of training problems (from `sgsd rollout`; graded or not). Unset: sample one with --model.")] = None,
    grades: Annotated[Path | None, typer.Option("--grades", help="Grade table with rollout_id, correct (e.g. polarize_rollouts.parquet) when --rollouts has no 'correct' column.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Policy model that samples the attempts (and, by default, writes the skills).")] = None,
    problems: Annotated[str, typer.Option("--problems", help="Problems to sample from: a file with id, problem, answer or a benchmark name.")] = "train",
    n_problems: Annotated[int, typer.Option("--n-problems", help="Problems sampled (seeded) when mining from the model's own attempts.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature of the attempts.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass of the attempts.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Maximum tokens of one attempt.")] = 1024,
    thinking: Annotated[bool, typer.Option("--thinking/--no-thinking", help="Qwen3 thinking mode for the attempts.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="Generation backend of the attempts: auto, vllm, hf.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences decoded together (transformers backend).")] = 32,
    writer_url: WriterUrl = None,
    writer_model: WriterModel = None,
    writer_key_env: WriterKeyEnv = "OPENAI_API_KEY",
    writer_timeout: WriterTimeout = 120.0,
    writer_retries: WriterRetries = 3,
    writer_concurrency: WriterConcurrency = 8,
    writer_max_new_tokens: WriterMaxTokens = 1024,
    writer_extra: WriterExtra = None,
    writer_backend: WriterBackend = "auto",
    writer_batch_size: WriterBatch = 8,
    max_items: MaxItems = 3,
    excerpt_chars: ExcerptChars = 2000,
    group_size: GroupSize = 32,
    patience: Patience = 3,
    near_duplicate: NearDup = 90.0,
    verify_timeout: VerifyTimeout = 5.0,
    seed: Seed = 0,
    gguf_file: GgufFile = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    force: Force = False,
) -> None:
    """Mine a skill bank from graded attempts: memories -> writer candidates -> hierarchical merge.

    Writes memories.parquet, candidates.parquet, skill_bank.parquet and skill_bank.json under --run-dir;
    a rerun resumes after the last finished step."""
    from stages import mine_skills

    wcfg = writer_config(writer_url, writer_model, writer_key_env, writer_timeout, writer_retries, writer_concurrency,
                         writer_max_new_tokens, writer_extra, writer_backend, writer_batch_size, device, dtype)
    params = MiningParams(max_items_per_attempt=max_items, excerpt_chars=excerpt_chars, merge_group_size=group_size,
                          merge_patience=patience, near_duplicate_threshold=near_duplicate, verify_timeout_s=verify_timeout)
    cfg = MineSkillsConfig(writer=wcfg, params=params, model=model, gguf_file=gguf_file, problems=problems,
                     n_problems=n_problems, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                     thinking=thinking, backend=backend, batch_size=batch_size, device=device, dtype=dtype, seed=seed)
    with progress_bars() as bars:
        res = mine_skills.run(cfg, run_dir, rollouts=rollouts, grades=grades, force=force, progress=bars)
    s = res.summary
    t = Table(title="mine-skills", show_header=True)
    t.add_column("step")
    t.add_column("result")
    m, c, b = s["memories"], s["candidates"], s["bank"]
    t.add_row("memories", f"{m['attempts']} attempts, {m['successes']} successes ({res.memories.name})")
    status = ", ".join(f"{k} {v}" for k, v in sorted(c["parse_status"].items()))
    t.add_row("candidates", f"{c['skills']} skills, {c['mistakes']} mistakes from {c['replies']} replies [{status}] ({res.candidates.name})")
    t.add_row("bank", f"{b['skills']} skills, {b['mistakes']} mistakes, version {b['version']}; merge failures "
                      f"{b['merge_failures']}, duplicates removed {b['exact_duplicates_removed']} exact + "
                      f"{b['near_duplicates_removed']} near")
    out.print(t)
    out.print(f"skill bank: {res.bank_json} (+ {res.bank_parquet.name})")
