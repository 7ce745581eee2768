"""Scoring-core benchmark (issue 2): tokens/s and peak memory of ``stages.engine.scoring.score_segments``
(packed, chunked LM head) against ``stages.engine.scoring.score_naive`` (right-padded batch, full fp32 logits)
on the same variable-length batch of (prompt, completion) segments of a random Qwen3 model.  A third way,
``ours_varlen``, is ``stages.engine.scoring.score_segments_varlen``: the same packing with attention run
per packed sequence instead of over the packed row with a block-diagonal mask.

    python bench/score_bench.py                                   # CPU, hidden-256 random Qwen3
    python bench/score_bench.py --device cuda --shape qwen3-1.7b  # GPU, Qwen3-1.7B shape, bf16

Throughput counts the real tokens (prompt + completion of every segment, no padding) for both ways.
MFU (GPU only) = useful FLOPs / time / peak bf16 dense FLOP/s, useful FLOPs = 2 * P * tokens (P: every
matmul weight, LM head included, embedding lookup excluded) + causal attention 2 * 2 * layers *
heads * head_dim * n(n+1)/2 per sequence of n tokens; padding and discarded logits are not counted.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the call.  On CPU torch
has no allocator statistics, so each way runs once in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_``
fixed at 64 KiB so every tensor larger than that is its own mmap and is returned to the OS on free) while
a thread samples the process RSS (``/proc/self/statm``) every 0.2 ms; the figure is the highest RSS
seen minus the RSS just before the call.  Tensors living shorter than the sampling period can be missed,
so the CPU figure is a lower bound.

The last line printed is one JSON object with both ways' figures and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stages.engine.scoring import Segment, score_naive, score_segments  # noqa: E402  (no polars on this path)

SHAPES = {
    # tiny tokenizer's vocabulary (stages.engine.models.make_tiny_model: 512), hidden 256: big enough to time on CPU
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    # the test model's shape (stages.engine.models.make_tiny_model)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}


# --------------------------------------------------------------------------------------------------
# model, workload, FLOPs


def build_model(shape: str, device: str, dtype: torch.dtype | None = None, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM of ``shape`` built directly on ``device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def matmul_params(model) -> int:
    """Weights that take part in matmuls: every Linear (LM head included, counted once even when tied)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def forward_flops(model, lengths) -> float:
    c = model.config
    attn = sum(2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * n * (n + 1) / 2 for n in lengths)
    return 2.0 * matmul_params(model) * sum(lengths) + attn


def make_segments(n: int, vocab: int, prompt: tuple[int, int], completion: tuple[int, int], seed: int) -> list[Segment]:
    rng = random.Random(seed)
    segs = []
    for _ in range(n):
        p, c = rng.randint(*prompt), rng.randint(*completion)
        segs.append(Segment.of([rng.randrange(1, vocab) for _ in range(p)], [rng.randrange(1, vocab) for _ in range(c)]))
    return segs


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if torch.device(device).type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v, name
    return None, name


# --------------------------------------------------------------------------------------------------
# timing and memory


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_peak(fn) -> int:
    """Highest RSS above the starting RSS while ``fn`` runs (sampling thread, see the module docstring)."""
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            r = _rss()
            if r > peak[0]:
                peak[0] = r
            time.sleep(0.0002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(fn, device: str) -> int:
    return cuda_peak(fn) if torch.device(device).type == "cuda" else cpu_peak(fn)


def cpu_peak_subprocess(method: str, args: argparse.Namespace) -> int:
    """Peak of one way measured in a fresh process (clean allocator, nothing retained from the other way)."""
    cmd = [sys.executable, __file__, "--_peak-only", method] + _forward_args(args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def _forward_args(a: argparse.Namespace) -> list[str]:
    return ["--device", a.device, "--shape", a.shape, "--dtype", a.dtype, "--n", str(a.n), "--prompt", *map(str, a.prompt),
            "--completion", *map(str, a.completion), "--seed", str(a.seed), "--token-budget", str(a.token_budget),
            "--logit-chunk", str(a.logit_chunk), "--threads", str(a.threads)]


def write_block(path: Path, key: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- key -->`` markers in ``path``."""
    start, end = f"<!-- {key} start -->", f"<!-- {key} end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        a, b = old.index(start), old.index(end) + len(end)
        new = old[:a] + block + old[b:]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------


def run_methods(model, segs, device: str, repeats: int, token_budget: int, logit_chunk: int, methods=None):
    """{name: callable} of the two ways on ``segs``."""
    m = {
        "naive": lambda: score_naive(model, segs),
        "ours": lambda: score_segments(model, segs, token_budget=token_budget, logit_chunk=logit_chunk),
    }
    try:  # the same packing with per-sequence attention (stages.engine.scoring.score_segments_varlen)
        from stages.engine.scoring import score_segments_varlen

        m["ours_varlen"] = lambda: score_segments_varlen(model, segs, token_budget=token_budget, logit_chunk=logit_chunk)
    except ImportError:
        pass
    return {k: v for k, v in m.items() if methods is None or k in methods}


def compare(model, segs, device: str, *, repeats: int, token_budget: int, logit_chunk: int, peak: float | None,
            cpu_peaks: dict[str, int] | None = None) -> dict:
    """Both ways on the same segments: time, tokens/s, MFU, peak memory, agreement, ratios."""
    tokens = sum(len(s) for s in segs)
    flops = forward_flops(model, [len(s) for s in segs])
    res: dict = {"segments": len(segs), "tokens": tokens, "completion_tokens": sum(len(s.completion_ids) for s in segs),
                 "padded_tokens_naive": len(segs) * max(len(s) for s in segs)}
    outs = {}
    for name, fn in run_methods(model, segs, device, repeats, token_budget, logit_chunk).items():
        fn()  # warm-up (kernels, allocator, first-call caches) before the peak and the timing
        sync(device)
        pk = cpu_peaks[name] if cpu_peaks is not None else peak_bytes(fn, device)
        ts = time_call(fn, device, repeats, warmup=0)
        outs[name] = fn()
        t = statistics.median(ts)
        res[name] = {"seconds": t, "tokens_per_s": tokens / t, "peak_bytes": pk, "peak_gib": pk / 2**30,
                     "mfu": (flops / t / (peak * 1e12)) if peak else None}
    for name in outs:
        if name == "naive":
            continue
        r = res[name]
        r["max_abs_logprob_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs["naive"], outs[name]))
        r["speedup"] = res["naive"]["seconds"] / r["seconds"]
        r["memory_ratio_naive_over_this"] = res["naive"]["peak_bytes"] / max(1, r["peak_bytes"])
    res["max_abs_logprob_diff"] = res["ours"]["max_abs_logprob_diff"]
    res["speedup"] = res["ours"]["speedup"]
    res["memory_ratio_naive_over_ours"] = res["ours"]["memory_ratio_naive_over_this"]
    return res


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: small on CPU, qwen3-1.7b on CUDA")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--n", type=int, default=None, help="segments (default 12 on CPU, 16 on CUDA)")
    ap.add_argument("--prompt", type=int, nargs=2, default=None, help="prompt length range (CPU 50 300, CUDA 100 600)")
    ap.add_argument("--completion", type=int, nargs=2, default=None, help="completion range (CPU 100 512, CUDA 200 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--logit-chunk", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: OpenMP threads stall on a busy shared machine; 0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by card name)")
    ap.add_argument("--results", default=None, help="also write a markdown block into this file (e.g. bench/RESULTS.md)")
    ap.add_argument("--_peak-only", dest="peak_only", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    a.shape = a.shape or ("qwen3-1.7b" if cuda else "small")
    a.n = a.n or (16 if cuda else 12)
    a.prompt = a.prompt or ([100, 600] if cuda else [50, 300])
    a.completion = a.completion or ([200, 1024] if cuda else [100, 512])
    if a.threads is None:
        a.threads = 0 if cuda else 1
    return a


def setup(a: argparse.Namespace):
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = build_model(a.shape, a.device, dtype, seed=a.seed)
    segs = make_segments(a.n, model.config.vocab_size, tuple(a.prompt), tuple(a.completion), a.seed)
    return model, segs


def main(argv=None) -> dict:
    a = parse(argv)
    model, segs = setup(a)
    if a.peak_only:
        fn = run_methods(model, segs, a.device, 1, a.token_budget, a.logit_chunk, methods=[a.peak_only])[a.peak_only]
        print(json.dumps({"peak_bytes": peak_bytes(fn, a.device)}))
        return {}
    cuda = torch.device(a.device).type == "cuda"
    peak, card = peak_tflops(a.device, a.peak_tflops)
    ways = list(run_methods(model, segs, a.device, 1, a.token_budget, a.logit_chunk))
    cpu_peaks = None if cuda else {m: cpu_peak_subprocess(m, a) for m in ways}
    res = compare(model, segs, a.device, repeats=a.repeats, token_budget=a.token_budget, logit_chunk=a.logit_chunk,
                  peak=peak, cpu_peaks=cpu_peaks)
    res.update(device=a.device, card=card, shape=a.shape, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
               prompt_range=a.prompt, completion_range=a.completion, token_budget=a.token_budget,
               logit_chunk=a.logit_chunk, threads=torch.get_num_threads(), torch=torch.__version__,
               peak_memory_method="torch.cuda.max_memory_allocated" if cuda else "RSS sampling in a fresh subprocess",
               peak_tflops=peak)
    import transformers

    res["transformers"] = transformers.__version__
    for name in ways:
        r = res[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        vs = (f"  {r['speedup']:.2f}x speed, naive/this memory {r['memory_ratio_naive_over_this']:.2f}x, "
              f"max |dlogp| vs naive {r['max_abs_logprob_diff']:.1e}") if name != "naive" else ""
        print(f"{name:12s} {r['tokens_per_s']:10,.0f} tok/s {r['seconds']:8.3f} s  peak {r['peak_gib']:7.3f} GiB  MFU {mfu}{vs}", flush=True)
    if a.results:
        write_block(Path(a.results), f"score-bench-{a.device}-{a.shape}", markdown(res, argv if argv is not None else sys.argv[1:]))
    print(json.dumps(res))
    return res


def markdown(res: dict, argv: list[str]) -> str:
    cpu = res["device"] == "cpu"
    head = (f"## score_bench on CPU, shape `{res['shape']}` (CPU figures, NOT GPU figures)" if cpu
            else f"## score_bench on {res['card']}, shape `{res['shape']}`")
    lines = [head, "", f"{time.strftime('%Y-%m-%dT%H:%M:%S')} · torch {res['torch']} · transformers {res['transformers']} · "
             f"{res['dtype']} · {res['segments']} segments, {res['tokens']} tokens (prompts {res['prompt_range']}, "
             f"completions {res['completion_range']}) · threads {res['threads']} · peak memory: {res['peak_memory_method']}", "",
             "| way | tokens/s | MFU | peak GiB | time | vs naive |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("naive", "ours", "ours_varlen"):
        if name not in res:
            continue
        r = res[name]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        vs = (f"{r['speedup']:.2f}x speed, {r['memory_ratio_naive_over_this']:.2f}x less memory" if name != "naive" else "baseline")
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.3f} | {r['seconds']:.3f} s | {vs} |")
    lines += ["", f"`python bench/score_bench.py {' '.join(argv)}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
