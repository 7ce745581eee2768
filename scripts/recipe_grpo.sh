#!/usr/bin/env bash
# GRPO baseline on Qwen3-1.7B (configs/grpo_qwen3_1.7b.toml) as stage commands, one stage per line.
# Each step: problems -> rollout (G=8 per prompt, T=1.2) -> train (the verifier grades each rollout, reward 1/0;
# group-normalised advantages, PPO clip 0.2, no reference), eval every EVAL_EVERY steps.  Rerunning continues.
#
#   scripts/recipe_grpo.sh [--dry-run] [RUN_DIR]      --dry-run checks the recipe as `sgsd loop --dry-run` does, then prints the commands; runs nothing
#
# Every stage reads its table of configs/grpo_qwen3_1.7b.toml (--config); environment overrides: MODEL STEPS PROMPTS
# SEED PROBLEMS MAX_NEW_TOKENS LR EVAL_EVERY DEVICE BACKEND SGSD.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/grpo_qwen3_1.7b_sh"
CONFIG="configs/grpo_qwen3_1.7b.toml"
source scripts/recipe_common.sh "$@"
STEPS="${STEPS:-150}"; PROMPTS="${PROMPTS:-4}"; EVAL_EVERY="${EVAL_EVERY:-25}"   # the [loop] table's values
ITERS=2                                                                          # [train] num_iterations
check_recipe --steps "$STEPS" --prompts-per-step "$PROMPTS" --eval-every "$EVAL_EVERY"

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --config "$CONFIG" --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE" "${EXTRA_ROLLOUT[@]}"
  run $SGSD train --config "$CONFIG" --run-dir "$S" --objective grpo --model "$POLICY" --schedule-steps $((STEPS * ITERS)) --seed "$SEED" --device "$DEVICE" "${EXTRA_TRAIN[@]}"
  POLICY="$S/checkpoint"
  eval_if_due "$n" "$S" "$POLICY"
done
