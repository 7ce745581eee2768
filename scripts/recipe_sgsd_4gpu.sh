#!/usr/bin/env bash
# The paper's SGSD run on 4 GPUs (reference scripts/run_sgsd.sh: 4 processes, vLLM colocated with 0.4 of each
# GPU, 16 prompts per step) as one torchrun line: every rank keeps a colocated engine, generates and scores 4 of
# the step's 16 prompts, and the 4 ranks train together on the global batch of 16 (DDP; distributed=fsdp shards
# the policy).  Same settings as configs/sgsd_qwen3_1.7b.toml, so the result does not depend on the GPU count.
#
#   scripts/recipe_sgsd_4gpu.sh [--dry-run] [RUN_DIR]      --dry-run checks the recipe as `sgsd loop --dry-run` does, then prints the torchrun line
#
# Environment: GPUS (4), TORCHRUN (torchrun), SGSD (the sgsd command); multi-node: run torchrun yourself with
# --nnodes/--node_rank/--rdzv-endpoint and the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/sgsd_qwen3_1.7b"
CONFIG="configs/sgsd_qwen3_1.7b.toml"
source scripts/recipe_common.sh "$@"
torchrun_loop "${GPUS:-4}" "$CONFIG"
