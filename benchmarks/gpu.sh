#!/usr/bin/env bash
# One prepared GPU benchmark run for tfpipe (issue #7): targets 1 and 2, per-stage XLA on and off
# (issue #21), per-logical-GPU memory peaks of GPipe / 1F1B / recompute, bytes between devices
# per optimizer (issue #18), and the memory promise, on one GPU split into logical GPUs.
# benchmarks/gpu.py does the measuring (its docstring says what and how); this script finds or
# installs a TensorFlow that sees the GPU, prints the card, and runs it within a time budget.
#
# Usage, from anywhere:
#   bash benchmarks/gpu.sh [gpu.py options]      # e.g. --memory-limit-gib 4 --logical 4
#   bash benchmarks/gpu.sh --cpu-smoke           # the same code paths on logical CPUs, tiny sizes
#
# Environment (all optional):
#   PYTHON               interpreter to try first (python3)
#   TFPIPE_GPU_VENV      venv made and used when $PYTHON has no GPU TensorFlow
#                        (/tmp/tfpipe-gpu-venv)
#   TFPIPE_TF_SPEC       what pip installs there ('tensorflow[and-cuda]==2.21.*'); tfpipe itself
#                        runs from this checkout (PYTHONPATH), so no build backend is needed
#   TFPIPE_WHEELHOUSE    install offline from this folder of wheels (pip --no-index --find-links)
#   TFPIPE_GPU_BUDGET_S  wall-clock seconds for everything, install included (470)
#   OUT                  when set, gpu.json and gpu.log are written there
#
# Exit status: 0 all parts ran; 1 a part failed or ran out of time (the JSON says which);
# 3 no TensorFlow could be found or installed; 4 TensorFlow sees no GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUDGET="${TFPIPE_GPU_BUDGET_S:-470}"
VENV="${TFPIPE_GPU_VENV:-/tmp/tfpipe-gpu-venv}"
TF_SPEC="${TFPIPE_TF_SPEC:-tensorflow[and-cuda]==2.21.*}"
BASE_PY="${PYTHON:-python3}"
START=$SECONDS

need=gpu
for arg in "$@"; do
  if [[ $arg == --cpu-smoke ]]; then need=any; fi
done

log() { echo "[gpu.sh] $*"; }

# Whether interpreter $1 imports TensorFlow (and, for $2 = gpu, TensorFlow sees a GPU).
tf_ok() {
  command -v "$1" >/dev/null 2>&1 || return 1
  "$1" - "$2" >/dev/null 2>&1 <<'EOF'
import sys
import tensorflow as tf
sys.exit(0 if sys.argv[1] == "any" or tf.config.list_physical_devices("GPU") else 1)
EOF
}

if command -v nvidia-smi >/dev/null 2>&1; then
  log "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null | paste -sd ';' || echo 'nvidia-smi failed')"
else
  log "card: none (nvidia-smi not found)"
fi

PY=""
for candidate in "$VENV/bin/python" "$BASE_PY"; do
  if tf_ok "$candidate" "$need"; then
    PY="$candidate"
    break
  fi
done

if [[ -z $PY ]]; then
  log "no interpreter here imports a TensorFlow that sees a GPU; installing $TF_SPEC into $VENV"
  pip_args=(--quiet --disable-pip-version-check --retries 0 --timeout 20)
  if [[ -n ${TFPIPE_WHEELHOUSE:-} ]]; then
    pip_args+=(--no-index --find-links "$TFPIPE_WHEELHOUSE")
  fi
  install_limit=$((BUDGET - (SECONDS - START) - 240))
  if ((install_limit < 30)); then install_limit=30; fi
  if ! { [[ -x $VENV/bin/python ]] || "$BASE_PY" -m venv "$VENV"; } ||
    ! timeout "$install_limit" "$VENV/bin/python" -m pip install "${pip_args[@]}" "$TF_SPEC"; then
    cat >&2 <<EOF
[gpu.sh] Could not install TensorFlow with GPU support (pip install '$TF_SPEC' failed or
ran past ${install_limit} s; is a package index reachable?). TensorFlow 2.21 on Linux
needs CUDA 12 libraries, which 'tensorflow[and-cuda]' brings as nvidia-*-cu12 wheels: the
tensorflow wheel alone is 546 MiB and nvidia-cudnn-cu12 about 700 MiB. On a machine without
an index, put those wheels in a folder and run again with TFPIPE_WHEELHOUSE=/that/folder, or
point PYTHON at an interpreter that already has them. Nothing was measured.
EOF
    exit 3
  fi
  if ! tf_ok "$VENV/bin/python" "$need"; then
    log "TensorFlow installed but it sees no GPU; its view of the devices:" >&2
    "$VENV/bin/python" -c 'import tensorflow as tf; print(tf.config.list_physical_devices())' \
      >&2 || true
    exit 4
  fi
  PY="$VENV/bin/python"
fi

log "python: $PY ($("$PY" -c 'import tensorflow as tf; print("TensorFlow", tf.__version__)' \
  2>/dev/null))"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# TensorFlow's pip wheels carry sm_60..sm_89 code and compute_90 PTX: on an H100 / H200 the
# driver JIT-compiles kernels at first use. A large JIT cache lets the later parts (separate
# processes) reuse what the first one compiled.
export CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"

left=$((BUDGET - (SECONDS - START)))
if ((left < 60)); then left=60; fi
cmd=("$PY" "$ROOT/benchmarks/gpu.py" --budget-s "$left" "$@")
log "running: ${cmd[*]}"
rc=0
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  "${cmd[@]}" 2>&1 | tee "$OUT/gpu.log" || rc=$?
else
  "${cmd[@]}" || rc=$?
fi
log "done in $((SECONDS - START)) s, exit status $rc"
exit "$rc"
