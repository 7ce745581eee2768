"""The skill writer: the LLM that turns attempts into skills / mistakes and merges them.  docs/DESIGN.md 1.1.

Two backends behind one interface, ``Writer.complete(prompts) -> list[str]`` (one raw reply per prompt,
``""`` for an empty reply):

* :class:`LocalWriter`: the same generation engine as rollouts (``stages.engine.generation.factory.make_backend``: vLLM
  or transformers), greedy, on chat-formatted prompts with thinking off (reference: the policy model).
* :class:`HTTPWriter`: any OpenAI-compatible ``/chat/completions`` endpoint (``--writer-url``), the API
  key read from an environment variable, a request timeout, retries with exponential backoff on
  timeouts, connection errors, 429 and 5xx.  A request that still fails is an :class:`InputError`
  naming the endpoint (one line, exit code 2).

:func:`parse_json_reply` reads the writer's JSON defensively (think blocks, code fences, prose around the
object, trailing commas); what cannot be read is reported with a status, never raised.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from stages.engine.config import Checked, opt
from stages.engine.errors import InputError


@dataclass
class WriterConfig(Checked):
    """Where the writer runs.  ``url`` set: an OpenAI-compatible endpoint; else a local model."""

    url: str | None = opt(None, "OpenAI-compatible endpoint of the writer (base URL like http://host:8000/v1, or its /chat/completions URL). Unset: a local writer model.", group="Writer")
    model: str | None = opt(None, "Writer model: the endpoint's model name, or a local model (HF folder, hub id, .gguf). Default: the policy --model (reference).", group="Writer")
    key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (none sent when unset).", group="Writer")
    timeout_s: float = opt(120.0, "Seconds per writer request before it is retried.", group="Writer", flag="timeout", gt=0)
    retries: int = opt(3, "Retries per request after a timeout, connection error, 429 or 5xx (exponential backoff).", group="Writer", ge=0)
    backoff_s: float = opt(1.0, "Initial backoff between retries, seconds (doubles each retry).", group="Writer", flag="backoff", ge=0)
    concurrency: int = opt(8, "Parallel requests to the endpoint.", group="Writer", ge=1)
    max_new_tokens: int | None = opt(None, "Maximum tokens of one writer reply (default as the reference: 4096 when mining, 2048 for online updates).", group="Writer", ge=1)
    temperature: float = opt(0.0, "Writer sampling temperature (0 = greedy, the reference).", group="Writer", ge=0, cli=False)
    extra_body: dict = opt(help="JSON object merged into each request body, e.g. '{\"chat_template_kwargs\": {\"enable_thinking\": false}}'.", group="Writer", flag="extra", metavar="JSON", factory=dict)
    # local model
    backend: str = opt("auto", "Local writer engine: auto (vLLM if installed), vllm, hf.", group="Writer", choices=("auto", "vllm", "hf-fast", "hf"))
    gguf_file: str | None = opt(None, "GGUF file name inside the local writer's model folder.", group="Writer")
    batch_size: int = opt(8, "Local writer: prompts decoded together.", group="Writer", ge=1)
    device: str = opt("auto", "Local writer device (default: the stage's --device).", group="Writer", cli=False)
    dtype: str = opt("auto", "Local writer dtype (default: the stage's --dtype).", group="Writer", cli=False)

    def describe(self) -> dict:
        """What identifies the writer's output (the manifests' config; no secrets, no URL: a restarted
        endpoint serving the same model on another port still resumes)."""
        if self.url:
            return {"kind": "http", "model": self.model, "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature, "extra_body": self.extra_body}
        return {"kind": "local", "model": self.model, "gguf_file": self.gguf_file,
                "max_new_tokens": self.max_new_tokens, "temperature": 0.0}


class Writer:
    name: str = "?"

    def complete(self, prompts: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this writer's output (recorded in manifests)."""
        return {"kind": self.name}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint


def chat_completions_url(url: str) -> str:
    u = url.rstrip("/")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


class _NoCrossOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but a redirect to another scheme, host or port never carries the
    ``Authorization`` header (the API key) along."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            a, b = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
            if (a.scheme, a.hostname, a.port) != (b.scheme, b.hostname, b.port):
                for h in [k for k in new.headers if k.lower() == "authorization"]:
                    del new.headers[h]
                for h in [k for k in new.unredirected_hdrs if k.lower() == "authorization"]:
                    del new.unredirected_hdrs[h]
        return new


_OPENER = urllib.request.build_opener(_NoCrossOriginAuth)


class HTTPWriter(Writer):
    name = "http"

    def __init__(self, cfg: WriterConfig):
        if not cfg.url:
            raise ValueError("HTTPWriter needs a url")
        self.cfg = cfg
        self.url = chat_completions_url(cfg.url)
        self.key = os.environ.get(cfg.key_env) if cfg.key_env else None

    def describe(self) -> dict:
        return self.cfg.describe()

    def _request(self, prompt: str) -> str:
        cfg = self.cfg
        body = {"model": cfg.model or "default", "messages": [{"role": "user", "content": prompt}],
                "temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens, **cfg.extra_body}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        attempts = max(1, cfg.retries + 1)
        for attempt in range(attempts):
            wait = cfg.backoff_s * (2 ** attempt)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with _OPENER.open(req, timeout=cfg.timeout_s) as resp:
                    raw = resp.read()
                return self._content(raw)
            except urllib.error.HTTPError as e:
                detail = _short(e.read().decode("utf-8", "replace")) if e.fp else ""
                if e.code != 429 and e.code < 500:
                    raise InputError(self.url, f"writer endpoint answered HTTP {e.code} {e.reason}: {detail}") from None
                last = f"HTTP {e.code} {e.reason}"
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra and ra.isdigit():
                    wait = min(float(ra), 60.0)
            except (TimeoutError, socket.timeout):
                last = f"timed out after {cfg.timeout_s:g} s"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {cfg.timeout_s:g} s"
                else:
                    last = f"unreachable ({_short(str(e.reason))})"
            except (ConnectionError, OSError) as e:
                last = f"connection failed ({_short(str(e) or type(e).__name__)})"
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise InputError(self.url, f"writer endpoint {last} ({attempts} attempt{'s' if attempts > 1 else ''})")

    def _content(self, raw: bytes) -> str:
        try:
            obj = json.loads(raw)
            content = obj["choices"][0]["message"].get("content")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise InputError(self.url, f"writer endpoint did not answer with a chat completion: {_short(raw.decode('utf-8', 'replace'))}") from None
        return content if isinstance(content, str) else ""

    def complete(self, prompts, on_done=None):
        if not prompts:
            return []
        out: list[str | None] = [None] * len(prompts)
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.concurrency, len(prompts)))) as pool:
            futs = {pool.submit(self._request, p): i for i, p in enumerate(prompts)}
            try:
                for fut in _as_completed(futs):
                    out[futs[fut]] = fut.result()
                    if on_done:
                        on_done(1)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        return [o or "" for o in out]


def _as_completed(futs):
    from concurrent.futures import as_completed

    return as_completed(futs)


def _short(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# local model through the generation engine


class LocalWriter(Writer):
    name = "local"

    def __init__(self, backend, tokenizer, max_new_tokens: int = 1024, batch_size: int = 8, model_name: str | None = None):
        self.backend, self.tokenizer = backend, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.model_name = model_name

    def describe(self) -> dict:
        return {"kind": "local", "model": self.model_name, "max_new_tokens": self.max_new_tokens, "temperature": 0.0}

    def complete(self, prompts, on_done=None):
        from stages.engine.generation.base import SamplingConfig
        from stages.engine.prompts import chat_prompt_ids

        if not prompts:
            return []
        ids = [chat_prompt_ids(self.tokenizer, p, thinking=False) for p in prompts]
        cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        comps = self.backend.generate(ids, cfg, on_done=on_done)
        return [c.text for c in comps]


def make_writer(cfg: WriterConfig, loaded=None, backend=None) -> Writer:
    """An HTTP writer when ``cfg.url`` is set, else a local writer on ``loaded`` = (model, tokenizer, spec)
    or on ``cfg.model`` loaded here.  ``backend``: an existing generation backend of ``loaded`` to reuse
    (the loop's resident vLLM engine: no second engine on the same GPU)."""
    if cfg.url:
        return HTTPWriter(cfg)
    from stages.engine.generation.factory import make_backend

    if backend is not None and loaded is not None:
        model, tok, spec = loaded
        name = (spec.adapter or spec.path) + (f"/{spec.gguf_file}" if spec.gguf_file else "") if spec is not None else cfg.model
        return LocalWriter(backend, tok, cfg.max_new_tokens, cfg.batch_size, model_name=name)
    if loaded is None:
        if not cfg.model:
            raise InputError(None, "no writer: pass --writer-url for an endpoint or --writer-model for a local model")
        from stages.engine.models import load_model

        loaded = load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype)
    model, tok, spec = loaded
    backend = make_backend(cfg.backend, model=model, tokenizer=tok, spec=spec)
    name = (spec.adapter or spec.path) + (f"/{spec.gguf_file}" if spec.gguf_file else "") if spec is not None else cfg.model
    return LocalWriter(backend, tok, cfg.max_new_tokens, cfg.batch_size, model_name=name)


# --------------------------------------------------------------------------------------------------
# defensive JSON parsing

_THINK_RX = re.compile(r"<think>.*?</think>", re.S)
_FENCE_RX = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA_RX = re.compile(r",\s*([}\]])")


def _decode_candidates(text: str):
    """(object, start, end) for every JSON object/array that decodes at some '{' or '[' of ``text``."""
    dec = json.JSONDecoder()
    i = 0
    while i < len(text):
        j = min([p for p in (text.find("{", i), text.find("[", i)) if p != -1], default=-1)
        if j == -1:
            return
        try:
            obj, end = dec.raw_decode(text, j)
            yield obj, j, end
        except json.JSONDecodeError:
            fixed = _TRAILING_COMMA_RX.sub(r"\1", text[j:])
            try:
                obj, end = dec.raw_decode(fixed)
                yield obj, j, j + end  # span approximate after the repair
            except json.JSONDecodeError:
                pass
        i = j + 1


def parse_json_reply(text: str | None, key: str, fields: Sequence[str]) -> tuple[list[dict], str]:
    """Items under ``key`` in a writer reply -> (items, status).

    status: ``ok`` (at least one item), ``empty`` (blank reply), ``unparsable`` (no JSON found),
    ``no_items`` (JSON without usable items).  Items are dicts with every one of ``fields`` present as a
    non-empty string (whitespace compacted); anything else in an item is dropped.  When the enclosing
    object is broken (a reply cut off at the token limit), the complete item objects inside it are kept.
    """
    if text is None or not text.strip():
        return [], "empty"
    body = _THINK_RX.sub("", text)
    if "</think>" in body:  # unterminated / prefilled think block
        body = body.rsplit("</think>", 1)[1]
    sources = [m.group(1) for m in _FENCE_RX.finditer(body)] + [body]
    found_json = False
    for src in sources:
        loose: list[dict] = []
        covered = -1
        for obj, start, end in _decode_candidates(src):
            found_json = True
            if isinstance(obj, list) or (isinstance(obj, dict) and key in obj):
                items = _items_of(obj, key, fields)
                if items:
                    return items, "ok"
            elif isinstance(obj, dict) and start >= covered:
                one = _items_of(obj, key, fields)
                if one:
                    loose += one
                    covered = end
        if loose:
            return loose, "ok"
    return [], "no_items" if found_json else "unparsable"


def _items_of(obj: Any, key: str, fields: Sequence[str]) -> list[dict]:
    if isinstance(obj, dict) and key in obj:
        raw = obj[key]
    elif isinstance(obj, dict) and all(f in obj for f in fields):
        raw = [obj]
    elif isinstance(obj, list):
        raw = obj
    else:
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    out = []
    for it in raw:
        if not isinstance(it, dict):
            continue
        vals = {f: " ".join(str(it.get(f) or "").split()) if isinstance(it.get(f), (str, int, float)) else "" for f in fields}
        if all(vals.values()):
            out.append(vals)
    return out
