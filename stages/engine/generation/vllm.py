"""vLLM generation backend (``make_backend("vllm")``): same contract as :class:`stages.engine.generation.hf.HFBackend`.

The sampling log-prob of a token is ``log_softmax(logits / T)`` at the sampled token *before* top-k/top-p
truncation (the number the transformers backend records).  vLLM (checked on 0.32) offers four
``logprobs_mode`` values and none of them is that number when truncation is on and T != 1:

* ``raw_logprobs`` / ``raw_logits``: the model's logits before temperature (T=1 log-probs);
* ``processed_logprobs``: ``log_softmax`` *after* temperature and top-k/top-p, i.e. renormalised over the
  kept tokens (too high by ``-log(kept mass)``);
* ``processed_logits``: the logits after temperature and top-k/top-p, unnormalised: ``l/T`` for kept tokens.

So the engine runs with ``processed_logits`` plus :class:`SamplingLogprobNormalizer`, a logits processor
that shifts every row by ``T * logsumexp(l / T)`` before vLLM divides by T.  A per-row shift changes
neither the sampling distribution nor top-k/top-p (both shift-invariant) nor greedy argmax, and the
value vLLM then returns for the sampled token is ``l/T - logsumexp(l/T) = log_softmax(l/T)``; greedy
rows (T=0) use T=1, the model's own log-prob, as the transformers backend does.

``update_weights(model)`` loads an HF model's weights (a PEFT LoRA model is merged on the fly, the
training model is left untouched) into the running engine with vLLM's worker ``reload_weights``: from
an in-memory iterator when the model runner lives in this process (the default: the engine core runs
in-process), else through a safetensors folder.  The prefix cache is reset afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from stages.engine.generation.base import Completion, GenerationBackend, SamplingConfig
from stages.engine.errors import InputError

try:  # the processor class must live at module level so vLLM can import it by name in a worker process
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality
except Exception:  # vllm not installed (main environment): the backend cannot be built anyway
    LogitsProcessor = object  # type: ignore[assignment,misc]
    MoveDirectionality = None  # type: ignore[assignment,misc]

_SAMPLING_EPS = 1e-5  # vLLM treats temperature below this as greedy
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
_DTYPES = {"auto": "auto", "fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "half": "float16"}


class SamplingLogprobNormalizer(LogitsProcessor):  # type: ignore[misc,valid-type]
    """Shift each row of logits by ``T * logsumexp(logits / T)`` (T of that row's request; 1 if greedy).

    Runs among vLLM's non-argmax-invariant processors (before penalties, temperature, top-k/top-p), so
    after vLLM's own division by T a row holds ``log_softmax(logits / T)`` and ``processed_logits``
    reports the sampled token's pre-truncation sampling log-prob.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.temps: dict[int, float] = {}
        self.t: torch.Tensor | None = None

    def is_argmax_invariant(self) -> bool:
        # A per-row shift never changes argmax, but declaring it non-invariant places it before
        # temperature scaling and makes vLLM apply it on the greedy path too.
        return False

    @staticmethod
    def _temp(params) -> float:
        t = float(params.temperature)
        return t if t >= _SAMPLING_EPS else 1.0

    def update_state(self, batch_update) -> None:
        if not batch_update:
            return
        for index, params, _, _ in batch_update.added:
            self.temps[index] = self._temp(params)
        for index in batch_update.removed:
            self.temps.pop(index, None)
        for a, b, direction in batch_update.moved:
            ta, tb = self.temps.pop(a, None), self.temps.pop(b, None)
            if ta is not None:
                self.temps[b] = ta
            if direction == MoveDirectionality.SWAP and tb is not None:
                self.temps[a] = tb
        size = batch_update.batch_size
        self.t = torch.tensor([self.temps.get(i, 1.0) for i in range(size)], dtype=torch.float32,
                              device=self.device).unsqueeze(1)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.t is None or logits.shape[0] == 0:
            return logits
        if logits.shape[0] != self.t.shape[0]:
            raise RuntimeError(f"SamplingLogprobNormalizer: {logits.shape[0]} logit rows for a batch of "
                               f"{self.t.shape[0]} requests (speculative decoding is not supported)")
        t = self.t.to(logits.dtype)
        lse = torch.logsumexp(logits / t, dim=-1, keepdim=True)
        shift = torch.where(torch.isfinite(lse), t * lse, torch.zeros_like(lse))
        return logits.sub_(shift)


def hf_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an HF causal LM in checkpoint naming; a PEFT LoRA model is merged on the fly.

    The model itself is not modified (no ``merge_and_unload``): each LoRA layer's delta is added to a
    copy of its base weight.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        inner = model.get_base_model()
        deltas: dict[str, torch.Tensor] = {}
        for name, mod in inner.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A") and not getattr(mod, "merged", False):
                active = [a for a in getattr(mod, "active_adapters", []) if a in mod.lora_A]
                if active:
                    with torch.no_grad():
                        deltas[name + ".weight"] = sum(mod.get_delta_weight(a) for a in active)
        for name, t in inner.state_dict().items():
            if ".lora_" in name or "lora_embedding" in name:
                continue
            clean = name.replace(".base_layer.", ".")
            if clean in deltas:
                t = t + deltas[clean].to(t.dtype)
            yield clean, t.detach()
        return
    for name, t in model.state_dict().items():
        yield name, t.detach()


class VLLMBackend(GenerationBackend):
    """Generation with ``vllm.LLM`` over the model folder of a :class:`stages.engine.models.ModelSpec`.

    Options (``make_backend("vllm", spec=..., tokenizer=..., **options)``): ``dtype`` (auto, fp32, bf16,
    fp16), ``gpu_memory_utilization`` (default 0.85, or 0.3 colocated under torchrun), ``tensor_parallel_size``, ``max_model_len``, ``enforce_eager``,
    ``seed``, ``kv_cache_gb`` (KV cache size; on CPU it defaults to ``$VLLM_CPU_KVCACHE_SPACE`` or 1 GiB),
    ``max_lora_rank`` (LoRA adapter specs), ``sleep_mode`` (enable :meth:`sleep` / :meth:`wake_up`), ``in_process`` (run vLLM's engine core in this process, the
    default; needed for in-memory ``update_weights``) and any other ``vllm.LLM`` keyword in ``llm_kwargs``.
    """

    name = "vllm"

    def __init__(
        self,
        spec,
        tokenizer=None,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        kv_cache_gb: float | None = None,
        max_lora_rank: int = 64,
        in_process: bool = True,
        sleep_mode: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        from stages.engine.models import ModelSpec, load_tokenizer

        if spec is None:
            raise InputError(None, "the vllm backend needs a model path")
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(str(spec))
        spec.check()
        if spec.gguf_file:
            raise InputError(Path(spec.path) / spec.gguf_file,
                             "the vllm backend does not load GGUF files (use --backend hf)")
        if str(dtype) not in _DTYPES:
            raise InputError(None, f"unknown dtype '{dtype}' (use auto, fp32, bf16 or fp16)")
        self.spec = spec
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)

        # Environment read by vLLM when the engine starts (setdefault: an explicit setting wins).
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        kw: dict[str, Any] = dict(
            model=spec.path,
            dtype=_DTYPES[str(dtype)],
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            logprobs_mode="processed_logits",
            logits_processors=[SamplingLogprobNormalizer],
        )
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if ranks > 1:
            # colocated under torchrun (TRL's colocate mode): vLLM joins the launcher's process group, one engine
            # per group of tensor_parallel_size ranks; per-request seeds make the group's samples identical
            kw["distributed_executor_backend"] = "external_launcher"
        if gpu_memory_utilization is None:  # under torchrun the trainer's shard, gradients and optimizer share the GPU
            gpu_memory_utilization = 0.3 if ranks > 1 else 0.85
        self.sleep_mode = bool(sleep_mode)
        self._asleep = 0
        if sleep_mode:
            kw["enable_sleep_mode"] = True
        if self.on_cpu:
            # Without these vLLM's CPU worker keeps a core for the front end (a 2-core machine keeps 1)
            # and sizes the KV cache as a fraction of all RAM, refusing to start when RAM is in use.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            if kv_cache_gb is None:
                kv_cache_gb = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
            if enforce_eager is None:
                enforce_eager = True  # CPU graph compilation costs minutes for little gain at small batch
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_gb is not None:
            kw["kv_cache_memory_bytes"] = int(float(kv_cache_gb) * (1 << 30))
        if max_model_len is not None:
            kw["max_model_len"] = int(max_model_len)
        if enforce_eager is not None:
            kw["enforce_eager"] = bool(enforce_eager)
        self.lora_request = None
        self._lora_ids = itertools.count(1)
        self._calls = itertools.count()
        self._lora_dir: Path | None = None
        if spec.adapter:
            r = json.loads((Path(spec.adapter) / "adapter_config.json").read_text()).get("r", 8)
            need = max(int(max_lora_rank), int(r))
            rank = next((x for x in _LORA_RANKS if x >= need), None)  # vLLM takes only these values
            if rank is None:
                raise InputError(spec.adapter, f"LoRA rank {need} is above vLLM's maximum {_LORA_RANKS[-1]}")
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=rank)
            self.lora_request = self._new_lora_request(spec.adapter)
        kw.update(llm_kwargs or {})
        try:
            self.llm = LLM(**kw)
        except (OSError, ValueError) as e:
            raise InputError(spec.path, f"vllm cannot load the model ({str(e).splitlines()[0][:300]})") from None
        self._weights_dir: Path | None = None

    # ------------------------------------------------------------------------------------------------
    def _new_lora_request(self, path: str):
        from vllm.lora.request import LoRARequest

        i = next(self._lora_ids)
        return LoRARequest(f"sgsd-{i}", i, str(path))

    def _params(self, cfg: SamplingConfig, n: int, seed: int):
        from vllm import SamplingParams

        greedy = cfg.greedy()
        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else float(cfg.temperature),
            top_p=1.0 if greedy else float(cfg.top_p),
            top_k=0 if greedy or not cfg.top_k or cfg.top_k < 0 else int(cfg.top_k),  # vLLM: 0 = off
            max_tokens=int(cfg.max_new_tokens),
            seed=None if greedy else int(seed),
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=[int(t) for t in cfg.stop_token_ids],
            detokenize=False,  # decoded below with the project's tokenizer, as the hf backend does
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One Completion per (prompt, sample), ordered by prompt then sample.

        Prompt ``i`` samples with seed ``cfg.seed + key_i * cfg.n`` (``key_i = cfg.prompt_key(i)``: the problem
        id's key in a rollout, else ``i``; vLLM gives its ``j``-th sample ``seed + j``), so every (prompt,
        sample) has its own stream whatever the batching, the shard or the number of ranks.  Greedy
        decoding with ``n > 1`` (refused by vLLM) sends the prompt ``n`` times.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        jobs: list[tuple[int, int]] = []  # (prompt index, first sample index) per vLLM request
        reqs, params = [], []
        per_req = 1 if cfg.greedy() else cfg.n
        for pi, p in enumerate(prompts):
            for first in range(0, cfg.n, per_req):
                jobs.append((pi, first))
                reqs.append(TokensPrompt(prompt_token_ids=[int(t) for t in p]))
                params.append(self._params(cfg, per_req, cfg.seed + cfg.prompt_key(pi) * cfg.n + first))
        engine = self.llm.llm_engine
        call = next(self._calls)
        where: dict[str, int] = {}
        results: dict[tuple[int, int], Completion] = {}
        pending: set[str] = set()
        try:
            for k, (req, sp) in enumerate(zip(reqs, params)):
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                rid = f"sgsd{call}-{k}"
                engine.add_request(rid, req, sp, lora_request=self.lora_request)
                where[rid] = k
                pending.add(rid)
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    rid = str(out.request_id)
                    if not out.finished or rid not in pending:
                        continue
                    pending.discard(rid)
                    pi, first = jobs[where[rid]]
                    for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                        results[(pi, first + j)] = self._completion(pi, first + j, c)
                    if on_done:
                        on_done(len(out.outputs))
        except BaseException:
            # leave no request of this call running in the engine (an error, or Ctrl-C in a progress bar)
            if pending:
                engine.abort_request(sorted(pending), internal=False)
            raise
        missing = [(pi, si) for pi in range(len(prompts)) for si in range(cfg.n) if (pi, si) not in results]
        if missing:
            raise RuntimeError(f"vllm returned no output for {len(missing)} samples, e.g. {missing[0]}")
        return [results[k] for k in sorted(results)]

    def _completion(self, pi: int, si: int, c) -> Completion:
        toks = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(toks):
            raise RuntimeError("vllm returned no log-prob for some sampled tokens")
        lps = [float(d[t].logprob) for t, d in zip(toks, c.logprobs)]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vllm finished a sample with reason {c.finish_reason!r}")
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        return Completion(pi, si, toks, lps, c.finish_reason, text)

    # ------------------------------------------------------------------------------------------------
    def _runner_in_process(self) -> bool:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        ex = getattr(getattr(core, "engine_core", None), "model_executor", None)
        return type(ex).__name__ == "UniProcExecutor"

    def update_weights(self, model) -> None:
        """Load the weights of ``model`` (HF causal LM, PEFT-wrapped or not) into the engine.

        With a LoRA adapter spec and a PEFT model, the adapter is saved and swapped in as a new vLLM
        LoRA request; otherwise the full (merged) weights replace the engine's in place.
        """
        if self.lora_request is not None and hasattr(model, "peft_config"):
            old = self._lora_dir
            self._lora_dir = Path(tempfile.mkdtemp(prefix="sgsd-vllm-lora-"))
            model.save_pretrained(self._lora_dir)
            prev = self.lora_request
            self.lora_request = self._new_lora_request(str(self._lora_dir))
            self.llm.llm_engine.remove_lora(prev.lora_int_id)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        elif self._runner_in_process():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model)})
        else:
            from safetensors.torch import save_file

            old = self._weights_dir
            self._weights_dir = Path(tempfile.mkdtemp(prefix="sgsd-vllm-weights-"))
            tensors = {n: t.to("cpu").contiguous().clone() for n, t in hf_weights(model)}
            save_file(tensors, str(self._weights_dir / "model.safetensors"), metadata={"format": "pt"})
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._weights_dir)})
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM sleep mode: level 1 frees the KV cache and offloads the weights to CPU, level 2 frees both."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=int(level))
            self._asleep = int(level)

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = 0

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None
        for d in (getattr(self, "_weights_dir", None), getattr(self, "_lora_dir", None)):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
