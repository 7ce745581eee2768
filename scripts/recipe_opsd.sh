#!/usr/bin/env bash
# OPSD baseline on Qwen3-1.7B (configs/opsd_qwen3_1.7b.toml) as stage commands, one stage per line.
# Each step: problems -> rollout -> train (clipped forward KL to the initial model prompted with the gold
# answer), eval every EVAL_EVERY steps.  Rerunning continues.
#
#   scripts/recipe_opsd.sh [--dry-run] [RUN_DIR]      --dry-run prints the resolved commands, runs nothing
#
# Environment overrides: MODEL STEPS PROMPTS SEED PROBLEMS MAX_NEW_TOKENS LR EVAL_EVERY DEVICE BACKEND SGSD PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
RUN="${1:-runs/opsd_qwen3_1.7b_sh}"
MODEL="${MODEL:-Qwen/Qwen3-1.7B}"
STEPS="${STEPS:-200}"
PROMPTS="${PROMPTS:-16}"
SEED="${SEED:-0}"
PROBLEMS="${PROBLEMS:-train}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-1024}"
LR="${LR:-5e-6}"
EVAL_EVERY="${EVAL_EVERY:-50}"
DEVICE="${DEVICE:-auto}"
BACKEND="${BACKEND:-auto}"   # auto: vLLM if installed, else hf-fast on CUDA, else hf
SGSD="${SGSD:-sgsd}"
PYTHON="${PYTHON:-python}"

run() {  # print (dry run) or execute one command
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

POLICY="$MODEL"
for ((n = 1; n <= STEPS; n++)); do
  S=$(printf '%s/step_%04d' "$RUN" "$n")
  run "$PYTHON" -m stages.loop problems --pool "$PROBLEMS" --step "$n" --per-step "$PROMPTS" --seed "$SEED" --out "$S/problems.parquet"
  run $SGSD rollout --run-dir "$S" --model "$POLICY" --problems "$S/problems.parquet" --n 1 --temperature 1.1 --top-p 0.95 --top-k 20 --max-new-tokens "$MAX_NEW_TOKENS" --no-thinking --seed $((SEED * 100003 + n)) --policy-step $((n - 1)) --backend "$BACKEND" --device "$DEVICE"
  run $SGSD train --run-dir "$S" --objective opsd --model "$POLICY" --steps 1 --batch-size 0 --micro-batch-size 4 --lr "$LR" --max-grad-norm 0.1 --lora --lora-r 64 --lora-alpha 128 --lora-target all-linear --teacher-mode fixed --kl-clip 0.05 --kl-top-k 0 --scoring-temperature 1.0 --gradient-checkpointing --seed "$SEED" --device "$DEVICE"
  POLICY="$S/checkpoint"
  if [ "$EVAL_EVERY" -gt 0 ] && [ $((n % EVAL_EVERY)) -eq 0 ]; then
    run $SGSD eval --run-dir "$S" --model "$POLICY" --bench aime24 --bench aime25 --bench hmmt25 --protocol paper --device "$DEVICE"
  fi
done
