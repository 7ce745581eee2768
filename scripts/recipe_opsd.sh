#!/usr/bin/env bash
# OPSD baseline on Qwen3-1.7B (configs/opsd_qwen3_1.7b.toml) as stage commands, one stage per line.
# Each step: problems -> rollout -> train (clipped forward KL to the initial model prompted with the gold
# answer), eval every EVAL_EVERY steps.  Rerunning continues.
#
#   scripts/recipe_opsd.sh [--dry-run] [RUN_DIR]      --dry-run checks the recipe as `sgsd loop --dry-run` does, then prints the commands; runs nothing
#
# Every stage reads its table of configs/opsd_qwen3_1.7b.toml (--config); environment overrides: MODEL STEPS PROMPTS
# SEED PROBLEMS MAX_NEW_TOKENS LR EVAL_EVERY DEVICE BACKEND SGSD.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/opsd_qwen3_1.7b_sh"
CONFIG="configs/opsd_qwen3_1.7b.toml"
source scripts/recipe_common.sh "$@"
STEPS="${STEPS:-300}"; PROMPTS="${PROMPTS:-32}"; EVAL_EVERY="${EVAL_EVERY:-50}"   # the [loop] table's values
check_recipe --steps "$STEPS" --prompts-per-step "$PROMPTS" --eval-every "$EVAL_EVERY"

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --config "$CONFIG" --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE" "${EXTRA_ROLLOUT[@]}"
  run $SGSD train --config "$CONFIG" --run-dir "$S" --objective opsd --model "$POLICY" --schedule-steps "$STEPS" --seed "$SEED" --device "$DEVICE" "${EXTRA_TRAIN[@]}"
  POLICY="$S/checkpoint"
  eval_if_due "$n" "$S" "$POLICY"
done
