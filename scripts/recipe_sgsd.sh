#!/usr/bin/env bash
# SGSD on Qwen3-1.7B (configs/sgsd_qwen3_1.7b.toml) as stage commands, one stage per line, for users who
# prefer shell to `sgsd loop`.  Each step: problems -> rollout -> score-teachers -> polarize -> train, then
# eval every EVAL_EVERY steps and a skill-bank update every SKILLS_EVERY steps.  Every stage skips itself
# when its manifest matches, so rerunning the script after a crash continues where it stopped.
#
#   scripts/recipe_sgsd.sh [--dry-run] [RUN_DIR]      --dry-run checks the recipe as `sgsd loop --dry-run` does, then prints the commands; runs nothing
#
# Every stage reads its table of configs/sgsd_qwen3_1.7b.toml (--config); environment overrides: BACKEND MODEL STEPS
# PROMPTS SEED PROBLEMS BANK MAX_NEW_TOKENS LR EVAL_EVERY SKILLS_EVERY DEVICE SGSD (the sgsd command).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE_RUN="runs/sgsd_qwen3_1.7b_sh"
CONFIG="configs/sgsd_qwen3_1.7b.toml"
source scripts/recipe_common.sh "$@"
STEPS="${STEPS:-200}"; PROMPTS="${PROMPTS:-16}"; EVAL_EVERY="${EVAL_EVERY:-50}"   # the [loop] table's values
BANK="${BANK:-../shared/data/skill_banks/sgsd_qwen3_1.7b.json}"
SKILLS_EVERY="${SKILLS_EVERY:-25}"
check_recipe --steps "$STEPS" --prompts-per-step "$PROMPTS" --eval-every "$EVAL_EVERY" --bank "$BANK" --skill-update-every "$SKILLS_EVERY"

bank_now() {  # the run's latest bank version once updates started, else the initial bank
  local latest
  latest=$(ls "$RUN"/bank/v*.json 2>/dev/null | sort | tail -n 1 || true)
  echo "${latest:-$BANK}"
}

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run $SGSD step-problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --config "$CONFIG" --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE" "${EXTRA_ROLLOUT[@]}"
  run $SGSD score-teachers --config "$CONFIG" --run-dir "$S" --model "$POLICY" --bank "$(bank_now)" --seed $((SEED + n)) --device "$DEVICE"
  run $SGSD polarize --config "$CONFIG" --run-dir "$S"
  run $SGSD train --config "$CONFIG" --run-dir "$S" --objective sgsd --model "$POLICY" --schedule-steps "$STEPS" --seed "$SEED" --device "$DEVICE" "${EXTRA_TRAIN[@]}"
  POLICY="$S/checkpoint"  # model (or adapter) + optimizer state: the next train continues it, rollout loads it
  eval_if_due "$n" "$S" "$POLICY"
  if [ "$SKILLS_EVERY" -gt 0 ] && [ $((n % SKILLS_EVERY)) -eq 0 ]; then
    run $SGSD update-skills --config "$CONFIG" --run-dir "$RUN" --bank "$(bank_now)" --last-steps "$SKILLS_EVERY" --model "$POLICY" --device "$DEVICE"
  fi
done
