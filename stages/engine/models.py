"""Loading causal LMs (HF folder, hub id, GGUF, LoRA adapter folder) and building the tiny test model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from stages.engine.atomic import atomic_write_text, commit_dir, current_umask
from stages.engine.errors import InputError

# A Qwen3-style chat template: ChatML turns, thinking on by default, and `enable_thinking=False`
# pre-fills an empty think block exactly as Qwen3's template does.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def pick_device(device: str | None = None) -> torch.device:
    """``auto`` (cuda when available, else cpu) or a torch device string that this machine actually has."""
    if not device or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(None, f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device '{device}' asked for but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(None, f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(None, f"device '{device}' is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise InputError(None, f"device '{device}' is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise InputError(None, f"unknown dtype '{dtype}' (use auto, fp32, bf16 or fp16)") from None


@dataclass
class ModelSpec:
    """Where a model comes from: a folder or hub id, optionally a GGUF file inside it, optionally a LoRA adapter."""

    path: str
    gguf_file: str | None = None
    adapter: str | None = None

    @classmethod
    def parse(cls, path: str, gguf_file: str | None = None) -> "ModelSpec":
        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            return cls(str(p.parent), gguf_file=p.name)
        if p.is_dir() and (p / "adapter_config.json").exists():
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            meta = p / "sgsd_base.json"
            gguf = None
            if meta.exists():
                m = json.loads(meta.read_text())
                base, gguf = m.get("path", base), m.get("gguf_file")
            if not base:
                raise InputError(p, "LoRA adapter without base_model_name_or_path")
            return cls(base, gguf_file=gguf, adapter=str(p))
        return cls(str(path), gguf_file=gguf_file)

    def check(self) -> None:
        p = Path(self.path)
        looks_local = p.exists() or self.path.startswith((".", "/", "~")) or self.path.count("/") != 1
        if looks_local and not p.exists():
            raise InputError(self.path, "model path does not exist")
        if not looks_local:
            check_hub_id(self.path)
        if p.is_dir():
            if self.gguf_file and not (p / self.gguf_file).exists():
                raise InputError(p / self.gguf_file, "GGUF file does not exist")
            if not self.gguf_file and not (p / "config.json").exists():
                ggufs = sorted(x.name for x in p.glob("*.gguf"))
                if len(ggufs) == 1:
                    self.gguf_file = ggufs[0]
                else:
                    raise InputError(p, "not a model folder (no config.json; pass --gguf-file for GGUF)")

    def to_json(self) -> dict:
        return {"path": self.path, "gguf_file": self.gguf_file, "adapter": self.adapter}


class Resident(NamedTuple):
    """A model already in memory, handed to a stage instead of a path (the loop's ``loaded=`` argument): the model,
    its tokenizer and where it came from.  A tuple, so ``model, tok, spec = loaded`` works."""
    model: Any
    tokenizer: Any
    spec: ModelSpec


def check_hub_id(repo_id: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, on a hub id that cannot be loaded (instead of minutes of retries).

    In the local HF cache: fine (loads offline).  Else with ``HF_HUB_OFFLINE=1``: refused.  Else one metadata
    request: a missing repository or an unreachable hub is refused."""
    import huggingface_hub as hh
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    cached = hh.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise InputError(repo_id, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                                  "(download it first, or pass a model folder)")
    try:
        hh.model_info(repo_id, timeout=timeout_s)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise InputError(repo_id, f"no such model on the Hugging Face hub, or no access ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy error ...
        raise InputError(repo_id, f"the Hugging Face hub is unreachable ({type(e).__name__}) and the model is not "
                                  f"in the local cache; pass a model folder or set HF_HUB_OFFLINE=1 with a cached copy") from None


def _weights_file(spec: ModelSpec) -> str:
    p = Path(spec.path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    return str(files[0]) if len(files) == 1 else spec.path


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {}
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, **kw)
    except (OSError, ValueError) as e:
        raise InputError(spec.path, f"cannot load tokenizer ({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise InputError(spec.path, "tokenizer has no chat template")
    return tok


def load_model(
    path: str | ModelSpec,
    gguf_file: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    trainable: bool = False,
):
    """Load (model, tokenizer, spec).  Raises InputError with one line for an unusable path."""
    from transformers import AutoModelForCausalLM

    spec = path if isinstance(path, ModelSpec) else ModelSpec.parse(str(path), gguf_file)
    spec.check()
    dev = pick_device(device if isinstance(device, str) or device is None else str(device))
    dt = pick_dtype(dtype, dev)
    kw: dict[str, Any] = {"dtype": dt}
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kw)
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError on a corrupt / truncated file ...
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        where = _weights_file(spec) if type(e).__name__ == "SafetensorError" else spec.path
        raise InputError(where, f"cannot load model ({msg})") from None
    if spec.gguf_file:
        # GGUF weights are dequantized on load: drop the quantizer so the model trains and saves as usual.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            try:
                delattr(model.config, "quantization_config")
            except AttributeError:
                pass
        model.is_quantized = False if hasattr(model, "is_quantized") else None
    if spec.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, spec.adapter, is_trainable=trainable)
        except Exception as e:
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise InputError(spec.adapter, f"cannot load the LoRA adapter ({msg})") from None
    tok = load_tokenizer(spec)
    model.to(dev)
    if not trainable:
        model.eval()
    return model, tok, spec


def check_token_ids(seqs, vocab_size: int, path: str | os.PathLike | None) -> None:
    """``seqs``: (row id, column, token ids); an id < 0 or >= ``vocab_size`` -> InputError naming row and file."""
    for rid, col, ids in seqs:
        if not len(ids):
            continue
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(path, f"rollout '{rid}': {col} holds token id {bad}, outside the model's vocabulary "
                                   f"[0, {vocab_size})")


def check_problem_lengths(problems, tokenizer, model, max_new_tokens: int, path) -> None:
    """Refuse a problem whose prompt plus ``max_new_tokens`` cannot fit the model's context, before generating.
    Byte-level tokenizers give at most one token per byte, so only long texts are tokenized."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    room = limit - max(0, int(max_new_tokens or 0))
    for pid, text in zip(problems["id"].to_list(), problems["problem"].to_list()):
        text = text or ""
        if len(text.encode("utf-8")) <= room:
            continue
        n = len(text) if len(text) > 50 * limit else len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > room:
            raise InputError(path, f"problem '{pid}' has {n} {'characters' if len(text) > 50 * limit else 'tokens'}: "
                                   f"with {max_new_tokens} new tokens it does not fit the model's context of {limit}")


def save_model(model, tokenizer, out_dir: str | os.PathLike, base_spec: ModelSpec | None = None) -> Path:
    """Save an HF folder (safetensors) or a LoRA adapter folder, into a temp dir renamed into place."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700: the folder gets the mode mkdir would give
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if base_spec is not None and hasattr(model, "peft_config"):
            atomic_write_text(tmp / "sgsd_base.json", json.dumps(base_spec.to_json()))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------------
# the tiny random Qwen3-architecture model


def _tiny_corpus() -> list[str]:
    from stages.engine.paths import DATA_DIR

    texts = []
    demo = DATA_DIR / "demo" / "problems.jsonl"
    if demo.exists():
        for line in demo.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [row["problem"], str(row["answer"])]
    for name in ("student", "teacher", "opsd_teacher"):  # a fixed corpus: the tokenizer must not drift
        texts.append((DATA_DIR / "prompts" / f"{name}.txt").read_text(encoding="utf-8"))
    texts += [" ".join(str(i) for i in range(200)), "\\boxed{} \\frac{1}{2} \\sqrt{3} x^2 + y^2 = z^2 Answer:"]
    texts += ["Let me think step by step. First, we compute the sum. Therefore the answer is"] * 3
    return texts


def build_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on ``corpus`` (default: the fixed demo corpus).  With a small
    corpus and a large enough ``vocab_size`` every word becomes one token (word-level in effect)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus if corpus is not None else _tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    tok.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    return tok


def make_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0, hidden_size: int = 128, layers: int = 2,
                    vocab_size: int = 512, corpus: list[str] | None = None, heads: int = 4,
                    kv_heads: int = 2) -> Path:
    """Write a tiny random Qwen3-architecture model + locally trained tokenizer + Qwen3-style chat template.

    hidden 128 with 4 heads gives head_dim 32, the smallest that vLLM's CPU attention accepts.
    ``corpus``: texts to train the tokenizer on (the skill world passes its own, stages/engine/world.py)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_tiny_tokenizer(vocab_size, corpus)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    # larger-than-default init so sampled text is not uniform noise and log-probs vary between prompts
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    return save_model(model, tok, out_dir)
