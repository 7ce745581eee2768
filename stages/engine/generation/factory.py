"""Backend choice: ``auto`` resolves to vLLM, hf-fast or hf; :func:`make_backend` builds one."""

from __future__ import annotations
from stages.engine.generation.base import GenerationBackend
from stages.engine.generation.hf import HFBackend




def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


BACKENDS = ("auto", "vllm", "hf-fast", "hf")


def resolve_backend(kind: str, spec=None, *, cuda: bool) -> str:
    """The concrete backend of ``kind``; auto: vLLM when importable and the model is not a GGUF file, else the
    slot-refilling static-cache engine (``hf-fast``) on CUDA, else the plain transformers loop (``hf``)."""
    from stages.engine.errors import InputError  # lazy: the GPU bench machine may lack the rest of the engine

    if kind not in BACKENDS:
        raise InputError(None, f"unknown backend '{kind}' (use {', '.join(BACKENDS)})")
    if kind != "auto":
        return kind
    if vllm_available() and spec is not None and not spec.gguf_file:
        return "vllm"
    return "hf-fast" if cuda else "hf"


def make_backend(kind: str, *, model=None, tokenizer=None, spec=None, **vllm_kwargs) -> GenerationBackend:
    """``kind``: auto | vllm | hf-fast | hf (see :func:`resolve_backend`)."""
    from stages.engine.errors import InputError

    on_cuda = model is not None and next(model.parameters()).device.type == "cuda"
    kind = resolve_backend(kind, spec, cuda=on_cuda)
    if kind == "vllm":
        if not vllm_available():
            raise InputError(None, "backend 'vllm' requested but vllm is not installed (pip install 'sgsd[vllm]')")
        from stages.engine.generation.vllm import VLLMBackend

        return VLLMBackend(spec, tokenizer=tokenizer, **vllm_kwargs)
    if model is None or tokenizer is None:
        raise ValueError(f"the {kind} backend needs a loaded model and tokenizer")
    if kind == "hf-fast":
        from stages.engine.generation.fast import FastHFBackend

        return FastHFBackend(model, tokenizer)
    return HFBackend(model, tokenizer)
