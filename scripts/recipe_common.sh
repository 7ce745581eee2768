# Sourced by scripts/recipe_*.sh: argument parsing, the settings every recipe shares, and the dry-run wrapper.
# Before sourcing, a recipe sets RECIPE_RUN (its default run directory).
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
RUN="${1:-$RECIPE_RUN}"
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

run() {  # print (dry run) or execute one command
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

eval_if_due() {  # eval_if_due STEP STEP_DIR POLICY: the paper's protocol every EVAL_EVERY steps
  if [ "$EVAL_EVERY" -gt 0 ] && [ $(($1 % EVAL_EVERY)) -eq 0 ]; then
    run $SGSD eval --run-dir "$2" --model "$3" --bench aime24 --bench aime25 --bench hmmt25 --protocol paper --device "$DEVICE"
  fi
}
