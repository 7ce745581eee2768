"""`sgsd loop` on 1 rank against N ranks (torchrun, gloo on CPU / nccl on CUDA) over the same global batch.

Both runs start through the same launcher (``torchrun --nproc_per_node R --no-python sgsd loop``) on the same
config, a random Qwen3 of the ``--shape`` (``small``: hidden 256, 4 layers; ``tiny``: the test model), the
lexical retriever and the demo bank.  For each run the script reads ``metrics.parquet`` and prints the wall time
per stage (mean over the steps after the first, which carries the start-up), the share of a step in generation
(rollout), scoring (score-teachers), polarize and training, and the ratio 1-rank / N-rank per stage.  It also
checks that both runs drew the same rollout tokens (sampling seeded per problem).

CPU threads: the 1-rank run gets ``--threads`` threads, each of the N ranks ``--threads // N`` (the same cores
in total); on a 2-core machine that is 2 against 2 x 1.

    python bench/loop_scaleout.py                      # 2 ranks vs 1 on CPU
    python bench/loop_scaleout.py --ranks 2 --steps 3 --prompts 8 --max-new-tokens 48

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = [("rollout", "wall_rollout_s", "generation"), ("score_teachers", "wall_score_teachers_s", "scoring"),
          ("polarize", "wall_polarize_s", "polarize"), ("train", "wall_train_s", "training")]

CONFIG = """
[loop]
run_dir = "{run_dir}"
objective = "sgsd"
model = "{model}"
problems = "{problems}"
bank = "{bank}"
steps = {steps}
prompts_per_step = {prompts}
device = "{device}"
backend = "{backend}"
keep_last = 1

[rollout]
n = 1
max_new_tokens = {max_new}
dtype = "fp32"

[score_teachers]
k = 4
dtype = "fp32"
retrieval = "lexical"

[polarize]
workers = 1

[train]
batch_size = 0
micro_batch_size = 1
lr = 1e-4
precision = "fp32"
distributed = "ddp"
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loop(work: Path, name: str, ranks: int, threads: int, args, model: Path) -> dict:
    from stages.engine.paths import DATA_DIR

    cfg = work / f"{name}.toml"
    cfg.write_text(CONFIG.format(run_dir=work / name, model=model, problems=DATA_DIR / "demo" / "problems.jsonl",
                                 bank=DATA_DIR / "demo" / "skill_bank.json", steps=args.steps, prompts=args.prompts,
                                 device=args.device, backend=args.backend, max_new=args.max_new_tokens))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--master_port", str(_port()), "--no-python", "sgsd", "-q", "loop", "--config", str(cfg)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name}: torchrun failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    m = pl.read_parquet(work / name / "metrics.parquet")
    later = m.filter(pl.col("step") > 1) if m.height > 1 else m
    per = {stage: float(later[col].mean()) for stage, col, _ in STAGES if col in later.columns}
    step = sum(per.values())
    return {"ranks": ranks, "threads_per_rank": threads, "command_wall_s": round(wall, 2),
            "stage_wall_s": {k: round(v, 3) for k, v in per.items()},
            "step_wall_s": round(step, 3),
            "share": {label: round(per[stage] / step, 3) for stage, _, label in STAGES if stage in per}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step = the global batch (rollouts)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--shape", choices=("tiny", "small"), default="small")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads of the 1-rank run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.prompts % args.ranks:
        sys.exit("--prompts must be a multiple of --ranks")
    from stages.engine.tableio import read_table, stage_table_path
    from stages.engine.models import make_tiny_model

    work = args.work or Path(tempfile.mkdtemp(prefix="sgsd-scaleout-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.exists():
        kw = {"hidden_size": 256, "layers": 4} if args.shape == "small" else {}
        make_tiny_model(model, **kw)
    one = run_loop(work, "one", 1, args.threads, args, model)
    many = run_loop(work, "many", args.ranks, max(1, args.threads // args.ranks), args, model)
    same = all(read_table(stage_table_path(work / "one" / f"step_{n:04d}", "rollout"))["completion_ids"].to_list()
               == read_table(stage_table_path(work / "many" / f"step_{n:04d}", "rollout"))["completion_ids"].to_list()
               for n in range(1, args.steps + 1))
    ratio = {k: round(one["stage_wall_s"][k] / many["stage_wall_s"][k], 2)
             for k in one["stage_wall_s"] if many["stage_wall_s"].get(k)}
    ratio["step"] = round(one["step_wall_s"] / many["step_wall_s"], 2)
    print(f"sgsd loop, {args.shape} random Qwen3, {args.prompts} prompts/step, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps (mean of steps 2..{args.steps}), device {args.device}")
    print(f"{'stage':<16}{'1 rank s':>10}{'share':>8}{f'{args.ranks} ranks s':>12}{'share':>8}{'1/N ratio':>11}")
    for stage, _, label in STAGES:
        if stage in one["stage_wall_s"]:
            print(f"{label:<16}{one['stage_wall_s'][stage]:>10.2f}{one['share'][label]:>8.1%}"
                  f"{many['stage_wall_s'][stage]:>12.2f}{many['share'][label]:>8.1%}{ratio.get(stage, float('nan')):>11.2f}")
    print(f"{'step':<16}{one['step_wall_s']:>10.2f}{'':>8}{many['step_wall_s']:>12.2f}{'':>8}{ratio['step']:>11.2f}")
    print(f"same rollout tokens in both runs: {same}")
    print(json.dumps({"one": one, "many": many, "ratio_one_over_many": ratio, "same_rollouts": same,
                      "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
