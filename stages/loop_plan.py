"""`sgsd loop --dry-run`: resolve a recipe exactly as the run does and check its inputs, running nothing.

:func:`check` builds every stage's config through :func:`stages.loop.build_sections` (unknown keys and bad
values refused, the eval protocol's values filled in), then checks what the first step would need: the
model (a folder, adapter or checkpoint that exists, or a hub id that is cached or reachable), the training
pool (loaded as the run loads it: its source and row count, enough problems for a step), the skill bank and
index (sgsd), the retrieval encoder's package, the eval benchmarks, the run directory (a folder started with
another config is refused as the run refuses it) and the backend ``auto`` picks on this machine.  Every
problem is the run's own :class:`~stages.engine.errors.InputError`.  The shell recipes' ``--dry-run`` calls it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import loop
from stages.engine import benchmarks
from stages.engine.errors import InputError


def check(sections: dict, source: str = "config", force: bool = False) -> tuple[dict, list[str]]:
    """(the resolved config of every stage, one line per thing checked) for a loop recipe."""
    from stages.engine.generation.factory import resolve_backend, vllm_available
    from stages.engine.models import ModelSpec, pick_device

    cfgs = loop.build_sections(sections, source)
    loop_cfg = cfgs.loop
    resolved = cfgs.resolved()
    lines: list[str] = []

    spec = ModelSpec.parse(loop_cfg.model, loop_cfg.gguf_file)
    spec.check()
    local = Path(spec.path).exists()
    lines.append(f"model: {loop_cfg.model} ({'local ' + ('adapter on ' + spec.path if spec.adapter else 'folder') if local else 'hub id, cached or reachable'})")

    src = benchmarks.load(loop_cfg.problems, data_dir=loop_cfg.data_dir)
    pool = src.df.sort("id")
    loop.step_problems(pool, 1, loop_cfg.prompts_per_step, loop_cfg.seed)  # a step's worth of distinct problems
    lines.append(f"training pool: {loop_cfg.problems} = {src.source} ({pool.height} problems)")
    rollouts = loop_cfg.steps * loop_cfg.prompts_per_step * cfgs.rollout.n
    lines.append(f"steps: {loop_cfg.steps} x {loop_cfg.prompts_per_step} prompts x {cfgs.rollout.n} sample(s) = {rollouts} rollouts "
                 f"({loop_cfg.steps * loop_cfg.prompts_per_step / pool.height:.2f} passes over the pool); objective {loop_cfg.objective}"
                 + (f"; eval every {loop_cfg.eval_every} steps" if loop_cfg.eval_every else "")
                 + (f"; skill update every {loop_cfg.skill_update_every} steps" if loop_cfg.skill_update_every else ""))
    if loop_cfg.dynamic_sampling:
        extra = loop_cfg.steps * loop_cfg.ds_budget * cfgs.rollout.n
        lines.append(f"dynamic sampling: all-equal groups dropped, up to {loop_cfg.ds_budget} extra prompts a step "
                     f"(at most {extra} more rollouts over the run)")

    if loop_cfg.objective == "sgsd":
        from stages.engine.skills.bank import require_pairs
        from stages.engine.skills.bank import load_bank

        bank = load_bank(cfgs.score.bank)
        require_pairs(bank, cfgs.score.bank)
        lines.append(f"skill bank: {cfgs.score.bank} ({len(bank.skills)} skills, {len(bank.mistakes)} mistakes, "
                     f"version {bank.version})")
        score_cfg = cfgs.score
        if score_cfg.index:
            from stages.engine.skills.index import read_index

            idx = read_index(score_cfg.index, bank)  # refused when built from another bank version
            lines.append(f"index: {score_cfg.index} ({idx.mode}, encoder {idx.encoder or '-'}) for bank version {bank.version}")
        if score_cfg.retrieval in ("embedding", "hybrid") and not score_cfg.index:
            from stages.engine.skills.encoders import DEFAULT_ENCODER, _has_st_config

            enc = score_cfg.encoder or DEFAULT_ENCODER
            p = Path(enc)
            if (p.exists() or enc.startswith((".", "/", "~"))) and not p.is_dir():
                raise InputError(enc, "encoder folder does not exist")
            st_model = not p.is_dir() or _has_st_config(enc)
            if st_model:
                try:
                    import sentence_transformers  # noqa: F401
                except ImportError:
                    raise InputError(enc, "this encoder needs sentence-transformers, which is not installed (pip "
                                          "install 'sgsd[embed]'); mean pooling would retrieve other teachers") from None
            lines.append(f"retrieval: {score_cfg.retrieval}, encoder {enc} "
                         f"({'sentence-transformers' if st_model else 'transformers mean pooling'})")
        else:
            lines.append(f"retrieval: {score_cfg.retrieval}" + (" (from the index)" if score_cfg.index else ""))

    if cfgs.eval is not None:
        names = benchmarks.expand_bench_names(cfgs.eval.benches) if cfgs.eval.benches else []
        for b in names + list(cfgs.eval.problems):
            try:
                e = benchmarks.load(b, data_dir=cfgs.eval.data_dir, allow_hub=False)
                lines.append(f"eval: {b} = {e.source} ({e.df.height} problems)")
            except InputError:
                bench = benchmarks.get_benchmark(b) if benchmarks.is_bare_name(b) else None
                if bench is None or not bench.hub_id or (bench.file and bench.rows is None):
                    raise
                lines.append(f"eval: {b} has no local file; read from the hub ({bench.hub_id}) at the first eval")
        e = cfgs.eval
        lines.append(f"eval protocol: {e.protocol} (n={e.n}, T={e.temperature}, top_p={e.top_p}, "
                     f"max_new_tokens={e.max_new_tokens}, thinking={'on' if e.thinking else 'off'})")
    if cfgs.update is not None and cfgs.update.gate_split and not benchmarks.is_bare_name(cfgs.update.gate_split):
        if not Path(cfgs.update.gate_split).exists():
            raise InputError(cfgs.update.gate_split, "update_skills.gate_split does not exist")

    device = pick_device(loop_cfg.device)
    chosen = resolve_backend(loop_cfg.backend, spec, cuda=device.type == "cuda")
    if chosen == "vllm" and not vllm_available():
        raise InputError(None, "backend 'vllm' requested but vllm is not installed (pip install 'sgsd[cuda]')")
    lines.append(f"backend: {loop_cfg.backend}" + (f" -> {chosen}" if loop_cfg.backend == "auto" else "") + f" on {device}"
                 + (f"; training precision {cfgs.train.precision}, distributed {cfgs.train.distributed}"))

    run_dir = Path(loop_cfg.run_dir)
    if (run_dir / "loop_config.json").exists():
        loop._check_run_dir(run_dir, json.loads(json.dumps(resolved)), force, write=False, defaults=cfgs.defaults())
        done = loop.completed_steps(run_dir, loop_cfg.steps)
        lines.append(f"run dir: {run_dir} ({done} of {loop_cfg.steps} steps complete"
                     + (f"; continues at step {done + 1})" if done < loop_cfg.steps else ")"))
    elif run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "run directory is a file")
    else:
        lines.append(f"run dir: {run_dir} (new)")
    return resolved, lines
