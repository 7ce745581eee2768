"""`sgsd train`: one optimizer loop for every registered objective.  docs/DESIGN.md 1.4-1.5 and 2.

The objective (``--objective NAME``: a class in ``stages/engine/objectives/``, looked up in their registry) reads
the tables of one run directory (``rollout`` and, for SGSD, ``score_teachers`` + ``polarize``; part directories
work too), builds one item per rollout, computes the loss and its own metrics columns; this module owns the
model, optimizer, schedule, distributed wrapping and checkpoints, and runs ``steps`` optimizer steps over global batches
of ``batch_size`` rollouts drawn by a seeded sampler.  Each step (the whole of it fits on one screen, see
:meth:`Trainer.train_step`)::

    seed from (seed, policy step, rank); split my share of the batch into micro-batches
    for each micro-batch: loss = objective(micro-batch) / batch normaliser * world; loss.backward()
    clip the grad norm, AdamW step, LR schedule step, EMA teacher update, one metrics row

Scale-out: under ``torchrun`` every rank reads the tables, takes the rows ``batch[rank::world]`` of each
global batch and wraps the policy in DDP or FSDP2 (``fully_shard`` on each decoder layer and the root), so
the global batch is ``micro_batch_size x grad_accum x world`` rollouts whatever the world size.  Only rank
0 writes tables, manifests and the shared checkpoint files.

Outputs in the run directory: ``train.parquet`` (one metrics row per optimizer step) + manifest,
``checkpoint/`` (model or adapter, optimizer, scheduler, RNG states, sampler position, policy step, skill
bank version; see :mod:`stages.engine.checkpoint`) and ``checkpoints/step_XXXXXX/`` snapshots (``save_every``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from stages.engine import agreement
from stages.engine import checkpoint as ckpt
from stages.engine import training
from stages.engine.config import Checked, opt, shared_opt, stage_key
from stages.engine.distributed import Dist, init_distributed, rng_state, seed_all, set_rng_state
from stages.engine.atomic import commit_dir
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import read_table
from stages.engine.metrics_log import MetricSinks
from stages.engine.models import ModelSpec, check_token_ids, load_model, pick_device, save_model
from stages.engine.objectives import base as objectives
from stages.engine.objectives.base import Objective
from stages.engine.objectives.grpo import AGGREGATIONS, IS_MODES
from stages.engine.objectives.opsd import chunked_clipped_forward_kl, completion_hidden
from stages.engine.objectives.sgsd import REVERSED_TOKENS, method_field
from stages.engine.scoring import Segment, score_segments, split_lm, varlen_attention
from stages.engine.training import SCHEDULES, Sampler

OBJECTIVES = objectives.names()  # the registered objectives (stages/engine/objectives/)
TEACHER_MODES = ("live", "fixed", "ema")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig(Checked):
    objective: str = opt("sgsd", "sgsd (gated skill-conditioned self-distillation), opsd (clipped forward KL to a gold-answer teacher) or grpo.", group="Objective", choices=OBJECTIVES)
    model: str = opt("", "Policy to train: HF folder, hub id, .gguf file, LoRA adapter folder, or a training checkpoint folder (continues its optimizer state and policy step).", group="Objective")
    gguf_file: str | None = shared_opt("gguf_file", group="Objective")
    # optimisation
    steps: int = opt(0, "Optimizer steps to run in this run directory; 0 = one pass over the table (x --num-iterations).", group="Optimisation", ge=0)
    batch_size: int = opt(16, "Global batch: rollouts per optimizer step (= micro batch x accumulation x world size; 0 = the whole table).", group="Optimisation", ge=0)
    micro_batch_size: int = opt(4, "Rollouts per forward pass on each device.", group="Optimisation", ge=1)
    lr: float = opt(5e-6, "Peak learning rate (AdamW).", group="Optimisation", ge=0)
    lr_schedule: str = opt("constant", "constant, cosine, or linear (decay to --min-lr-ratio at the horizon: the reference's HF default, used by the paper recipes); all after linear warmup.", group="Optimisation", choices=SCHEDULES)
    warmup_steps: int = opt(0, "Linear warmup steps.", group="Optimisation", ge=0)
    schedule_steps: int = opt(0, "Cosine / linear horizon in policy steps (0 = --steps; the loop sets its whole run).", group="Optimisation", ge=0)
    min_lr_ratio: float = opt(0.0, "Cosine floor as a fraction of --lr.", group="Optimisation", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay.", group="Optimisation", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", group="Optimisation", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2.", group="Optimisation", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW epsilon.", group="Optimisation", gt=0)
    max_grad_norm: float = opt(0.1, "Gradient-norm clip (<= 0: off).", group="Optimisation")
    precision: str = opt("auto", "auto (bf16-mixed on bf16 GPUs, else fp32), fp32, bf16-mixed (fp32 weights, bf16 compute), bf16 (bf16 weights).", group="Optimisation", choices=PRECISIONS)
    gradient_checkpointing: bool = opt(False, "Recompute decoder layers in backward to save memory.", group="Optimisation")
    # LoRA (peft)
    lora: bool = opt(False, "Train a LoRA adapter (peft) instead of all weights.", group="LoRA")
    lora_r: int = opt(64, "LoRA rank.", group="LoRA", ge=1)
    lora_alpha: int = opt(128, "LoRA alpha.", group="LoRA", ge=1)
    lora_dropout: float | None = opt(None, "LoRA dropout. Default as the reference runs: 0.05 for grpo (peft/TRL default), 0 for sgsd and opsd (their trainer zeroes every dropout: opsd_trainer.py:201-202).", group="LoRA", ge=0, lt=1)  # None: per objective
    lora_target: str = opt("all-linear", "LoRA target modules: all-linear or a comma list (q_proj,k_proj,...).", group="LoRA")
    save_merged: bool = opt(False, "With LoRA, also save the adapter merged into the base weights (checkpoint/merged).", group="LoRA")
    # teacher (sgsd: live by default; opsd: fixed by default)
    teacher_mode: str = opt("", "live (current weights, no grad), fixed (sgsd: stored teacher log-probs; opsd: the initial weights) or ema. Default: live for sgsd, fixed for opsd.", group="Teacher", choices=("",) + TEACHER_MODES)
    ema_decay: float = opt(0.99, "EMA teacher decay per optimizer step.", group="Teacher", ge=0, lt=1)
    teacher_model: str = opt("", "Weights of the fixed teacher / GRPO reference under full fine-tuning (default: the initial weights).", group="Teacher")
    # sgsd
    tau: float = method_field("tau", group="SGSD")
    polarity: str = method_field("polarity", group="SGSD")
    reversed_tokens: str = opt("all", "Tokens of a reversed teacher's term (rho = -1): all (the method as the reference specifies it) or stance (VARIANT: only tokens whose Delta has the teacher's stance sign, so the pushed-apart term never lowers a correct rollout's token or raises a wrong one's; docs/SKILL_WORLD.md).", group="SGSD", choices=REVERSED_TOKENS)
    scoring_temperature: float | None = opt(None, "Temperature of the training log-probs (default: the score-teachers table's for sgsd, the rollout's sampling temperature for grpo and opsd, as the reference divides the logits by it).", group="SGSD", gt=0)
    # opsd
    kl_clip: float = opt(0.05, "OPSD: clip of each vocabulary term of the forward KL (<= 0: off).", group="OPSD")
    kl_top_k: int = opt(0, "OPSD: KL over the teacher's top-k tokens, both distributions renormalised over them (0 = full vocabulary).", group="OPSD", ge=0)
    teacher_thinking: str = opt("on", "OPSD: thinking flag of the teacher prompt: on (the reference, data/data_collator.py:72-77), off, or rollout (the rollout's flag).", group="OPSD", choices=("on", "off", "rollout"))  # new: reference default on
    kl_chunk: int = opt(1024, "OPSD: token positions per [tokens, vocab] chunk.", group="OPSD", ge=1)
    # grpo
    clip_eps: float = opt(0.2, "GRPO: PPO ratio clip epsilon (lower, and upper unless --clip-eps-high).", group="GRPO", ge=0)
    clip_eps_high: float | None = opt(None, "GRPO: upper ratio clip epsilon.", group="GRPO", ge=0)
    num_iterations: int = opt(1, "GRPO: optimizer steps per batch of rollouts.", group="GRPO", ge=1)
    kl_beta: float = opt(0.0, "GRPO: weight of the k3 KL to a reference model (0 = no reference).", group="GRPO", ge=0)
    scale_std: bool = opt(True, "GRPO: divide advantages by the group std.", group="GRPO")
    loss_agg: str = opt("sequence-mean", "GRPO: sequence-mean (per-sequence token mean, then mean over sequences: TRL loss_type=grpo, the reference) or token-mean.", group="GRPO", choices=AGGREGATIONS)
    old_logprobs: str = opt("policy", "GRPO: pi_old of the ratio: policy (the training model's log-probs before the first update on the table, as TRL computes them) or sampler (the rollout engine's sampling log-probs, which carry the engine/trainer mismatch).", group="GRPO", choices=("policy", "sampler"))  # new
    mask_truncated: bool = opt(False, "GRPO/OPSD: drop completions cut at the token limit from the loss.", group="GRPO")
    is_correction: str | None = opt(None, "GRPO: importance-sampling correction of the engine/trainer mismatch (weight from pi_old / the engine's sampling log-probs): none, token-truncate, token-mask, sequence-truncate, sequence-mask. Default as the reference (TRL 0.26): sequence-mask for rollouts sampled by vLLM, none otherwise; sgsd and opsd: none (their reference trainers use no sampling log-probs).", group="GRPO", choices=IS_MODES, key="if-set")
    is_cap: float | None = opt(None, "GRPO: cap C of --is-correction (truncate: min(r, C); mask: 0 above C). Default 3.0 (TRL 0.26).", group="GRPO", gt=0, key="if-set")
    log_entropy: bool = opt(True, "Log the entropy of the policy's full next-token distribution at the sampled tokens (train.parquet entropy, metrics.parquet entropy_mean; the entropy collapse alarm), computed from the loss pass's own logits chunks.", group="Logging", key=False)
    verify_timeout_s: float = opt(5.0, "GRPO: hard timeout per verifier call when the rollouts are not graded yet, seconds.", group="GRPO", flag="verify-timeout", gt=0)
    # engine
    token_budget: int = opt(16384, "Tokens per packed forward.", group="Engine", ge=1)
    logit_chunk: int = opt(2048, "Positions per [positions, vocab] log-softmax chunk.", group="Engine", ge=1)
    distributed: str = opt("auto", "Under torchrun: ddp or fsdp (FSDP2 fully_shard); auto = ddp.", group="Engine", choices=DISTRIBUTED, key=False)
    seed: int = opt(0, "Random seed (data order, dropout, LoRA init).", group="Objective", ge=0)
    # not part of the stage key (they do not change the result)
    device: str = shared_opt("device", group="Engine")
    save_every: int = opt(0, "Snapshot checkpoints/step_N every N optimizer steps (0: only the final checkpoint/).", group="Checkpoints", ge=0, key=False)
    keep_last: int = opt(2, "Snapshots kept (0 = all).", group="Checkpoints", ge=0, key=False)
    tensorboard: bool = opt(False, "Log every optimizer step's metrics row to RUN_DIR/tensorboard (needs the report extra).", group="Logging", key=False)
    wandb_project: str = opt("", "Log every optimizer step to this Weights & Biases project (needs the report extra).", group="Logging", key=False)
    agreement_rollouts: int | None = opt(None, "Engine/trainer agreement: rollouts of the table whose sampled tokens the trainer rescores (no grad, before any update) against the stored sampling log-probs; agree_* columns of train.parquet (default 16; 0 = off; stages/engine/agreement.py).", group="Logging", ge=0, key=False)
    agreement_threshold: float | None = opt(None, "Engine/trainer agreement: |delta logp| counted in agree_frac_over, nats (default 0.2).", group="Logging", gt=0, key=False)

    def resolved(self) -> "TrainConfig":
        cfg = replace(self)
        kind = objectives.get(cfg.objective)
        if not cfg.teacher_mode:
            cfg.teacher_mode = kind.default_teacher_mode
        if cfg.lora_dropout is None:
            cfg.lora_dropout = kind.default_lora_dropout
        # ranges and choices are checked by Checked on every construction; these relate fields to each other
        checks = [
            (bool(cfg.model), "a model is required (--model)"),
            (cfg.is_correction in (None, "none") or cfg.objective == "grpo",
             f"--is-correction {cfg.is_correction} is a GRPO option (the sgsd and opsd losses have no sampling ratio)"),
            (cfg.is_correction in (None, "none") or cfg.old_logprobs == "policy",
             "--is-correction needs --old-logprobs policy (with sampler, pi_old already is the engine's)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(None, msg)
        return cfg

    def key(self) -> dict:
        """The part of the config that determines the result (the stage manifest's key; opt(key=...))."""
        return stage_key(self)



class TrainingDiverged(InputError):
    """The loss or the grad norm of a step is NaN / inf: training stops before that update, nothing is saved."""

# --------------------------------------------------------------------------------------------------
# the policy as one module (so DDP / FSDP see every forward)


class Policy(torch.nn.Module):
    """Wraps an HF causal LM; ``forward(kind, segments, ...)`` runs the packed scoring core.

    kind ``logprobs``: fp32 log-probs of every segment's completion tokens, concatenated;
    ``hidden``: final hidden states at those positions; ``opsd``: clipped forward KL per token against
    ``teacher_hidden`` (through ``teacher_head``).
    """

    def __init__(self, model, token_budget: int, logit_chunk: int):
        super().__init__()
        self.model = model
        self.token_budget, self.logit_chunk = token_budget, logit_chunk

    def forward(self, kind: str, segments: list[Segment], temperature: float = 1.0, teacher_hidden=None,
                teacher_head=None, kl: dict | None = None, entropy: bool = False):
        """``entropy=True`` (kinds logprobs, opsd): also the token entropy at each completion position, from the
        same logits chunks (no grad; stages/engine/health.py): returns ``(values, entropy)``."""
        if kind == "logprobs":
            ents: list | None = [] if entropy else None
            lps = score_segments(self.model, segments, temperature=temperature, token_budget=self.token_budget,
                                 logit_chunk=self.logit_chunk, grad=torch.is_grad_enabled(), entropy_out=ents)
            return (torch.cat(lps), torch.cat(ents)) if ents is not None else torch.cat(lps)
        budget = None if self.token_budget >= sys.maxsize else self.token_budget
        hidden = completion_hidden(self.model, segments, token_budget=budget)
        if kind == "hidden":
            return hidden
        if kind == "opsd":
            head = split_lm(self.model)[1]
            ents = [] if entropy else None
            kl_t = chunked_clipped_forward_kl(hidden, teacher_hidden, head, teacher_head or head,
                                              temperature=temperature, entropy_out=ents, **(kl or {}))
            return (kl_t, ents[0]) if ents is not None else kl_t
        raise ValueError(kind)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _decoder_layers(model):
    inner = model.get_base_model() if _is_peft(model) else model
    body = split_lm(inner)[0]
    layers = getattr(body, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(inner).__name__} for FSDP")
    return layers


# --------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Model, optimizer, scheduler, teacher and objective; :meth:`fit` trains on one run directory.

    ``start``: a checkpoint folder to continue from (weights, optimizer, scheduler, policy step; when
    it belongs to the run directory given to :meth:`fit`, also the sampler position, metrics and RNG).
    ``loaded``: (model, tokenizer, spec) already in memory (the loop); otherwise the model is loaded from
    ``start`` or ``cfg.model``.
    """

    def __init__(self, cfg: TrainConfig, *, start: Path | None = None, dist: Dist | None = None, loaded=None,
                 log: Callable[[str], None] | None = None, inference_copy: bool = False):

        self.cfg = cfg = cfg.resolved()
        self.objective: Objective = objectives.get(cfg.objective)(cfg)
        self.dist = dist or Dist()
        self.log = log or (lambda s: None)
        self.device = pick_device(cfg.device)
        if self.dist.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.precision == "auto":
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            self.precision = "bf16-mixed" if bf16 else "fp32"
        else:
            self.precision = cfg.precision
        load_dtype = "bf16" if self.precision == "bf16" else "fp32"
        self.mode = "none" if self.dist.world == 1 else ("ddp" if cfg.distributed in ("auto", "ddp", "none") else "fsdp")

        self.start = Path(start) if start else None
        self.start_state = ckpt.validate(self.start) if self.start else None
        self.start_meta = json.loads((self.start / ckpt.META).read_text()) if self.start else None
        if loaded is not None:
            model, tok, spec = loaded
        elif self.start:
            model, tok, spec = load_model(str(self.start), device=self.device, dtype=load_dtype, trainable=True)
        else:
            model, tok, spec = load_model(cfg.model, cfg.gguf_file, device=self.device, dtype=load_dtype, trainable=True)
        if self.start_meta:
            self.base_spec = ModelSpec(**self.start_meta["base_model"])
            self.teacher_init = self.start_meta.get("teacher_init")
        else:
            self.base_spec = ModelSpec(spec.path, spec.gguf_file)
            self.teacher_init = cfg.teacher_model or (spec.adapter or spec.path)
        self.tok, self.spec = tok, spec
        self.bank_version = self.start_meta.get("bank_version") if self.start_meta else None
        self.policy_step = int(self.start_state["policy_step"]) if self.start_state else 0

        if cfg.lora and not _is_peft(model):
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(cfg.seed)
            target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                     target_modules=target, task_type="CAUSAL_LM"))
        self.lora = _is_peft(model)
        if not self.lora:
            for p in model.parameters():
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            inner = model.get_base_model() if self.lora else model
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner.config.use_cache = False
        model.to(self.device)
        self.model = model

        # teacher / reference copy: EMA, or fixed initial weights under full fine-tuning
        needs_copy = cfg.teacher_mode == "ema" or self.objective.needs_frozen_copy(self.lora)
        self.teacher_model = None
        if needs_copy:
            if cfg.teacher_mode != "ema" and self.start is not None and self.teacher_init:
                self.teacher_model = load_model(self.teacher_init, device=self.device, dtype=load_dtype)[0]
            else:
                self.teacher_model = copy.deepcopy(model)
            self.teacher_model.eval().requires_grad_(False)
            if cfg.teacher_mode == "ema" and self.start is not None and (self.start / "ema.pt").exists():
                ema = ckpt.load_state(self.start / "ema.pt", map_location=self.device)
                self.teacher_model.load_state_dict(ema, strict=False)

        budget = sys.maxsize if self.mode == "fsdp" else cfg.token_budget  # FSDP: one forward per call on every rank
        self.policy = Policy(model, budget, cfg.logit_chunk)
        self.teacher_policy = Policy(self.teacher_model, budget, cfg.logit_chunk) if self.teacher_model is not None else None
        # the loop's generation and scoring model: the policy itself, or under FSDP (whose forward is a collective
        # every rank must join) one full unsharded copy, refreshed from the shards by sync_inference()
        self._infer = (copy.deepcopy(model).eval().requires_grad_(False)
                       if inference_copy and self.mode == "fsdp" else None)
        self.wrapped = self._wrap()

        self.trainable_names = [n for n, p in self.policy.named_parameters() if p.requires_grad]
        self.opt, self.sched = training.adamw_and_schedule(
            (p for p in self.policy.parameters() if p.requires_grad), lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, warmup_steps=cfg.warmup_steps,
            schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio, horizon=cfg.schedule_steps or cfg.steps or 1)
        if self.start is not None:
            self._load_optimizer(self.start)
        self._start_consumed = False

    # ---- wrapping, contexts

    def _wrap(self):
        if self.mode == "none":
            return self.policy
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(self.policy, device_ids=ids)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.precision == "bf16-mixed" else MixedPrecisionPolicy()
        for pol in (self.policy, self.teacher_policy):
            if pol is None:
                continue
            for layer in _decoder_layers(pol.model):
                fully_shard(layer, mp_policy=mp)
            fully_shard(pol, mp_policy=mp)
        return self.policy

    def _amp(self):
        if self.precision == "bf16-mixed" and self.mode != "fsdp" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self, sync: bool):
        if self.mode == "ddp" and not sync:
            return self.wrapped.no_sync()
        if self.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _eval(self):
        was = self.policy.training
        self.policy.eval()
        try:
            yield
        finally:
            self.policy.train(was)

    # ---- forwards

    def student(self, kind: str, segs: list[Segment], temperature: float, **kw) -> torch.Tensor:
        """Forward with gradients through DDP / FSDP."""
        with self._amp():
            return self.wrapped(kind, segs, temperature, **kw)

    def frozen(self, kind: str, segs: list[Segment], temperature: float, role: str = "teacher") -> torch.Tensor:
        """No-grad forward of the teacher (live / fixed / EMA) or of the GRPO reference."""
        cfg = self.cfg
        mode = cfg.teacher_mode if role == "teacher" else "fixed"
        with torch.no_grad(), self._amp():
            if mode == "live":
                with self._eval():
                    return self.policy(kind, segs, temperature)
            if self.teacher_policy is not None:
                return self.teacher_policy(kind, segs, temperature)
            if self.lora:  # fixed: the base weights, adapter disabled
                with self._eval(), self.model.disable_adapter():
                    return self.policy(kind, segs, temperature)
            raise RuntimeError("no frozen teacher configured")

    def teacher_head(self):
        if self.cfg.teacher_mode != "live" and self.teacher_model is not None:
            return split_lm(self.teacher_model)[1]
        return None

    @torch.no_grad()
    def scoring_forward(self, segs: list[Segment], temperature: float) -> torch.Tensor:
        """No-grad, eval-mode log-probs of the policy itself (pi_old, the agreement check)."""
        with self._amp(), self._eval():
            return self.policy("logprobs", segs, temperature)

    # ---- one optimizer step

    def train_step(self, batch: list[int], local_step: int, epoch: int) -> dict:
        cfg, d = self.cfg, self.dist
        seed_all(cfg.seed, self.policy_step, d.rank)
        t0 = time.time()
        items = [self.data.items[i] for i in batch]
        norm = self.objective.normaliser(items)
        mine = items[d.rank :: d.world]
        n_micro = max(1, math.ceil(math.ceil(len(items) / d.world) / cfg.micro_batch_size))
        self.policy.train()
        sums: dict[str, float] = {}
        for j in range(n_micro):
            mb = mine[j * cfg.micro_batch_size : (j + 1) * cfg.micro_batch_size]
            weights = [1.0] * len(mb)
            if not mb:  # this rank ran out of rows: a zero-weight forward keeps the collectives in step
                mb, weights = [items[0]], [0.0]
            # attention per packed sequence in forward *and* backward (checkpointing re-runs it there)
            with self._sync(j == n_micro - 1), varlen_attention(self.model):
                loss, st = self.objective.loss(self, mb, weights, norm)
                (loss * d.world).backward()
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        gn = training.clip_grad_norm([p for p in self.policy.parameters() if p.requires_grad], cfg.max_grad_norm)
        keys = sorted(sums)
        sums = dict(zip(keys, d.all_sum([sums[k] for k in keys])))
        if not (math.isfinite(sums.get("loss", 0.0)) and math.isfinite(gn)):
            self.opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._run_dir, f"optimizer step {self.policy_step + 1} (step {local_step + 1} of this "
                                   f"run): loss {sums.get('loss')} / grad norm {gn} is not finite; stopped before the "
                                   "update, nothing saved, the previous checkpoint is kept")
        lr = training.optimizer_step(self.opt, self.sched)
        if cfg.teacher_mode == "ema" and self.teacher_model is not None:
            self._ema_update()
        self.policy_step += 1
        wall = time.time() - t0
        return self._row(sums, local_step, epoch, gn, lr, wall)

    @torch.no_grad()
    def _ema_update(self) -> None:
        t_params = dict(self.teacher_policy.named_parameters())
        for n, p in self.policy.named_parameters():
            if p.requires_grad:
                t_params[n].lerp_(p.detach().to(t_params[n].dtype), 1.0 - self.cfg.ema_decay)

    def _row(self, s: dict, local_step: int, epoch: int, gn: float, lr: float, wall: float) -> dict:
        n = max(1.0, s.get("rollouts", 0.0))
        row = {
            "policy_step": self.policy_step, "step": local_step + 1, "epoch": epoch, "objective": self.cfg.objective,
            "loss": s["loss"], "grad_norm": gn, "lr": lr, "rollouts": int(s.get("rollouts", 0)),
            "tokens": int(s.get("tokens", 0)), "completion_len": s.get("tokens", 0.0) / n,
            "accuracy": s.get("correct", 0.0) / n, "wall_s": wall, "tokens_per_s": s.get("tokens", 0.0) / max(wall, 1e-9),
        }
        if s.get("entropy_tokens", 0) > 0:  # the objectives' masked token-entropy sums (health.masked_sum_count)
            row["entropy"] = s["entropy_sum"] / s["entropy_tokens"]
        row.update(self.objective.metrics(s))
        row.update(getattr(self, "_agree", {}))  # the table's engine/trainer agreement (same on every row of it)
        return row

    @torch.no_grad()
    def _agreement(self) -> dict:
        """Engine/trainer agreement on the table's sampled tokens before any update on it (stages/engine/agreement.py):
        up to ``agreement_rollouts`` rollouts rescored in eval mode at their sampling temperature."""
        cfg = self.cfg
        limit = agreement.DEFAULT_ROLLOUTS if cfg.agreement_rollouts is None else cfg.agreement_rollouts
        if limit == 0:
            return {}
        thr = agreement.DEFAULT_THRESHOLD if cfg.agreement_threshold is None else cfg.agreement_threshold
        rt = read_table(self.data.inputs["rollout"])
        if "sample_logprobs" not in rt.columns:
            return agreement.summary(agreement.combine([]))
        temps = rt["temperature"].to_list() if "temperature" in rt.columns else [1.0] * rt.height
        got = dict(zip(rt["rollout_id"].to_list(), zip(rt["sample_logprobs"].to_list(), temps)))
        picked = []
        for it in self.data.items:
            lp, t = got.get(it.rid, (None, None))
            if lp is None or len(lp) != len(it.completion_ids) or not lp or not all(math.isfinite(x) for x in lp):
                continue
            picked.append((it, lp, float(t) if t is not None and t > 0 else 1.0))  # greedy rows: log-probs at T = 1
            if len(picked) == limit:
                break
        parts = []
        for T in sorted({t for _, _, t in picked}):
            grp = [(it, lp) for it, lp, t in picked if t == T]
            out = self.scoring_forward([it.segment for it, _ in grp], T)
            for (it, lp), p in zip(grp, torch.split(out, [len(it.completion_ids) for it, _ in grp])):
                parts.append(agreement.gap_sums(p.float(), torch.tensor(lp, dtype=torch.float64), thr))
        return agreement.summary(agreement.combine(parts))

    # ---- checkpoints

    def _load_optimizer(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = ckpt.load_state(path / "optimizer.pt", map_location="cpu")
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False) if self.mode == "fsdp" else StateDictOptions()
        set_optimizer_state_dict(self.wrapped, self.opt, osd, options=opts)
        self.sched.load_state_dict(ckpt.load_state(path / "scheduler.pt"))

    def save(self, path: Path, run_dir: Path, local_step: int, rows: list[dict], sampler: Sampler,
             commit: bool = True, progress: ProgressFn | None = None) -> Path:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict


        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(self.wrapped, self.opt, options=full)
        model_sd = get_model_state_dict(self.wrapped, options=full) if self.mode == "fsdp" else None
        ema = None
        if self.cfg.teacher_mode == "ema" and self.teacher_policy is not None:
            names = set(self.trainable_names)
            tsd = get_model_state_dict(self.teacher_policy, options=full) if self.mode == "fsdp" else self.teacher_policy.state_dict()
            ema = {k[len("model."):]: v.detach().cpu() for k, v in tsd.items() if k in names}
        cfg = self.cfg
        state = {
            "policy_step": self.policy_step, "local_step": local_step, "run_dir": str(Path(run_dir).resolve()),
            "sampler": sampler.state(local_step // self.objective.iterations),
            "world_size": self.dist.world, "config_key": cfg.key(), "config": asdict(cfg),
            "precision": self.precision, "distributed": self.mode,
        }
        meta = {
            "format": ckpt.FORMAT, "policy_step": self.policy_step, "objective": cfg.objective,
            "bank_version": self.bank_version, "base_model": self.base_spec.to_json(), "adapter": self.lora,
            "teacher_mode": cfg.teacher_mode, "teacher_init": self.teacher_init,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

        def fill(tmp: Path) -> None:
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank_{self.dist.rank:05d}.pt")
            if not self.dist.main:
                return
            # the checkpoint folder is itself a model folder (HF or LoRA adapter): --model CKPT loads it
            if model_sd is None:
                save_model(self.model, self.tok, tmp / "model", base_spec=self.base_spec)
            else:
                seen, tied = set(), set()
                for n, p in self.policy.named_parameters(remove_duplicate=False):
                    (tied.add(n) if id(p) in seen else seen.add(id(p)))
                sd = {k[len("model."):]: v for k, v in model_sd.items() if k not in tied}
                self.model.save_pretrained(tmp / "model", state_dict=sd, safe_serialization=True)
                self.tok.save_pretrained(tmp / "model")
                if self.lora:
                    (tmp / "model" / "sgsd_base.json").write_text(json.dumps(self.base_spec.to_json()))
            training.lift_model_dir(tmp)
            if cfg.save_merged and self.lora and model_sd is None:
                merged = copy.deepcopy(self.model).merge_and_unload()
                save_model(merged, self.tok, tmp / "merged")
                del merged
            if ema is not None:
                torch.save(ema, tmp / "ema.pt")
            training.write_checkpoint_files(tmp, optimizer_state=osd, scheduler_state=self.sched.state_dict(),
                                            rows=rows, state=state, meta=meta)

        return ckpt.write(path, fill, rank=self.dist.rank, barrier=self.dist.barrier, commit=commit,
                          progress=progress if self.dist.main else None)

    # ---- training on one run directory

    def fit(self, run_dir: str | Path, *, force: bool = False, progress: ProgressFn | None = None,
            policy: str | None = None) -> Path:
        """Train on one run directory.  ``policy``: the name of the weights this trainer holds now (the loop: the
        previous step's checkpoint), recorded as ``model`` in the stage key and the checkpoint's config."""
        if policy is not None and policy != self.cfg.model:
            self.cfg = replace(self.cfg, model=policy)
            self.objective.cfg = self.cfg
        cfg, d = self.cfg, self.dist
        run_dir = Path(run_dir)
        self._run_dir = run_dir
        self.data = self.objective.load(run_dir, self.tok)
        if not self.data.items:
            raise InputError(run_dir, "no rollouts to train on")
        self._check_tokens()
        if self.data.info.get("bank_version"):
            self.bank_version = self.data.info["bank_version"]
        stage = StageRun(run_dir, "train", cfg, inputs=self.data.inputs, force=force, seed=cfg.seed)
        if stage.done:
            return stage.output
        self.objective.prepare(self, run_dir)
        n = len(self.data.items)
        B = min(cfg.batch_size or n, n)
        if B < cfg.batch_size:
            self.log(f"batch size {cfg.batch_size} > {n} rollouts in the table: using {B}")
        sampler = Sampler(n, B, cfg.seed)
        iters = self.objective.iterations
        n_steps = cfg.steps or sampler.per_epoch * iters

        start_local, rows = 0, []
        st = self.start_state
        if st and not self._start_consumed and st.get("run_dir") == str(run_dir.resolve()):
            if st.get("config_key") != cfg.key():
                raise ckpt.CheckpointError(self.start, "the training config changed since this checkpoint was written; "
                                                       "pass --force to start over or --resume never")
            if st["sampler"]["rows"] != n or st["sampler"]["batch_size"] != B:
                raise ckpt.CheckpointError(self.start, f"checkpoint was written for {st['sampler']['rows']} rows / batch "
                                                       f"{st['sampler']['batch_size']}, the tables now give {n} / {B}")
            start_local = int(st["local_step"])
            rows = training.saved_rows(self.start)
            rng = self.start / "rng" / f"rank_{d.rank:05d}.pt"
            if rng.exists():
                set_rng_state(ckpt.load_state(rng))
            self.log(f"resuming from {self.start} at step {start_local}/{n_steps} (policy step {self.policy_step})")
        if start_local and rows and "agree_abs_mean" in rows[0]:  # measured before the first update on this table
            self._agree = {k: rows[0][k] for k in agreement.COLUMNS if k in rows[0]}
        else:
            self._agree = self._agreement()
        # --force: the previous checkpoints stay in place until the new final checkpoint and its table are
        # complete (then swapped in); snapshots of the previous run are dropped only after that
        previous = ckpt.candidates(run_dir) if force and d.main else []
        fresh: list[Path] = []
        self._start_consumed = True
        d.barrier()

        sinks = MetricSinks(cfg.tensorboard, cfg.wandb_project, run_dir, asdict(cfg), self.log) if d.main else None
        advance = progress("train", n_steps) if progress and d.main else None
        if advance and start_local:
            advance(start_local)
        for local in range(start_local, n_steps):
            b = local // iters
            rows.append(self.train_step(sampler.batch(b), local, b // sampler.per_epoch))
            if d.main:
                r = rows[-1]
                self.log(f"step {r['policy_step']}: loss {r['loss']:.6f} grad_norm {r['grad_norm']:.4f} lr {r['lr']:.3g}")
                sinks.write(r, r["policy_step"])
            if advance:
                advance(1)
            if cfg.save_every and (local + 1) % cfg.save_every == 0 and local + 1 < n_steps:
                fresh.append(self.save(ckpt.step_dir(run_dir, self.policy_step), run_dir, local + 1, rows, sampler,
                                       progress=progress))
                if d.main:
                    ckpt.prune(run_dir, cfg.keep_last, among=fresh if force else None)
        if sinks is not None:
            sinks.close()
        final = run_dir / ckpt.FINAL
        staged = None
        if not (self.start is not None and self.start.resolve() == final.resolve() and start_local == n_steps):
            staged = self.save(final, run_dir, n_steps, rows, sampler, commit=False, progress=progress)
        self.policy.eval()

        def swap_in() -> None:  # the new checkpoint and table are complete: swap, then drop the old snapshots
            if staged is not None:
                commit_dir(staged, final)
            keep = {p.resolve() for p in fresh}
            for p in previous:
                if p.parent.name == ckpt.INTERMEDIATE and p.resolve() not in keep:
                    import shutil

                    shutil.rmtree(p, ignore_errors=True)
        if d.main:
            extra = {
                "resolved_config": asdict(cfg), "checkpoint": str(final), "policy_step": self.policy_step,
                "bank_version": self.bank_version, "world_size": d.world, "distributed": self.mode,
                "precision": self.precision, "global_batch": B, "grad_accum": math.ceil(math.ceil(B / d.world) / cfg.micro_batch_size),
                "steps": n_steps, "data": self.data.info, "scoring_temperature": self.data.temperature,
                "teacher_mode": cfg.teacher_mode, "lora": self.lora, "agreement": self._agree,
            }
            stage.finish(pl.DataFrame(rows), extra=extra, before_commit=swap_in)
        d.barrier()
        return stage.output

    def _check_tokens(self) -> None:
        """Token ids outside the model's vocabulary, or no completion token at all: one line naming the table."""
        vocab = self.model.get_input_embeddings().num_embeddings
        src = self.data.inputs.get("rollout")
        seqs = []
        for it in self.data.items:
            seqs += [(it.rid, "prompt_ids", it.prompt_ids), (it.rid, "completion_ids", it.completion_ids)]
        check_token_ids(seqs, vocab, src)
        for it in self.data.items:
            for t in it.teachers:
                check_token_ids([(it.rid, "teacher_prompt_ids", t.prompt_ids)], vocab, self.data.inputs.get("score_teachers"))
            if it.teacher_prompt_ids:
                check_token_ids([(it.rid, "teacher prompt", it.teacher_prompt_ids)], vocab, src)
        if not any(it.completion_ids for it in self.data.items):
            raise InputError(src, "every completion is empty (0 tokens): nothing to train on")

    @property
    def inference_model(self):
        """The model the loop generates and scores with (each rank on its own share of the prompts)."""
        return self._infer if self._infer is not None else self.model

    @torch.no_grad()
    def sync_inference(self) -> None:
        """FSDP: copy the trained weights into the inference copy, gathering one parameter at a time (a full
        copy of one tensor at most on top of the shards and the inference copy).  Every rank calls it."""
        if self._infer is None:
            return
        dst = dict(self._infer.named_parameters())
        for n, p in self.model.named_parameters():
            dst[n].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)

def resolve_start(run_dir: Path, cfg: TrainConfig, resume: str = "auto", warn: Callable[[str], None] | None = None) -> Path | None:
    """Checkpoint to start from: one inside ``run_dir`` (resume) or ``cfg.model`` when it is a checkpoint."""
    found = ckpt.find_resume(run_dir, resume, warn)
    if found is not None:
        return found
    if cfg.model and ckpt.is_checkpoint(cfg.model):
        ckpt.validate(cfg.model)
        return Path(cfg.model)
    return None


def run(cfg: TrainConfig, run_dir: str | Path, *, resume: str = "auto", force: bool = False,
        progress: ProgressFn | None = None,
        log: Callable[[str], None] | None = None) -> Path:
    """Stage entry point (CLI, torchrun): returns ``<run_dir>/train.parquet``."""
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    dist = init_distributed(cfg.device)
    say = log if (log and dist.main) else (lambda s: None)
    # a finished stage with the same config and inputs is skipped before any model is loaded
    pre = StageRun(run_dir, "train", cfg, inputs=objectives.get(cfg.objective).input_paths(run_dir), force=force,
                   seed=cfg.seed)
    if pre.done:
        say(f"train: {pre.output} is up to date")
        return pre.output
    start = resolve_start(run_dir, cfg, "never" if force and resume in ckpt.RESUME_MODES else resume, warn=say)
    trainer = Trainer(cfg, start=start, dist=dist, log=say)
    try:
        return trainer.fit(run_dir, force=force, progress=progress)
    finally:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
