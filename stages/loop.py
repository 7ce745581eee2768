"""`sgsd loop`: the on-policy loop in one process, the model resident between stages.  docs/DESIGN.md 2.

Step n (``<run_dir>/step_000n/``)::

    problems.parquet      prompts_per_step problems drawn by a seeded sampler over the training pool
    rollout               the current policy samples (stages.rollout.run, resident model)
    score_teachers        sgsd: K skill-conditioned teachers score every rollout (stages.score_teachers.run)
    polarize              sgsd: verifier + polarity (stages.polarize.run); other objectives: grade only
    train                 the objective's optimizer steps (stages.train.Trainer.fit) -> checkpoint/
    eval                  every eval_every steps: the new policy on the [eval] benchmarks (stages.eval.run)
    skills_update.json    sgsd, every skill_update_every steps: online bank update (stages.update_skills.run)

and a row of ``<run_dir>/metrics.parquet`` (loss, reward, polarity fractions, support, lengths, grad norm,
lr, tokens/s, wall time per stage).  Every stage keeps its manifest, so a loop killed at any point and
restarted skips what is complete and continues: the trainer restarts from the newest valid checkpoint of
the interrupted step (a ``--save-every`` snapshot or its final checkpoint) or else from the previous step's
final checkpoint, with the optimizer, scheduler, RNG, sampler position and policy step of that moment.
Sampling seeds are functions of (seed, step, problem id), so a restarted run reproduces an uninterrupted one.

Under ``torchrun --nproc_per_node N --no-python sgsd loop`` every rank runs this loop with its own colocated
engine: it generates and scores its block of each step's prompts (``rollout/part-i-of-n``,
``score_teachers/part-i-of-n``), rank 0 polarizes, the ranks train together on the global batch (DDP / FSDP2)
and rank 0 writes the step's train manifest, checkpoint and metrics.  The results do not depend on N
(docs/SCALE_OUT.md).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch

from stages.engine.config import Checked, opt, runtime_fields, shared_opt
from stages.engine import agreement
from stages.engine import checkpoint as ckpt
from stages.engine.alarms import alarm_column, new_alarms
from stages.engine.config import build
from stages.engine.distributed import Dist, init_distributed
from stages.engine.generation.factory import make_backend
from stages.engine.metrics_log import MetricSinks
from stages.engine.atomic import atomic_write_json, write_parquet
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, read_manifest
from stages.engine.step_metrics import step_metrics
from stages.engine import dapo
from stages.engine.tableio import read_table
from stages.engine.tables import (DS_ROUND, DYNAMIC_SAMPLING, METRICS, POLARIZE_ROLLOUTS, PROBLEMS, ROLLOUT, SKILLS_UPDATE,
                                  TRAIN, TRAIN_BATCH)
from stages.polarize import PolarizeConfig
from stages.rollout import RolloutConfig
from stages.score_teachers import ScoreTeachersConfig
from stages.train import TrainConfig
from stages.eval import EvalConfig
from stages.update_skills import UpdateSkillsConfig
from stages.engine.models import ModelSpec, Resident
from stages.engine.seeds import derive_seed
from stages.engine.locks import run_dir_lock
from stages import polarize, rollout, score_teachers
from stages.engine.benchmarks import load_problems
from stages.train import Trainer
from stages.engine.skills.versions import init_bank_versions
from stages.engine.skills.bank import load_bank, require_pairs
from stages import eval as eval_stage
from stages.engine.skills.versions import latest_bank_version
from stages import update_skills
from stages.train import OBJECTIVES

@dataclass
class LoopConfig(Checked):
    run_dir: str = opt("runs/sgsd", "Run directory of the loop (step_NNNN/ per step, metrics.parquet).", group="Loop")
    objective: str = opt("sgsd", "sgsd, opsd or grpo (the registered objectives, stages/engine/objectives/).", group="Loop", choices=OBJECTIVES)
    model: str = opt("", "The initial policy (HF folder, hub id, .gguf, adapter folder).", group="Loop")
    gguf_file: str | None = shared_opt("gguf_file", group="Loop")
    problems: str = opt("train", "Training pool: benchmark name or problems file (id, problem, answer).", group="Loop")
    data_dir: str | None = opt(None, "Folder holding benchmark files.", group="Loop")
    bank: str = opt("", "Skill bank (sgsd, required: e.g. ../shared/data/skill_banks/sgsd_qwen3_1.7b.json; smoke runs data/demo/skill_bank.json); becomes bank/v0000 when skills are updated.", group="Loop")
    steps: int = opt(200, "Loop steps.", group="Loop", ge=1, key=False)
    prompts_per_step: int = opt(16, "Prompts sampled per step (seeded, epoch-wise).", group="Loop", ge=1)
    seed: int = opt(0, "Random seed (sampling, shuffling).", group="Loop", ge=0)
    device: str = shared_opt("device", group="Loop")
    backend: str = opt("auto", "Generation backend of the loop (one resident engine): auto (vLLM if installed, else hf-fast on CUDA, else hf), vllm, hf-fast, hf.", group="Loop", choices=("auto", "vllm", "hf-fast", "hf"))
    eval_every: int = opt(0, "Evaluate the policy on the [eval] benchmarks every N steps (0: never).", group="Loop", ge=0, key=False)
    probe_tokens: int = opt(16, "Engine/trainer probe after every weight load of the resident engine: tokens sampled from each of the step's first 2 problems by the engine and rescored by the trainer (0: off; stages/engine/agreement.py).", group="Loop", ge=0, key=False)
    probe_action: str = opt("stop", "When the probe's mean |delta logp| exceeds its tolerance: stop (exit 2, one line naming the step and the gap) or warn (one warning line).", group="Loop", choices=("stop", "warn"), key=False)
    probe_tol: float | None = opt(None, "Probe tolerance, nats per token (default: by dtype, the coarser of engine and trainer: fp32 2e-3, fp16 2e-2, bf16 5e-2).", group="Loop", gt=0, key=False)
    alarm_stop: bool = opt(False, "Stop the loop (exit 2) when a collapse alarm fires (reward or eval trend, SGSD polarity mix, completion length, truncation, format rate, token entropy, SGSD teacher-weight entropy; stages/engine/alarms.py); default: warn in one line and mark the step in metrics.parquet (alarms column).", group="Loop", key=False)
    dynamic_sampling: bool = opt(False, "GRPO, DAPO dynamic sampling: drop the step's groups whose rewards are all equal (no learning signal) and draw more prompts (seeded, none already drawn this step) until prompts_per_step informative groups are in hand or --ds-max-extra-prompts is spent; ds_* columns of metrics.parquet (stages/engine/dapo.py). Off as the reference.", group="DAPO")
    ds_max_extra_prompts: int | None = opt(None, "Dynamic sampling: at most this many prompts per step beyond the first draw (default 2 x prompts_per_step; 0: only drop, never draw more).", group="DAPO", ge=0)
    skill_update_every: int = opt(0, "Online skill-bank update every N steps (sgsd; 0: never).", group="Loop", ge=0)
    keep_last: int = opt(2, "Step checkpoints kept (step_N/checkpoint); 0 = all.", group="Loop", ge=0, key=False)
    vllm_tensor_parallel: int = opt(1, "vLLM tensor parallelism across this many consecutive torchrun ranks (colocated engine, external_launcher) for a policy that does not fit one GPU; the ranks of a group generate the same prompts. Must divide the number of ranks.", group="Scale-out", ge=1)
    vllm_gpu_memory_utilization: float | None = opt(None, "GPU memory share of each colocated vLLM engine (weights + KV cache; default 0.85 alone, 0.3 under torchrun beside the trainer).", group="Scale-out", gt=0, le=1, key=False)
    vllm_sleep: int = opt(0, "vLLM sleep mode while the ranks train: 0 off, 1 free the KV cache and offload the engine's weights to CPU, 2 free both (the new weights are loaded on wake anyway).", group="Scale-out", choices=(0, 1, 2), key=False)
    tensorboard: bool = opt(False, "Log the metrics row of every step to RUN_DIR/tensorboard (needs the `report` extra).", group="Logging", key=False)
    wandb_project: str = opt("", "Log every step to this Weights & Biases project (needs the `report` extra).", group="Logging", key=False)

    def check(self) -> None:
        if not self.model:  # ranges and choices: Checked, on every construction
            raise InputError(None, "loop.model is required")
        if self.dynamic_sampling and self.objective != "grpo":
            raise InputError(None, f"loop.dynamic_sampling is a GRPO option (groups of G rollouts with a reward each); "
                                   f"the objective is {self.objective}")

    @property
    def ds_budget(self) -> int:
        """Dynamic sampling's cap on extra prompts per step."""
        return 2 * self.prompts_per_step if self.ds_max_extra_prompts is None else self.ds_max_extra_prompts


def step_dir(run_dir: Path, n: int) -> Path:
    return Path(run_dir) / f"step_{n:04d}"


def step_problems(pool: pl.DataFrame, n: int, per_step: int, seed: int) -> pl.DataFrame:
    """Problems of step n: the next ``per_step`` distinct problems of a stream of seeded per-epoch permutations.

    Steps inside one epoch are plain slices of its permutation.  A step that straddles an epoch boundary
    would draw a problem twice (the tail of epoch e and the head of epoch e+1 can share one): the repeat is
    deferred to the next step instead, so every step holds distinct problems and every problem still comes
    once per epoch.  The stream is replayed from step 1 (cheap: n x per_step draws), so the result depends
    only on (pool, n, per_step, seed) and a restarted loop draws what an uninterrupted one would.
    """
    N = pool.height
    if n < 1:
        raise InputError(None, f"--step must be >= 1 (loop steps are 1-based: step_0001 is step 1; got {n})")
    if per_step > N:
        raise InputError(None, f"loop.prompts_per_step ({per_step}) exceeds the training pool ({N} problems): "
                               "a step cannot hold that many distinct problems")

    def stream():
        epoch = 0
        while True:
            yield from (int(i) for i in np.random.default_rng([seed, 7, epoch]).permutation(N))
            epoch += 1

    draws, deferred, chosen = stream(), [], []
    for _ in range(n):
        chosen, seen, again = [], set(), []
        while len(chosen) < per_step:
            i = deferred.pop(0) if deferred else next(draws)
            if i in seen:
                again.append(i)
            else:
                chosen.append(i)
                seen.add(i)
        deferred = deferred + again
    return pool[chosen]


def extra_problems(pool: pl.DataFrame, n: int, r: int, k: int, exclude: set, seed: int) -> pl.DataFrame:
    """Dynamic sampling's draw ``r`` (1-based) of step ``n``: the first ``k`` problems of a seeded permutation of the
    pool that are not in ``exclude`` (the step's problems so far); fewer when the pool runs out.  A function of
    (pool, n, r, k, exclude, seed) only, so a restarted loop and every rank draw the same problems."""
    ids = pool["id"].to_list()
    order = np.random.default_rng([seed, 11, n, r]).permutation(pool.height)
    return pool[[int(i) for i in order if ids[i] not in exclude][:k]]


def dynamic_batch(first: pl.DataFrame, draw: Callable[[int, int, set], pl.DataFrame], target: int,
                  max_extra: int) -> tuple[pl.DataFrame, dict]:
    """GRPO dynamic sampling over one step (DAPO; the rules are stages/engine/dapo.py's).

    ``first``: the step's graded rollouts (``problem_id`` = the group, ``reward``); ``draw(r, k, exclude)``: the graded
    rollouts of ``k`` more prompts (extra draw ``r``, none of the problem ids in ``exclude``).  Extra draws are sized by
    :func:`dapo.extra_prompts` until ``target`` informative groups
    are kept or ``max_extra`` extra prompts were drawn.  Returns (the kept groups' rows in draw order, or the first draw
    whole when no group is informative, so the step still trains; the ds_* metrics)."""
    tables = [first]
    rows = first

    def verdict(df: pl.DataFrame) -> dapo.GroupFilter:
        return dapo.filter_groups(df["reward"].to_list(), df["problem_id"].to_list(), target)

    f, extra, r = verdict(rows), 0, 0
    while True:
        k = dapo.extra_prompts(target, len(f.kept), f.drawn, extra_drawn=extra, max_extra=max_extra)
        if k == 0:
            break
        r += 1
        got = draw(r, k, set(rows["problem_id"].to_list()))
        if got.height == 0:  # the pool is spent
            break
        extra += int(got["problem_id"].n_unique())
        tables.append(got)
        rows = pl.concat(tables, how="diagonal_relaxed")
        f = verdict(rows)
    keep = dapo.rollout_keep(rows["problem_id"].to_list(), f.kept)
    batch = rows.filter(pl.Series(keep)) if f.kept else first
    out = dapo.dynamic_sampling_metrics(f, r, target)
    out["ds_extra_prompts"] = extra
    return batch, out


def _complete(manifest: Path) -> bool:
    try:
        return bool(read_manifest(manifest).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def completed_steps(run_dir: Path, steps: int) -> int:
    """Largest k such that steps 1..k all finished training (their train manifest is complete)."""
    k = 0
    while k < steps and _complete(TRAIN.manifest(step_dir(run_dir, k + 1))):
        k += 1
    return k


@dataclass
class Sections:
    """Every stage's config for the whole run, built once from the resolved TOML sections."""
    loop: LoopConfig
    rollout: Any
    score: Any
    polarize: Any
    train: Any
    eval: Any
    update: Any
    raw: dict

    def defaults(self) -> dict:
        """Each section's field defaults (what a field absent from an older run's loop_config.json meant)."""
        from dataclasses import MISSING, fields

        out = {}
        for name, c in (("loop", self.loop), ("rollout", self.rollout), ("score_teachers", self.score),
                        ("polarize", self.polarize), ("train", self.train), ("eval", self.eval),
                        ("update_skills", self.update)):
            if c is not None:
                out[name] = {f.name: (f.default if f.default is not MISSING else f.default_factory())
                             for f in fields(c) if f.default is not MISSING or f.default_factory is not MISSING}
        return json.loads(json.dumps(out, default=str))

    def resolved(self) -> dict:
        out = {"loop": asdict(self.loop), "rollout": asdict(self.rollout), "score_teachers": asdict(self.score),
               "polarize": asdict(self.polarize), "train": asdict(self.train)}
        if self.eval is not None:
            out["eval"] = asdict(self.eval)
        if self.update is not None:
            out["update_skills"] = asdict(self.update)
        return out


def build_sections(sections: dict, source: str = "config") -> Sections:
    loop_cfg = build(LoopConfig, sections.get("loop", {}), "loop", source)
    loop_cfg.check()
    common = {"model": loop_cfg.model, "gguf_file": loop_cfg.gguf_file, "seed": loop_cfg.seed, "device": loop_cfg.device}
    rollout_cfg = build(RolloutConfig, sections.get("rollout", {}), "rollout", source, problems="",
                        backend=loop_cfg.backend, data_dir=loop_cfg.data_dir, **common)
    bank_over = {"bank": loop_cfg.bank} if "bank" not in sections.get("score_teachers", {}) else {}
    score_cfg = build(ScoreTeachersConfig, sections.get("score_teachers", {}), "score_teachers", source, **bank_over,
                      **common)
    if loop_cfg.objective == "sgsd" and not score_cfg.bank:
        raise InputError(source, "loop.bank is required for sgsd: a skill bank JSON (the paper's: ../shared/data/"
                                 "skill_banks/sgsd_qwen3_1.7b.json; smoke runs: data/demo/skill_bank.json)")
    polarize_cfg = build(PolarizeConfig, sections.get("polarize", {}), "polarize", source)
    train_cfg = build(TrainConfig, sections.get("train", {}), "train", source, objective=loop_cfg.objective, **common)
    per_step = train_cfg.steps or (train_cfg.num_iterations if loop_cfg.objective == "grpo" else 1)
    if not train_cfg.schedule_steps and train_cfg.lr_schedule in ("cosine", "linear"):  # the horizon is the whole loop
        train_cfg = replace(train_cfg, schedule_steps=loop_cfg.steps * per_step)
    eval_cfg = None
    if loop_cfg.eval_every:
        eval_cfg = build(EvalConfig, sections.get("eval", {}), "eval", source, data_dir=loop_cfg.data_dir, **common)
        if not eval_cfg.benches and not eval_cfg.problems:
            raise InputError(source, "loop.eval_every is set but the eval table names no benches or problems")
        eval_cfg = eval_cfg.resolved()  # protocol values filled in and checked before the first step, not after it
    update_cfg = None
    if loop_cfg.skill_update_every:
        update_cfg = build(UpdateSkillsConfig, sections.get("update_skills", {}), "update_skills", source,
                           last_steps=loop_cfg.skill_update_every, **common)
        update_cfg.check()
    return Sections(loop_cfg, rollout_cfg, score_cfg, polarize_cfg, train_cfg.resolved(), eval_cfg, update_cfg, sections)


def collect_metrics(run_dir: Path, upto: int, objective: str) -> pl.DataFrame:
    rows = [step_metrics(step_dir(run_dir, n), n, objective) for n in range(1, upto + 1)]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


# the config class of each recipe section the loop records in loop_config.json
SECTION_CONFIGS = {"loop": LoopConfig, "rollout": RolloutConfig, "score_teachers": ScoreTeachersConfig,
                   "polarize": PolarizeConfig, "train": TrainConfig, "update_skills": UpdateSkillsConfig}


def _check_run_dir(run_dir: Path, resolved: dict, force: bool, write: bool = True, defaults: dict | None = None) -> None:
    """A run directory belongs to one loop config (steps, eval cadence, keep_last, loggers may change);
    ``write=False`` (the dry run) only checks.  A field that the recorded config lacks (it was written before
    the field existed) matches when the new value is the field's default (``defaults``: Sections.defaults)."""
    path = run_dir / "loop_config.json"

    def key(r: dict, like: dict | None = None) -> dict:
        k = json.loads(json.dumps(r))
        for s, fs in (defaults or {}).items():
            if like is not None and isinstance(k.get(s), dict):
                for f, v in fs.items():
                    if f not in (like.get(s) or {}) and k[s].get(f) == v:
                        k[s].pop(f)
        for name, cls in SECTION_CONFIGS.items():  # runtime-only fields (opt(key=False)) may change
            for f in runtime_fields(cls):
                if isinstance(k.get(name), dict):
                    k[name].pop(f, None)
        k.pop("eval", None)
        return k

    if path.exists() and not force:
        old = json.loads(path.read_text())
        if key(old) != key(resolved, old):
            a, b = key(old), key(resolved, old)
            diff = sorted(f"{s}.{f}" for s in set(a) | set(b) for f in set(a.get(s) or {}) | set(b.get(s) or {})
                          if (a.get(s) or {}).get(f, "<absent>") != (b.get(s) or {}).get(f, "<absent>"))
            diff += sorted(s for s in set(a) | set(b) if not isinstance(a.get(s), dict) or not isinstance(b.get(s), dict))
            raise InputError(path, f"this run directory was started with another config (differs in "
                                   f"{', '.join(diff[:6])}); use another run directory or pass --force")
    if write:
        atomic_write_json(path, resolved)


def prune_steps(run_dir: Path, upto: int, keep_last: int) -> None:
    """Keep the checkpoints of the newest ``keep_last`` finished steps (<= upto); 0 keeps all.  Idempotent, so a
    rerun that finds every step complete still finishes the pruning a killed run skipped."""
    if not keep_last:
        return
    for old in range(1, upto - keep_last + 1):
        for name in (ckpt.FINAL, ckpt.INTERMEDIATE):
            p = step_dir(run_dir, old) / name
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)


def run(sections: dict, *, source: str = "config", force: bool = False,
        progress: ProgressFn | None = None,
        log: Callable[[str], None] | None = None) -> Path:
    """Run (or continue) the loop described by resolved config sections; returns metrics.parquet.

    The run directory is locked for the whole run (a second loop or a stage in it is refused, naming the
    holder); taking the lock clears the temp files a killed run left.  Under ``torchrun`` every rank runs
    this: rank 0 holds the lock, logs and draws the progress bars (see :class:`LoopRun`)."""
    cfgs = build_sections(sections, source)
    if cfgs.loop.objective == "sgsd":  # an unusable bank is refused before the run directory is touched
        require_pairs(load_bank(cfgs.score.bank), cfgs.score.bank)
    dist = init_distributed(cfgs.loop.device)
    if not dist.main:
        progress, log = None, None
    try:
        with run_dir_lock(cfgs.loop.run_dir, "sgsd loop"):
            dist.barrier()  # no rank writes before rank 0 holds the lock and has cleared stale temp files
            return LoopRun(cfgs, dist=dist, progress=progress, log=log).run(force=force)
    finally:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _shard(dist: Dist, tp: int = 1) -> tuple[int, int]:
    """(block, blocks) of this rank's prompts: one block per rank, or per group of ``tp`` ranks that run one
    tensor-parallel vLLM engine together (the group's ranks generate the same block)."""
    if dist.world % tp:
        raise InputError(None, f"loop.vllm_tensor_parallel ({tp}) must divide the number of ranks ({dist.world})")
    return (dist.rank // tp, dist.world // tp)


@dataclass
class Step:
    """One loop step: its number, folder and the policy that samples it (a model path or the previous checkpoint)."""
    number: int
    folder: Path
    policy: str
    gguf_file: str | None  # the initial policy's, on step 1 only


class LoopRun:
    """The loop body, one method per stage.  What stays resident across steps: the trainer (policy, optimizer,
    schedule, distributed wrapping) and one generation engine refreshed with the trainer's weights.

    With N ranks (``dist``) every rank generates and scores its contiguous block of the step's prompts
    (``rollout/part-i-of-n``, ``score_teachers/part-i-of-n``; sampling is seeded per problem, so the parts in order
    are the table one process writes), rank 0 polarizes (cheap, CPU), all ranks train on the global batch (DDP or
    FSDP2, :class:`stages.train.Trainer`) and rank 0 writes the train manifest, checkpoint, metrics, eval and skill
    updates.  A barrier ends every stage."""

    def __init__(self, cfgs: Sections, *, dist: Dist | None = None,
                 progress: ProgressFn | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfgs, self.cfg = cfgs, cfgs.loop
        self.dist = dist or Dist()
        self.progress = progress
        self.say = log or (lambda s: None)
        self.run_dir = Path(self.cfg.run_dir)
        self.trainer: Trainer | None = None
        self.engine = None  # the resident generation engine (vllm / hf-fast / hf), refreshed with update_weights
        self.bank_history: Path | None = None

    # ---- the run

    def run(self, force: bool = False) -> Path:
        cfg, dist, say = self.cfg, self.dist, self.say
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.cfgs.resolved()
        if dist.main:  # refused now if started with another config; claimed (loop_config.json) when the first stage starts
            _check_run_dir(run_dir, resolved, force, write=False, defaults=self.cfgs.defaults())
        dist.barrier()
        self.pool = load_problems(cfg.problems, data_dir=cfg.data_dir).sort("id")

        done = completed_steps(run_dir, cfg.steps)
        metrics_path = METRICS.file(run_dir)
        if dist.main:
            prune_steps(run_dir, done, cfg.keep_last)
        if done == cfg.steps:
            if dist.main:
                write_parquet(collect_metrics(run_dir, done, cfg.objective), metrics_path)
            say(f"loop: all {cfg.steps} steps are complete")
            dist.barrier()
            return metrics_path

        start = self._start_checkpoint(done)
        if done or start:
            say(f"loop: {done} step(s) complete; continuing at step {done + 1}" + (f" from {start}" if start else ""))
        tp = cfg.vllm_tensor_parallel if cfg.backend in ("vllm", "auto") else 1
        self.shard = _shard(dist, tp)
        if cfg.prompts_per_step < dist.world:
            raise InputError(None, f"loop.prompts_per_step ({cfg.prompts_per_step}) is below the number of ranks "
                                   f"({dist.world}): every rank needs at least one prompt per step")
        if dist.world > 1:
            say(f"loop: {dist.world} ranks; each generates and scores 1/{dist.world} of every step's prompts")
        self.trainer = Trainer(replace(self.cfgs.train, model=self.policy_name(done + 1)), start=start, log=say,
                               dist=dist, inference_copy=True)
        self.trainer.policy.eval()
        if dist.main:  # everything the first stage needs has loaded: the run directory is this config's from here on
            _check_run_dir(run_dir, resolved, force, defaults=self.cfgs.defaults())
        if cfg.skill_update_every and cfg.objective == "sgsd":
            if dist.main:
                init_bank_versions(run_dir, load_bank(self.cfgs.score.bank))
            dist.barrier()
            self.bank_history = run_dir
        self.sinks = MetricSinks(cfg.tensorboard, cfg.wandb_project, run_dir, resolved, say) if dist.main else None
        try:
            for n in range(done + 1, cfg.steps + 1):
                self.step(n)
        finally:
            if self.sinks is not None:
                self.sinks.close()
            if self.engine is not None:
                self.engine.close()
        return metrics_path

    def policy_name(self, n: int) -> str:
        """The policy that samples step n: the initial model, then the previous step's final checkpoint."""
        return self.cfg.model if n == 1 else str(step_dir(self.run_dir, n - 1) / ckpt.FINAL)

    def policy_step_at(self, n: int) -> int:
        """Optimizer steps behind the policy that samples step n (fixed, whatever checkpoint a restart used)."""
        if n == 1:
            model = self.cfg.model
            return int(json.loads((Path(model) / ckpt.META).read_text())["policy_step"]) if ckpt.is_checkpoint(model) else 0
        return int(read_manifest(TRAIN.manifest(step_dir(self.run_dir, n - 1)))["policy_step"])

    def _start_checkpoint(self, done: int) -> Path | None:
        """Where the trainer starts: the interrupted step's own newest valid checkpoint, else the previous step's."""
        start = ckpt.find_resume(step_dir(self.run_dir, done + 1), "latest-valid", warn=self.say)
        if start is None and done > 0:
            start = step_dir(self.run_dir, done) / ckpt.FINAL
            ckpt.validate(start)
        if start is None and ckpt.is_checkpoint(self.cfg.model):  # continue another run's policy with its optimizer state
            ckpt.validate(self.cfg.model)
            start = Path(self.cfg.model)
        return start

    def step(self, n: int) -> None:
        folder = step_dir(self.run_dir, n)
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(self.progress, "note"):  # the CLI's one live display: which step the bars belong to
            self.progress.note(f"step {n}/{self.cfg.steps}")
        step = Step(n, folder, self.policy_name(n), self.cfg.gguf_file if n == 1 else None)
        started = time.time()
        self.sample(step)
        if self.cfg.objective == "sgsd":
            self.score(step)
            self.polarize(step)
        else:
            self.grade(step)
        self.dist.barrier()
        if self.cfg.dynamic_sampling:
            self.fill_batch(step)
        self.train(step)
        self.after_training(step, started)

    # ---- the stages

    def resident(self, policy: str, gguf_file: str | None) -> Resident:
        """The trainer's inference model as a stage's ``loaded`` argument."""
        return Resident(self.trainer.inference_model, self.trainer.tok, ModelSpec.parse(policy, gguf_file))

    def refresh_engine(self, step: Step, probe: str) -> None:
        """The resident engine gets the trainer's newest weights (built on first use), then the probe checks it."""
        self.trainer.sync_inference()  # FSDP: the shards' newest weights into the full inference copy (all ranks)
        if self.engine is None:  # built once ("auto" resolved here), then refreshed in place
            here = self.resident(step.policy, step.gguf_file)
            self.engine = make_backend(self.cfg.backend, model=here.model, tokenizer=here.tokenizer, spec=here.spec,
                                       **_engine_options(self.cfg))
        else:
            self.engine.wake_up()
            self.engine.update_weights(self.trainer.inference_model)
        _probe_engine(self.engine, self.trainer, self.cfg, step.folder, step.number, self.dist, self.say, probe)

    def sample(self, step: Step) -> None:
        cfg, dist = self.cfg, self.dist
        problems = PROBLEMS.file(step.folder)
        if dist.main and not problems.exists():
            write_parquet(step_problems(self.pool, step.number, cfg.prompts_per_step, cfg.seed), problems)
        dist.barrier()
        rollout_cfg = replace(self.cfgs.rollout, model=step.policy, gguf_file=step.gguf_file, problems=str(problems),
                              policy_step=self.policy_step_at(step.number),
                              seed=derive_seed(cfg.seed, step.number, "rollout"), data_dir=None, shard=self.shard)
        self.refresh_engine(step, "engine_probe")
        rollout.run(rollout_cfg, step.folder, progress=self.progress, loaded=self.resident(step.policy, step.gguf_file),
                    backend=self.engine)
        if cfg.vllm_sleep:
            self.engine.sleep(cfg.vllm_sleep)  # the KV cache (and at level 2 the weights) freed for scoring and training
        dist.barrier()

    def score(self, step: Step) -> None:
        bank = self.cfgs.score.bank
        if self.bank_history is not None:
            bank = str(latest_bank_version(self.run_dir).path)
        score_cfg = replace(self.cfgs.score, model=step.policy, gguf_file=step.gguf_file, bank=bank,
                            seed=derive_seed(self.cfg.seed, step.number, "score_teachers"),
                            shard=(self.dist.rank, self.dist.world))  # per rank even when a TP group shares rollouts
        score_teachers.run(score_cfg, step.folder, progress=self.progress,
                           loaded=self.resident(step.policy, step.gguf_file))
        self.dist.barrier()

    def polarize(self, step: Step) -> None:
        if self.dist.main:
            polarize.run(replace(self.cfgs.polarize, model=step.policy), step.folder, progress=self.progress,
                         tokenizer=self.trainer.tok)

    def grade(self, step: Step) -> None:
        if self.dist.main:
            polarize.grade(self.cfgs.polarize, step.folder)

    def fill_batch(self, step: Step) -> None:
        """GRPO dynamic sampling (:func:`dynamic_batch`): extra draws in ``step_n/ds_round_rr/`` (problems, rollout, grades,
        each a stage with its manifest, so a restart redoes nothing), then ``train_batch.parquet`` (what the trainer
        reads) and ``dynamic_sampling.json`` (the ds_* metrics).  Every rank reads the same graded tables and takes the
        same decisions; each rank generates its block of every extra draw (a draw smaller than the number of blocks leaves
        some ranks an empty block: the draw's size never depends on the number of ranks, so neither do the results),
        rank 0 grades and writes."""
        cfg, dist, folder = self.cfg, self.dist, step.folder
        if TRAIN_BATCH.file(folder).exists() and (folder / DYNAMIC_SAMPLING).exists():
            return
        awake = not cfg.vllm_sleep

        def graded(sub: Path) -> pl.DataFrame:
            gr = read_table(POLARIZE_ROLLOUTS.file(sub), {"rollout_id": str, "correct": bool})
            reward = pl.DataFrame({"rollout_id": gr["rollout_id"], "reward": gr["correct"].cast(pl.Float64)})
            ro = read_table(ROLLOUT.path(sub))
            return ro.drop("reward", strict=False).join(reward, on="rollout_id", how="left", maintain_order="left")

        def draw(r: int, k: int, exclude: set) -> pl.DataFrame:
            nonlocal awake
            sub = folder / DS_ROUND.format(r)
            sub.mkdir(exist_ok=True)
            probs = PROBLEMS.file(sub)
            if dist.main and not probs.exists():
                write_parquet(extra_problems(self.pool, step.number, r, k, exclude, cfg.seed), probs)
            dist.barrier()
            if pl.read_parquet(probs).height == 0:
                return pl.DataFrame()
            if not awake:  # the engine slept after the first draw: wake it with the step's weights
                self.engine.wake_up()
                self.engine.update_weights(self.trainer.inference_model)
                awake = True
            rollout_cfg = replace(self.cfgs.rollout, model=step.policy, gguf_file=step.gguf_file, problems=str(probs),
                                  policy_step=self.policy_step_at(step.number),
                                  seed=derive_seed(cfg.seed, step.number, "rollout"), data_dir=None, shard=self.shard)
            rollout.run(rollout_cfg, sub, progress=self.progress, loaded=self.resident(step.policy, step.gguf_file),
                        backend=self.engine)
            dist.barrier()
            if dist.main:
                polarize.grade(self.cfgs.polarize, sub)
            dist.barrier()
            return graded(sub)

        batch, ds = dynamic_batch(graded(folder), draw, cfg.prompts_per_step, cfg.ds_budget)
        if not awake:
            self.engine.sleep(cfg.vllm_sleep)
        if dist.main:
            self.say(f"step {step.number}: dynamic sampling kept {ds['ds_groups_kept']} of {ds['ds_groups_drawn']} groups "
                     f"({ds['ds_extra_prompts']} extra prompts in {ds['ds_rounds']} draw(s))"
                     + (" - short of the target, the budget is spent" if ds["ds_short"] else ""))
            atomic_write_json(folder / DYNAMIC_SAMPLING, ds)
            write_parquet(batch, TRAIN_BATCH.file(folder))
        dist.barrier()

    def train(self, step: Step) -> None:
        self.trainer.fit(step.folder, progress=self.progress, policy=step.policy)
        self.trainer.policy.eval()

    def after_training(self, step: Step, started: float) -> None:
        """Eval and the skill update (writer, gate) generate with the one resident engine, holding the new weights;
        then rank 0 writes the metrics row, checks the alarms and prunes old checkpoints."""
        cfg, n = self.cfg, step.number
        new_policy = str(step.folder / ckpt.FINAL)
        want_eval = self.cfgs.eval is not None and n % cfg.eval_every == 0
        want_update = self.cfgs.update is not None and self.bank_history is not None and n % cfg.skill_update_every == 0
        if want_eval or want_update:
            self.trainer.sync_inference()
            if self.engine is not None:
                self.engine.wake_up()
                self.engine.update_weights(self.trainer.inference_model)
                _probe_engine(self.engine, self.trainer, cfg, step.folder, n, self.dist, self.say, "engine_probe_eval")
        new_resident = self.resident(new_policy, None)
        if self.dist.main:  # rank 0 evaluates and updates the bank; the other ranks wait at the barrier below
            if want_eval:
                eval_stage.run(replace(self.cfgs.eval, model=new_policy, gguf_file=None), step.folder,
                               progress=self.progress, loaded=new_resident, backend=self.engine)
            if want_update:
                _update_skills(self.cfgs.update, self.run_dir, step.folder, new_policy, new_resident, self.progress,
                               backend=self.engine)
            self.record(step, started)
        if cfg.vllm_sleep and self.engine is not None:
            self.engine.sleep(cfg.vllm_sleep)
        self.dist.barrier()

    def record(self, step: Step, started: float) -> None:
        """metrics.parquet (every finished step's row, rebuilt from the tables), the alarms, the loggers, pruning."""
        cfg, n = self.cfg, step.number
        metrics_path = METRICS.file(self.run_dir)
        metrics = collect_metrics(self.run_dir, n, cfg.objective)
        history = metrics.to_dicts()
        metrics = metrics.with_columns(pl.Series("alarms", alarm_column(history), dtype=pl.String))
        write_parquet(metrics, metrics_path)
        for a in new_alarms(history):
            if cfg.alarm_stop:
                raise InputError(metrics_path, f"collapse alarm at step {n}: {a} (loop.alarm_stop)")
            self.say(f"warning: collapse alarm at step {n}: {a}")
        self.sinks.write(metrics.row(-1, named=True), n)
        self.say(f"step {n}/{cfg.steps} done in {time.time() - started:.1f}s: loss {metrics['loss'][-1]:.5f}"
                 + (f", reward {metrics['reward'][-1]:.3f}" if "reward" in metrics.columns else ""))
        prune_steps(self.run_dir, n, cfg.keep_last)


def _probe_engine(engine, trainer, loop_cfg: "LoopConfig", folder: Path, n: int, dist: Dist, say, name: str) -> None:
    """After the resident engine got its weights: a short probe whose log-probs must match the trainer's
    (stages/engine/agreement.py); the result goes to ``folder/<name>.json``.  Every rank probes its own engine and
    all ranks take the same decision."""
    if not loop_cfg.probe_tokens:
        return
    texts = pl.read_parquet(PROBLEMS.file(folder))["problem"].head(agreement.PROBE_PROMPTS).to_list()
    prompts = [ids[:256] for ids in (trainer.tok(str(t), add_special_tokens=False)["input_ids"] for t in texts) if ids]
    if not prompts:
        return
    compute = torch.bfloat16 if trainer.precision in ("bf16-mixed", "bf16") else None
    res = agreement.probe(engine, trainer.inference_model, prompts, tokens=loop_cfg.probe_tokens, tol=loop_cfg.probe_tol,
                          compute_dtype=compute, seed=derive_seed(loop_cfg.seed, n, "probe"))
    worst = dist.all_sum([0.0 if res.ok else 1.0])[0]
    if dist.main:
        atomic_write_json(folder / f"{name}.json", res.to_json())
    if worst > 0:
        msg = (f"engine/trainer mismatch at step {n}: after loading weights the {getattr(engine, 'name', '?')} engine's "
               f"log-probs differ from the trainer's by {res.gap_mean:.3g} nats per token (max {res.gap_max:.3g}, "
               f"tolerance {res.tol:.2g}): the engine is not serving the trainer's weights")
        if loop_cfg.probe_action == "warn":
            say(f"warning: {msg}")
        else:
            raise InputError(folder / f"{name}.json", msg + " (loop.probe_action = \"warn\" to go on)")


def _engine_options(loop_cfg: "LoopConfig") -> dict:
    """vLLM options of the loop's engine (ignored by the transformers backends)."""
    if loop_cfg.backend not in ("vllm", "auto"):
        return {}
    opts: dict[str, Any] = {"tensor_parallel_size": loop_cfg.vllm_tensor_parallel, "sleep_mode": bool(loop_cfg.vllm_sleep)}
    if loop_cfg.vllm_gpu_memory_utilization is not None:
        opts["gpu_memory_utilization"] = loop_cfg.vllm_gpu_memory_utilization
    return opts


def _update_skills(update_cfg, run_dir: Path, folder: Path, policy: str, loaded, progress, backend=None) -> None:
    marker = folder / SKILLS_UPDATE
    if marker.exists():
        return
    started = time.time()
    res = update_skills.run(replace(update_cfg, model=policy, gguf_file=None), run_dir, progress=progress, loaded=loaded,
                            backend=backend)
    atomic_write_json(marker, {"decision": res.decision, "reason": res.reason, "success_rate": res.success_rate,
                               "version": res.version.label, "wall_s": round(time.time() - started, 3)})


def write_step_problems(pool: str, step: int, per_step: int, seed: int, out: str | Path,
                        data_dir: str | None = None) -> Path:
    """The problems the loop gives step ``step`` (used by the shell recipes in scripts/)."""
    df = step_problems(load_problems(pool, data_dir=data_dir).sort("id"), step, per_step, seed)
    return write_parquet(df, out)
