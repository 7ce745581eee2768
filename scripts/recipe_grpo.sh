#!/usr/bin/env bash
# GRPO baseline on Qwen3-1.7B (configs/grpo_qwen3_1.7b.toml) as stage commands, one stage per line.
# Each step: problems -> rollout (G=8 per prompt, T=1.2) -> train (the verifier grades each rollout, reward 1/0;
# group-normalised advantages, PPO clip 0.2, no reference), eval every EVAL_EVERY steps.  Rerunning continues.
#
#   scripts/recipe_grpo.sh [--dry-run] [RUN_DIR]      --dry-run prints the resolved commands, runs nothing
#
# Environment overrides: MODEL STEPS PROMPTS G SEED PROBLEMS MAX_NEW_TOKENS LR KL_BETA EVAL_EVERY DEVICE BACKEND SGSD.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/grpo_qwen3_1.7b_sh"
source scripts/recipe_common.sh "$@"
G="${G:-8}"
KL_BETA="${KL_BETA:-0.0}"

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --n "$G" --temperature 1.2 --top-p 0.95 --top-k 20 --max-new-tokens "$MAX_NEW_TOKENS" --no-thinking --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE"
  run $SGSD train --run-dir "$S" --objective grpo --model "$POLICY" --steps 0 --batch-size 0 --micro-batch-size 8 --num-iterations 1 --lr "$LR" --max-grad-norm 0.1 --clip-eps 0.2 --kl-beta "$KL_BETA" --scale-std --loss-agg token-mean --lora --lora-r 64 --lora-alpha 128 --lora-target all-linear --gradient-checkpointing --seed "$SEED" --device "$DEVICE"
  POLICY="$S/checkpoint"
  eval_if_due "$n" "$S" "$POLICY"
done
