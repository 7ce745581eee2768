#!/usr/bin/env bash
# CPU smoke run of the whole SGSD chain, offline, with nothing from outside the repository:
# tiny model -> rollout (16 problems) -> score-teachers -> polarize -> train 2 steps -> rollout with the new checkpoint.
# Every stage leaves its Parquet + manifest under RUN_DIR.  Usage: scripts/smoke.sh [RUN_DIR]
# Inputs can be pointed elsewhere: SGSD_SMOKE_PROBLEMS (JSONL/Parquet or benchmark name), SGSD_SMOKE_BANK,
# SGSD_SMOKE_LIMIT (problems), SGSD_SMOKE_MAX_NEW_TOKENS, SGSD_SMOKE_MODEL (use an existing model instead of the tiny one).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN="${1:-runs/smoke}"
PROBLEMS="${SGSD_SMOKE_PROBLEMS:-data/demo/problems.jsonl}"
BANK="${SGSD_SMOKE_BANK:-data/demo/skill_bank.json}"
LIMIT="${SGSD_SMOKE_LIMIT:-16}"
MAXTOK="${SGSD_SMOKE_MAX_NEW_TOKENS:-48}"
if [ -n "${SGSD_BIN:-}" ]; then SGSD="$SGSD_BIN"
elif command -v sgsd >/dev/null 2>&1; then SGSD=sgsd
else SGSD="python3 -m sgsd_cli.main"; fi   # console script not on PATH (e.g. pyenv before a rehash)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

MODEL="${SGSD_SMOKE_MODEL:-$RUN/model}"
if [ -z "${SGSD_SMOKE_MODEL:-}" ] && [ ! -f "$MODEL/config.json" ]; then
  $SGSD make-tiny-model "$MODEL"
fi
S0="$RUN/step_0001"; S1="$RUN/step_0002"   # numbered as sgsd loop numbers its steps
COMMON=(--device cpu --dtype fp32)

$SGSD rollout        --run-dir "$S0" --model "$MODEL" --problems "$PROBLEMS" --limit "$LIMIT" --n 1 \
                     --max-new-tokens "$MAXTOK" --backend hf --seed 0 "${COMMON[@]}"
$SGSD score-teachers --run-dir "$S0" --model "$MODEL" --bank "$BANK" --k 4 --retrieval lexical "${COMMON[@]}"
$SGSD polarize       --run-dir "$S0"
$SGSD train          --run-dir "$S0" --model "$MODEL" --objective sgsd --steps 2 --batch-size 8 --lr 1e-3 \
                     --device cpu --precision fp32
$SGSD rollout        --run-dir "$S1" --model "$S0/checkpoint" --problems "$PROBLEMS" --limit "$LIMIT" --n 1 \
                     --max-new-tokens "$MAXTOK" --backend hf --seed 1 --policy-step 1 "${COMMON[@]}"

echo "smoke run finished in $(( $(date +%s) - start )) s; tables:"
find "$RUN" -name '*.parquet' -not -path '*/model/*' | sort
echo
echo "look at it next:"
echo "  $SGSD report $RUN                                        # plots + $RUN/report/report.html"
echo "  $SGSD inspect $S0 --worst --html $RUN/inspect.html   # one rollout token by token under its teachers"
