#!/usr/bin/env bash
# SGSD on Qwen3-1.7B (configs/sgsd_qwen3_1.7b.toml) as stage commands, one stage per line, for users who
# prefer shell to `sgsd loop`.  Each step: problems -> rollout -> score-teachers -> polarize -> train, then
# eval every EVAL_EVERY steps and a skill-bank update every SKILLS_EVERY steps.  Every stage skips itself
# when its manifest matches, so rerunning the script after a crash continues where it stopped.
#
#   scripts/recipe_sgsd.sh [--dry-run] [RUN_DIR]      --dry-run prints the resolved commands, runs nothing
#
# Environment overrides (paper values by default): BACKEND MODEL STEPS PROMPTS SEED PROBLEMS BANK RETRIEVAL ENCODER K
# MAX_NEW_TOKENS LR EVAL_EVERY SKILLS_EVERY DEVICE SGSD (the sgsd command).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/sgsd_qwen3_1.7b_sh"
source scripts/recipe_common.sh "$@"
BANK="${BANK:-../shared/data/skill_banks/sgsd_qwen3_1.7b.json}"
RETRIEVAL="${RETRIEVAL:-embedding}"
ENCODER="${ENCODER:-Qwen/Qwen3-Embedding-0.6B}"
K="${K:-8}"
SKILLS_EVERY="${SKILLS_EVERY:-25}"

bank_now() {  # the run's latest bank version once updates started, else the initial bank
  local latest
  latest=$(ls "$RUN"/bank/v*.json 2>/dev/null | sort | tail -n 1 || true)
  echo "${latest:-$BANK}"
}

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --n 1 --temperature 1.1 --top-p 0.95 --top-k 20 --max-new-tokens "$MAX_NEW_TOKENS" --no-thinking --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE"
  run $SGSD score-teachers --run-dir "$S" --model "$POLICY" --bank "$(bank_now)" --retrieval "$RETRIEVAL" --encoder "$ENCODER" --k "$K" --scoring-temperature 1.0 --seed $((SEED + n)) --device "$DEVICE"
  run $SGSD polarize --run-dir "$S" --verify-timeout 5
  run $SGSD train --run-dir "$S" --objective sgsd --model "$POLICY" --steps 1 --batch-size 0 --micro-batch-size 4 --lr "$LR" --max-grad-norm 0.1 --lora --lora-r 64 --lora-alpha 128 --lora-target all-linear --teacher-mode live --gradient-checkpointing --seed "$SEED" --device "$DEVICE"
  POLICY="$S/checkpoint"  # model (or adapter) + optimizer state: the next train continues it, rollout loads it
  eval_if_due "$n" "$S" "$POLICY"
  if [ "$SKILLS_EVERY" -gt 0 ] && [ $((n % SKILLS_EVERY)) -eq 0 ]; then
    run $SGSD update-skills --run-dir "$RUN" --bank "$(bank_now)" --last-steps "$SKILLS_EVERY" --threshold 0.8 --max-new 5 --capacity 30 --model "$POLICY" --device "$DEVICE"
  fi
done
