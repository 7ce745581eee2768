"""`sgsd loop --dry-run`: resolve a recipe exactly as the run does and check its inputs, running nothing.

:func:`check` builds every stage's config through :func:`stages.loop.build_sections` (unknown keys and bad
values refused, the eval protocol's values filled in), then checks what the first step would need: the
model (a folder, adapter or checkpoint that exists, or a hub id that is cached or reachable), the training
pool (loaded as the run loads it: its source and row count, enough problems for a step), the skill bank and
index (sgsd), the retrieval encoder's package, the eval benchmarks, the run directory (a folder started with
another config is refused as the run refuses it) and the backend ``auto`` picks on this machine.  Every
problem is the run's own :class:`~stages.engine.io.InputError`.  The shell recipes' ``--dry-run`` calls it too.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import loop
from stages.engine import benchmarks
from stages.engine.io import InputError


def check(sections: dict, source: str = "config", force: bool = False) -> tuple[dict, list[str]]:
    """(the resolved config of every stage, one line per thing checked) for a loop recipe."""
    from stages.engine.generation.factory import resolve_backend, vllm_available
    from stages.engine.models import ModelSpec, pick_device

    S = loop.build_sections(sections, source)
    lc = S.loop
    resolved = S.resolved()
    lines: list[str] = []

    spec = ModelSpec.parse(lc.model, lc.gguf_file)
    spec.check()
    local = Path(spec.path).exists()
    lines.append(f"model: {lc.model} ({'local ' + ('adapter on ' + spec.path if spec.adapter else 'folder') if local else 'hub id, cached or reachable'})")

    src = benchmarks.load(lc.problems, data_dir=lc.data_dir)
    pool = src.df.sort("id")
    loop.step_problems(pool, 1, lc.prompts_per_step, lc.seed)  # a step's worth of distinct problems
    lines.append(f"training pool: {lc.problems} = {src.source} ({pool.height} problems)")
    rollouts = lc.steps * lc.prompts_per_step * S.rollout.n
    lines.append(f"steps: {lc.steps} x {lc.prompts_per_step} prompts x {S.rollout.n} sample(s) = {rollouts} rollouts "
                 f"({lc.steps * lc.prompts_per_step / pool.height:.2f} passes over the pool); objective {lc.objective}"
                 + (f"; eval every {lc.eval_every} steps" if lc.eval_every else "")
                 + (f"; skill update every {lc.skill_update_every} steps" if lc.skill_update_every else ""))

    if lc.objective == "sgsd":
        from stages.engine.skills.bank import require_pairs
        from stages.engine.skills.bank import load_bank

        bank = load_bank(S.score.bank)
        require_pairs(bank, S.score.bank)
        lines.append(f"skill bank: {S.score.bank} ({len(bank.skills)} skills, {len(bank.mistakes)} mistakes, "
                     f"version {bank.version})")
        sc = S.score
        if sc.index:
            from stages.engine.skills.index import read_index

            idx = read_index(sc.index, bank)  # refused when built from another bank version
            lines.append(f"index: {sc.index} ({idx.mode}, encoder {idx.encoder or '-'}) for bank version {bank.version}")
        if sc.retrieval in ("embedding", "hybrid") and not sc.index:
            from stages.engine.skills.encoders import DEFAULT_ENCODER, _has_st_config

            enc = sc.encoder or DEFAULT_ENCODER
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
            lines.append(f"retrieval: {sc.retrieval}, encoder {enc} "
                         f"({'sentence-transformers' if st_model else 'transformers mean pooling'})")
        else:
            lines.append(f"retrieval: {sc.retrieval}" + (" (from the index)" if sc.index else ""))

    if S.eval is not None:
        names = benchmarks.expand_bench_names(S.eval.benches) if S.eval.benches else []
        for b in names + list(S.eval.problems):
            try:
                e = benchmarks.load(b, data_dir=S.eval.data_dir, allow_hub=False)
                lines.append(f"eval: {b} = {e.source} ({e.df.height} problems)")
            except InputError:
                bench = benchmarks.get_benchmark(b) if benchmarks.is_bare_name(b) else None
                if bench is None or not bench.hub_id or (bench.file and bench.rows is None):
                    raise
                lines.append(f"eval: {b} has no local file; read from the hub ({bench.hub_id}) at the first eval")
        e = S.eval
        lines.append(f"eval protocol: {e.protocol} (n={e.n}, T={e.temperature}, top_p={e.top_p}, "
                     f"max_new_tokens={e.max_new_tokens}, thinking={'on' if e.thinking else 'off'})")
    if S.update is not None and S.update.gate_split and not benchmarks.is_bare_name(S.update.gate_split):
        if not Path(S.update.gate_split).exists():
            raise InputError(S.update.gate_split, "update_skills.gate_split does not exist")

    device = pick_device(lc.device)
    chosen = resolve_backend(lc.backend, spec, cuda=device.type == "cuda")
    if chosen == "vllm" and not vllm_available():
        raise InputError(None, "backend 'vllm' requested but vllm is not installed (pip install 'sgsd[cuda]')")
    lines.append(f"backend: {lc.backend}" + (f" -> {chosen}" if lc.backend == "auto" else "") + f" on {device}"
                 + (f"; training precision {S.train.precision}, distributed {S.train.distributed}"))

    run_dir = Path(lc.run_dir)
    if (run_dir / "loop_config.json").exists():
        loop._check_run_dir(run_dir, json.loads(json.dumps(resolved)), force, write=False, defaults=S.defaults())
        done = loop.completed_steps(run_dir, lc.steps)
        lines.append(f"run dir: {run_dir} ({done} of {lc.steps} steps complete"
                     + (f"; continues at step {done + 1})" if done < lc.steps else ")"))
    elif run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "run directory is a file")
    else:
        lines.append(f"run dir: {run_dir} (new)")
    return resolved, lines
