"""Token-entropy overhead of the trainer's loss pass (issue 23 item 5).

The trainer logs the entropy of the policy's full next-token distribution at every completion token (train.parquet
``entropy``, metrics.parquet ``entropy_mean``).  It is computed inside the scoring core's LM-head chunks
(``stages.engine.scoring.score_segments(..., entropy_out=...)``: the chunk's fp32 log-softmax is already there, the
entropy adds ``exp`` and a weighted sum over ``[chunk, vocab]`` without gradient), so there is no second LM-head pass
and no ``[tokens, vocab]`` fp32 tensor for the batch.  This script times one training micro-batch (packed forward
with gradients, chunked log-probs, backward: what ``Trainer.train_step`` does per micro-batch) with and without the
entropy, alternating the two in the same process, and prints the median wall time of each and their ratio.

    python bench/entropy_overhead.py                       # CPU: hidden 256, 4 layers, Qwen3's 151,936-token vocabulary
    python bench/entropy_overhead.py --device cuda --shape qwen3-1.7b

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from score_bench import SHAPES, build_model  # noqa: E402

from stages.engine.scoring import Segment, score_segments, varlen_attention  # noqa: E402

SHAPES = {**SHAPES, "small-qwen-vocab": dict(SHAPES["small"], vocab_size=151936)}


def one_pass(model, segs, entropy: bool, chunk: int) -> tuple[float, float | None]:
    """Seconds of one forward + backward over ``segs`` and the mean entropy (when computed)."""
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    ents: list | None = [] if entropy else None
    with varlen_attention(model):
        lps = score_segments(model, segs, token_budget=1 << 30, logit_chunk=chunk, grad=True, entropy_out=ents)
        torch.cat(lps).sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return dt, (float(torch.cat(ents).mean()) if ents else None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="small-qwen-vocab", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=8, help="segments per micro-batch")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=2048, help="train.logit_chunk")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import score_bench

    score_bench.SHAPES.update(SHAPES)
    model = build_model(a.shape, a.device)
    model.train()
    rng = random.Random(0)
    V = SHAPES[a.shape]["vocab_size"]
    segs = [Segment.of([rng.randrange(1, V) for _ in range(a.prompt)], [rng.randrange(1, V) for _ in range(a.completion)])
            for _ in range(a.n)]
    one_pass(model, segs, False, a.chunk)  # warm-up
    one_pass(model, segs, True, a.chunk)
    off, on, ent = [], [], None
    for _ in range(a.reps):  # alternate, so drift in the machine's load hits both alike
        off.append(one_pass(model, segs, False, a.chunk)[0])
        dt, ent = one_pass(model, segs, True, a.chunk)
        on.append(dt)
    res = {"device": a.device, "shape": a.shape, "vocab": V, "tokens": a.n * (a.prompt + a.completion),
           "completion_tokens": a.n * a.completion, "logit_chunk": a.chunk, "reps": a.reps,
           "without_entropy_s": statistics.median(off), "with_entropy_s": statistics.median(on),
           "ratio": statistics.median(on) / statistics.median(off), "entropy_mean": ent,
           "log_vocab": float(torch.log(torch.tensor(float(V))))}
    print(f"loss pass without entropy {res['without_entropy_s']:.3f}s, with {res['with_entropy_s']:.3f}s "
          f"(median of {a.reps}): ratio {res['ratio']:.3f}; mean entropy {ent:.3f} nats (log V = {res['log_vocab']:.3f})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
