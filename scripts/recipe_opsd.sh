#!/usr/bin/env bash
# OPSD baseline on Qwen3-1.7B (configs/opsd_qwen3_1.7b.toml) as stage commands, one stage per line.
# Each step: problems -> rollout -> train (clipped forward KL to the initial model prompted with the gold
# answer), eval every EVAL_EVERY steps.  Rerunning continues.
#
#   scripts/recipe_opsd.sh [--dry-run] [RUN_DIR]      --dry-run prints the resolved commands, runs nothing
#
# Environment overrides: MODEL STEPS PROMPTS SEED PROBLEMS MAX_NEW_TOKENS LR EVAL_EVERY DEVICE BACKEND SGSD.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/opsd_qwen3_1.7b_sh"
source scripts/recipe_common.sh "$@"

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --n 1 --temperature 1.1 --top-p 0.95 --top-k 20 --max-new-tokens "$MAX_NEW_TOKENS" --no-thinking --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE"
  run $SGSD train --run-dir "$S" --objective opsd --model "$POLICY" --steps 1 --batch-size 0 --micro-batch-size 4 --lr "$LR" --max-grad-norm 0.1 --lora --lora-r 64 --lora-alpha 128 --lora-target all-linear --teacher-mode fixed --kl-clip 0.05 --kl-top-k 0 --scoring-temperature 1.0 --gradient-checkpointing --seed "$SEED" --device "$DEVICE"
  POLICY="$S/checkpoint"
  eval_if_due "$n" "$S" "$POLICY"
done
