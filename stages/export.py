"""`sgsd export CHECKPOINT OUT`: a training checkpoint as a plain Hugging Face model folder.  docs/DESIGN.md 2.

CHECKPOINT is a checkpoint folder of `sgsd train` / `sgsd sft` (full model or LoRA adapter), a run directory
(its newest checkpoint), or a model / LoRA adapter folder.  OUT gets::

    config.json, model*.safetensors   the weights, a LoRA adapter merged into its base (peft merge_and_unload)
    tokenizer files + chat template   the checkpoint's tokenizer
    generation_config.json            the base model's, with eos / pad ids filled from the tokenizer
    sgsd_export.json                  the source, its checksum, policy step, objective, base, dtype, the merge
                                      check's figures and the library versions

so `--model OUT` works everywhere (transformers, vLLM, `sgsd eval`, `sgsd rollout`) with no peft and no sgsd files.

Checks, each refusing with one line (exit 2) and writing nothing: a checkpoint's checksums (``validate``); only
safetensors weights are read (a pickle weight file is refused: loading it could run code; the optimizer / RNG
``.pt`` files of a checkpoint are never opened); every JSON and safetensors header is parsed before loading;
non-finite weights.  The merge is checked twice: in memory, the merged model's log-probs on a probe text must
equal the adapter model's (fp32, |delta| <= ``MERGE_ATOL``); on disk, every LoRA-wrapped weight written to OUT must
carry the adapter's change (a random projection per weight: ``|W_out r - (W_base r + dW r)|``, summed in quadrature
over the LoRA weights, at most ``LOST_SHARE`` of ``|dW r|``; with ``--dtype fp32`` each weight on its own): a "merge"
that writes the base back, or a change lost to the rounding of a low-precision ``--dtype``, is refused.  Written into a temporary folder beside OUT and renamed into place; a non-empty OUT is replaced only
with ``--force``, and only once the new folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stages.engine import checkpoint as ckpt
from stages.engine.atomic import atomic_write_json, commit_dir, current_umask, file_hash
from stages.engine.config import Checked, check, opt, stage_key
from stages.engine.errors import InputError, as_write_error
from stages.engine.manifest import ProgressFn, versions

MANIFEST = "sgsd_export.json"
FORMAT = "sgsd-export/1"
MERGE_ATOL = 1e-3   # max |logp(adapter model) - logp(merged model)| on the probe, both fp32 in memory
LOST_SHARE = 0.5    # the written weights must carry at least half of the adapter's change (projection norm)
WARN_SHARE = 0.2    # above this share of the change lost to rounding: a warning line naming --dtype fp32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# files of a training checkpoint that are not weights (never opened by the export)
_STATE_FILES = {"optimizer.pt", "scheduler.pt", "ema.pt"}
PROBE_TEXT = ("Let me think step by step. First, we compute the sum: 2 + 3 = 5. Therefore the answer is "
              "\\boxed{5}. Compute $x^2 + y^2 = z^2$ for \\frac{1}{2} and \\sqrt{3}. 0 1 2 3 4 5 6 7 8 9 10 11 12")


@dataclass
class ExportConfig(Checked):
    dtype: str = opt("auto", "Weights dtype of the exported folder: auto (the dtype in the checkpoint's config.json, "
                             "its base model's for a LoRA checkpoint; fp32 if none), fp32, bf16, fp16.  The merge is "
                             "done in fp32 and cast once.", group="Export", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = opt("cpu", "torch device for the merge: cpu (needs the model's fp32 size in RAM), cuda, cuda:N, auto.",
                      group="Export", key=False)
    max_shard_gb: float = opt(5.0, "Largest safetensors file of the export, in GB (bigger models are sharded with an "
                                   "index, as on the hub).", group="Export", gt=0, le=1000)
    probe_tokens: int = opt(64, "Tokens of the probe text on which the merged model's log-probs must equal the adapter "
                                "model's (0 skips this check; the on-disk weight check always runs).", group="Export",
                            ge=0, le=4096)

    def key(self) -> dict:
        """The settings recorded in ``sgsd_export.json`` (runtime-only fields, ``opt(key=False)``, left out)."""
        return stage_key(self)


# --------------------------------------------------------------------------------------------------
# reading a hostile folder


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(path, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "not a JSON object")
    return obj


def _check_weights(folder: Path) -> list[Path]:
    """The safetensors weight files of a model / adapter folder, each header parsed; pickle weights refused."""
    from safetensors import safe_open

    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and p.suffix in PICKLE_SUFFIXES and p.name not in _STATE_FILES)
    if not files:
        if pickles:
            raise InputError(folder / pickles[0], "pickle weights are refused (loading a pickle can run code): "
                                                  "export reads safetensors only; convert the weights first")
        raise InputError(folder, "holds no safetensors weights (model*.safetensors or adapter_model.safetensors)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
        except Exception as e:  # SafetensorError, OSError ... on a truncated or forged header
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            raise InputError(f, f"not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None
        if not keys:
            raise InputError(f, "safetensors file holds no tensors")
    return files


@dataclass
class Source:
    folder: Path           # the model / adapter folder that is loaded
    kind: str              # checkpoint | model folder | adapter folder
    meta: dict             # sgsd_checkpoint.json of a checkpoint, else {}
    checksum: str          # sha256 of checksums.json (a checkpoint) or of the weight and config files
    adapter: bool
    base: str | None       # the base model of an adapter
    config_dtype: str | None  # fp32 / bf16 / fp16 from the (base) config.json, if stated


def _config_dtype(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    c = _read_json(cfg)
    v = c.get("dtype", c.get("torch_dtype"))
    return _CONFIG_DTYPES.get(v) if isinstance(v, str) else None


def find_source(path: str | os.PathLike) -> Source:
    """Resolve and check CHECKPOINT (see the module doc).  Raises InputError with one line."""
    from stages.engine.models import ModelSpec

    p = Path(path)
    if not p.exists():
        raise InputError(p, "checkpoint folder not found")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise InputError(p, "a pickle file is refused (loading it could run code): give a checkpoint or model folder")
        raise InputError(p, "not a checkpoint folder (give the folder, not one of its files)")
    if not ckpt.is_checkpoint(p) and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        found = ckpt.candidates(p)
        if not found:
            raise InputError(p, "not a checkpoint, run directory or model folder (no sgsd_checkpoint.json, "
                                "config.json or adapter_config.json)")
        p = found[0]  # the newest (the manifest and the command's last line name it)
    meta: dict = {}
    if ckpt.is_checkpoint(p):
        ckpt.validate(p)  # every file against checksums.json; a truncated or modified file is refused
        meta = _read_json(p / ckpt.META)
        checksum = file_hash(p / ckpt.CHECKSUMS)
        kind = "checkpoint"
    adapter = (p / "adapter_config.json").exists()
    if not adapter and not (p / "config.json").exists():
        raise InputError(p, "not a model folder (no config.json or adapter_config.json)")
    weights = _check_weights(p)
    base, config_dtype = None, _config_dtype(p) if not adapter else None
    if adapter:
        ac = _read_json(p / "adapter_config.json")
        if ac.get("use_dora"):
            raise InputError(p / "adapter_config.json", "DoRA adapters are not supported by export (its merge check "
                                                        "assumes plain LoRA, as `sgsd train --lora` writes)")
        if (p / "sgsd_base.json").exists():
            _read_json(p / "sgsd_base.json")
        spec = ModelSpec.parse(str(p))
        spec.check()
        base = spec.path
        bp = Path(spec.path)
        if bp.is_dir() and not spec.gguf_file:
            _check_weights(bp)
            config_dtype = _config_dtype(bp)
    if not meta:
        kind = "adapter folder" if adapter else "model folder"
        h = hashlib.sha256()
        for f in sorted(weights + [x for x in (p / "config.json", p / "adapter_config.json") if x.exists()]):
            h.update(f.name.encode())
            h.update(file_hash(f).encode())
        checksum = h.hexdigest()
    return Source(p, kind, meta, checksum, adapter, base, config_dtype)


# --------------------------------------------------------------------------------------------------
# the merge and its checks


def probe_ids(tok, n: int, vocab_size: int, where: Path) -> list[int]:
    ids = list(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InputError(where, "the tokenizer encodes the probe text as no tokens")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise InputError(where, f"the tokenizer does not match the model: token id {max(ids)} is outside its "
                                f"vocabulary of {vocab_size}")
    return (ids * (n // len(ids) + 1))[:n]


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, fp32 (an independent, plain forward: no sgsd scoring code)."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    logits = model(input_ids=x).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1).cpu()


def _project(w: torch.Tensor, r: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``w @ r`` in float64, a block of rows at a time (no float64 copy of a whole large matrix)."""
    w2 = w.reshape(w.shape[0], -1)
    return torch.cat([w2[i:i + rows].detach().to("cpu", torch.float64) @ r for i in range(0, w2.shape[0], rows)])


def lora_projections(model, seed: int = 0) -> list[dict]:
    """For every LoRA-wrapped weight of a peft model: its parameter object, the probe vector r, W_base r and
    dW r (dW from peft's own ``get_delta_weight``, one module at a time)."""
    found = []
    for name, mod in model.named_modules():
        if not (hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and getattr(mod, "active_adapters", None)):
            continue
        w = mod.base_layer.weight
        g = torch.Generator().manual_seed(seed + len(found))
        r = torch.randn(w[0].numel(), generator=g, dtype=torch.float64)
        d = torch.zeros(w.shape[0], dtype=torch.float64)
        for a in mod.active_adapters:
            if a in getattr(mod, "lora_A", {}) or a in getattr(mod, "lora_embedding_A", {}):
                dw = mod.get_delta_weight(a)
                if dw.shape != w.shape:
                    raise InputError(None, f"LoRA module {name}: delta shape {tuple(dw.shape)} differs from the "
                                           f"weight's {tuple(w.shape)}; cannot check the merge")
                d += _project(dw, r)
                del dw
        found.append({"name": name, "param": w, "r": r, "base": _project(w, r), "delta": d})
    return found


def check_written(projections: list[dict], names: dict[int, str], folder: Path, dtype_name: str) -> dict:
    """Every LoRA-wrapped weight as written in ``folder`` carries the adapter's change.  Returns the figures."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                where[k] = f
    sig2 = err2 = 0.0
    checked = zero = 0
    worst: tuple[float, str] = (0.0, "")
    for pr in projections:
        key = names.get(id(pr["param"]))
        if key is None or key not in where:
            raise InputError(folder, f"the merged weight of LoRA module {pr['name']} is missing from the export")
        sig = float(pr["delta"].norm())
        if sig == 0.0:
            zero += 1
            continue
        with safe_open(str(where[key]), framework="pt") as sf:
            s = _project(sf.get_tensor(key), pr["r"])
        if not bool(torch.isfinite(s).all()):
            raise InputError(where[key], f"'{key}' holds non-finite values after the merge")
        err = float((s - pr["base"] - pr["delta"]).norm())
        checked += 1
        sig2, err2 = sig2 + sig * sig, err2 + err * err
        worst = max(worst, (err / sig, key))
        # in fp32 nothing excuses a lost change (one well above fp32 resolution): the weight is wrong
        if dtype_name == "fp32" and err > LOST_SHARE * sig and sig > 1e-5 * float(pr["base"].norm()):
            raise InputError(folder, f"'{key}' as written is not base + adapter (|error| / |change| = {err / sig:.3g}"
                                     + (", it equals the base weight" if float((s - pr["base"]).norm()) == 0.0 else "")
                                     + "); nothing exported")
    lost = math.sqrt(err2 / sig2) if sig2 > 0 else 0.0
    if lost > LOST_SHARE:
        why = "they equal the base weights" if lost > 0.999 else f"{dtype_name} rounding"
        raise InputError(folder, f"the merged weights as written lose {lost:.0%} of the adapter's change ({why}; worst "
                                 f"{worst[1]}); nothing exported" + ("; export with --dtype fp32" if dtype_name != "fp32" else ""))
    return {"lora_weights": len(projections), "checked": checked, "zero_change": zero, "lost_share": lost,
            "worst_lost_share": worst[0], "worst_weight": worst[1]}


# --------------------------------------------------------------------------------------------------


def _check_out(out: Path, src: Path, force: bool) -> None:
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise InputError(out, f"the output folder overlaps the checkpoint {src}; choose another folder")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "exists and is not empty; pass --force to replace it")


def _finite(model, where: Path) -> None:
    for n, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise InputError(where, f"weight '{n}' holds non-finite values (nan or inf); nothing exported")


def run(cfg: ExportConfig, checkpoint: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
        log: Callable[[str], None] | None = None,
        progress: ProgressFn | None = None) -> dict:
    """Export CHECKPOINT to OUT (see the module doc).  Returns the manifest written to ``OUT/sgsd_export.json``."""
    from stages.engine.models import ModelSpec, load_model, load_tokenizer

    say = log or (lambda s: None)
    check(cfg)
    out = Path(out)
    src = find_source(checkpoint)
    _check_out(out, src.folder, force)
    advance = progress("export", 5) if progress else (lambda n: None)
    dtype_name = cfg.dtype if cfg.dtype != "auto" else (src.config_dtype or "fp32")
    target = DTYPES[dtype_name]

    with warnings.catch_warnings():  # peft 0.21 on transformers 5 calls a deprecated property on every adapter load
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model, _, spec = load_model(str(src.folder), device=cfg.device, dtype="fp32")
    # the checkpoint's own tokenizer (saved beside the adapter), else the base's
    tok_dir = src.folder if (src.folder / "tokenizer_config.json").exists() else Path(spec.path)
    tok = load_tokenizer(ModelSpec(str(tok_dir)) if tok_dir == src.folder else spec)
    advance(1)

    merge: dict = {"adapter": src.adapter}
    names: dict[int, str] = {}
    projections: list[dict] = []
    if src.adapter:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = probe_ids(tok, cfg.probe_tokens, vocab, src.folder) if cfg.probe_tokens >= 2 else []
        ref = token_logprobs(model, ids) if ids else None
        projections = lora_projections(model)
        if not projections:
            raise InputError(src.folder, "LoRA adapter wraps no weight of the model; nothing to merge")
        if all(float(pr["delta"].norm()) == 0.0 for pr in projections):
            say("export: the adapter's change is zero everywhere (lora_B = 0, e.g. before the first step): the export "
                "equals the base model")
        model = model.merge_and_unload()
        if hasattr(model, "peft_config"):
            raise InputError(src.folder, "merge_and_unload left a peft model; nothing exported")
        _finite(model, src.folder)
        names = {id(p): n for n, p in model.named_parameters()}
        if ref is not None:
            got = token_logprobs(model, ids)
            gap = float((got - ref).abs().max())
            merge["probe_tokens"], merge["probe_max_abs_dlogp"] = len(ids), gap
            if not math.isfinite(gap) or gap > MERGE_ATOL:
                raise InputError(src.folder, f"the merged model does not reproduce the adapter model: max |delta logp| "
                                             f"= {gap:.3g} on the probe (> {MERGE_ATOL}); nothing exported")
        ac = _read_json(src.folder / "adapter_config.json")
        merge["lora"] = {k: ac.get(k) for k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")}
    else:
        _finite(model, src.folder)
    advance(1)

    model = model.to(target)
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=f"{int(cfg.max_shard_gb * 1000)}MB")
        tok.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists():
            gen.save_pretrained(tmp)
        advance(1)
        if projections:
            merge.update(check_written(projections, names, tmp, dtype_name))
            if merge["lost_share"] > WARN_SHARE:
                say(f"export: warning: {merge['lost_share']:.0%} of the adapter's change is lost to {dtype_name} "
                    f"rounding (worst {merge['worst_weight']}); --dtype fp32 keeps all of it")
        advance(1)
        manifest = {
            "format": FORMAT, "source": str(src.folder.resolve()), "source_kind": src.kind,
            "source_sha256": src.checksum, "policy_step": src.meta.get("policy_step"),
            "objective": src.meta.get("objective"), "bank_version": src.meta.get("bank_version"),
            "base_model": src.base, "dtype": dtype_name, "merge": merge, "config": cfg.key(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists() and not force and any(out.iterdir()):  # appeared meanwhile
            raise InputError(out, "exists and is not empty; pass --force to replace it")
        commit_dir(tmp, out)
    except BaseException as e:  # a full disk shows up as OSError, SafetensorError or torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        err = as_write_error(e, tmp) if isinstance(e, Exception) and not isinstance(e, InputError) else None
        if err is not None:
            raise err from None
        raise
    advance(1)
    return manifest
