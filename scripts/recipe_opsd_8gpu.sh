#!/usr/bin/env bash
# The paper's OPSD run on 8 GPUs as one torchrun line: 32 prompts per step, 4 per rank, each rank with a
# colocated engine (0.6 of its GPU, as the reference's run_opsd.sh), the 8 ranks training together on the
# global batch of 32.  Same settings as configs/opsd_qwen3_1.7b.toml (whose reference run used 4 GPUs x 2
# accumulation steps: the same global batch, so the same result).
#
#   scripts/recipe_opsd_8gpu.sh [--dry-run] [RUN_DIR]      --dry-run checks the recipe as `sgsd loop --dry-run` does, then prints the torchrun line
#
# Environment: GPUS (8), TORCHRUN (torchrun), SGSD (the sgsd command).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/opsd_qwen3_1.7b"
CONFIG="configs/opsd_qwen3_1.7b.toml"
source scripts/recipe_common.sh "$@"
torchrun_loop "${GPUS:-8}" "$CONFIG"
