# Sourced by scripts/recipe_*.sh: argument parsing, the settings every recipe shares, and the dry-run wrapper.
# Before sourcing, a recipe sets RECIPE_RUN (its default run directory) and CONFIG (its TOML recipe in configs/).
# Every stage command reads its table of CONFIG (--config), so the shell recipe and `sgsd loop --config CONFIG`
# run the same settings; the script passes only what changes per step (run dir, policy, problems, seeds).
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
RUN="${1:-$RECIPE_RUN}"
USER_MODEL="${MODEL:-}"      # the multi-GPU line passes MODEL on only when it is set (else the config's model)
MODEL="${MODEL:-Qwen/Qwen3-1.7B}"
SEED="${SEED:-0}"
PROBLEMS="${PROBLEMS:-train}"
DEVICE="${DEVICE:-auto}"
BACKEND="${BACKEND:-auto}"   # auto: vLLM if installed, else hf-fast on CUDA, else hf
SGSD="${SGSD:-sgsd}"
EXTRA_TRAIN=()               # LR=... overrides the recipe's learning rate
if [ -n "${LR:-}" ]; then EXTRA_TRAIN+=(--lr "$LR"); fi
EXTRA_ROLLOUT=()
if [ -n "${MAX_NEW_TOKENS:-}" ]; then EXTRA_ROLLOUT+=(--max-new-tokens "$MAX_NEW_TOKENS"); fi

run() {  # print (dry run) or execute one command
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

check_recipe() {  # --dry-run only: `sgsd loop --dry-run` on CONFIG with this script's settings (resolved config and
  # checked inputs on stderr; a problem stops the script with its one-line error), then the commands are printed
  [ "$DRY" = 1 ] || return 0
  local extra=()
  if [ -n "${LR:-}" ]; then extra+=(--set "train.lr=$LR"); fi
  if [ -n "${MAX_NEW_TOKENS:-}" ]; then extra+=(--set "rollout.max_new_tokens=$MAX_NEW_TOKENS"); fi
  $SGSD loop --config "$CONFIG" --run-dir "$RUN" --dry-run --model "$MODEL" --problems "$PROBLEMS" --seed "$SEED" \
    --backend "$BACKEND" --device "$DEVICE" "$@" "${extra[@]}" >&2
}

eval_if_due() {  # eval_if_due STEP STEP_DIR POLICY: the recipe's [eval] table every EVAL_EVERY steps
  if [ "$EVAL_EVERY" -gt 0 ] && [ $(($1 % EVAL_EVERY)) -eq 0 ]; then
    run $SGSD eval --config "$CONFIG" --run-dir "$2" --model "$3" --device "$DEVICE"
  fi
}

torchrun_loop() {  # torchrun_loop GPUS CONFIG [sgsd loop options...]: the whole loop on GPUS ranks of this node
  # --no-python: torchrun starts the sgsd command itself (a console script, a pyenv shim or a wrapper alike)
  local gpus="$1" config="$2"; shift 2
  if [ -n "$USER_MODEL" ]; then set -- --model "$USER_MODEL" "$@"; fi
  if [ "$DRY" = 1 ]; then  # the same check as `sgsd loop --dry-run` (stderr), then the line
    $SGSD loop --config "$config" --run-dir "$RUN" --dry-run "$@" >&2
  fi
  run "${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$gpus" --no-python "$SGSD" loop --config "$config" --run-dir "$RUN" "$@"
}
