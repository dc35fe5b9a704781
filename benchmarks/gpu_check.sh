#!/usr/bin/env bash
# The GPU check in one command (README: GPU check). On a machine with one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json [--budget 470]
#
# runs benchmarks/gpu_check.py under the time left: GPU tests, conv/LSTM choice, training
# and separation throughput in float32 and bfloat16, a short demo training. The JSON is
# rewritten after every section, so a timeout still leaves numbers. The Python it runs
# under, the first that works:
#   1. $PYTHON, if set;
#   2. .venv's, if it has JAX's CUDA plugin (cuda12 or cuda13) and pytest;
#   3. the machine's own python3, if its JAX sees a GPU (an image with JAX and no internet,
#      like the lent H100/H200 machines): the wheels in .whl/ ($GPU_CHECK_WHEELS) are
#      installed beside it first (what the image lacks; `bash benchmarks/gpu_wheels.sh`
#      fetches them where pip works);
#   4. a fresh .venv from `make install CUDA=12` (needs the package index).
# One that lacks a module the check needs writes a JSON saying which and exits 2.
#
#   bash benchmarks/gpu_check.sh --dry --out /tmp/gpu_check.json
#
# runs the same sections on the CPU with tiny sizes and no install (PYTHON, else .venv's
# python, else python3), in about a minute: tests/test_gpu_check.py.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=''
BUDGET=''                  # whole check, install included: 470 s (the GPU tool allows ~8 min);
                           # dry: 900 s, only a guard against a hang
INSTALL_BUDGET=240
SECTIONS=''
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --install-budget) INSTALL_BUDGET="$2"; shift ;;
    --sections) SECTIONS="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  echo "gpu_check.sh: --out FILE.json is required" >&2
  exit 64
fi
[ -z "$BUDGET" ] && { [ "$DRY" = 1 ] && BUDGET=900 || BUDGET=470; }
mkdir -p "$(dirname "$OUT")"
START=$(date +%s)
INSTALL_JSON="$(mktemp)"
trap 'rm -f "$INSTALL_JSON"' EXIT

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-}"
  [ -z "$PY" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
  [ -z "$PY" ] && PY=python3
  export JAX_PLATFORMS=cpu
  echo '{"skipped": "dry mode uses the current environment"}' > "$INSTALL_JSON"
  DRY_FLAG=--dry
else
  LOG="$(dirname "$OUT")/gpu_check_install.log"
  : > "$LOG"
  T0=$(date +%s)
  RC=0
  NEEDED='import jax, flax, optax, orbax.checkpoint, ml_collections, soundfile, soxr, pytest'
  HAS_CUDA_PLUGIN='import importlib.util as u, sys
sys.exit(not (u.find_spec("jax_cuda12_plugin") or u.find_spec("jax_cuda13_plugin")))'
  SEES_GPU='import jax, sys; sys.exit(jax.default_backend() != "gpu")'
  if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"; HOW="PYTHON=$PYTHON"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "$HAS_CUDA_PLUGIN" 2>/dev/null &&
       .venv/bin/python -c 'import pytest' 2>/dev/null; then
    PY=.venv/bin/python; HOW='.venv (it has a JAX CUDA plugin and pytest)'
  elif command -v python3 >/dev/null && timeout 180 python3 -c "$SEES_GPU" >> "$LOG" 2>&1; then
    PY="$(command -v python3)"; HOW="the machine's python3 ($PY), whose JAX sees a GPU"
    WHEELS="${GPU_CHECK_WHEELS:-.whl}"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
      SITE="$(mktemp -d)"
      HOW="$HOW, with $WHEELS/ installed into $SITE"
      timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1 || RC=$?
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
  else
    PY=.venv/bin/python; HOW='make install CUDA=12 (no Python with a working JAX GPU found)'
    echo "gpu_check: installing .venv (make install CUDA=12, at most ${INSTALL_BUDGET}s)..."
    # No internet is promised: short network timeouts, so a missing package fails fast.
    export PIP_DEFAULT_TIMEOUT=20 PIP_RETRIES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    {
      timeout "$INSTALL_BUDGET" make install CUDA=12 &&
      timeout 60 "$PY" -m pip install -q "$(grep '^pytest==' requirements-dev.txt)"
    } >> "$LOG" 2>&1
    RC=$?
  fi
  echo "gpu_check: Python: $HOW" | tee -a "$LOG"
  if [ "$RC" = 0 ] && ! "$PY" -c "$NEEDED" >> "$LOG" 2>&1; then
    RC=4
    echo "gpu_check: $PY lacks a module the check needs (see the log); on a machine without" \
         "internet, carry them: bash benchmarks/gpu_wheels.sh here, then carry .whl" | tee -a "$LOG"
  fi
  INSTALL_S=$(( $(date +%s) - T0 ))
  PYJSON="$PY"
  [ -x "$PYJSON" ] || PYJSON=python3
  "$PYJSON" - "$RC" "$INSTALL_S" "$LOG" "$INSTALL_JSON" "$HOW" <<'EOF' || echo '{}' > "$INSTALL_JSON"
import json, sys
rc, seconds, log, out, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
tail = open(log, errors='replace').read()[-3000:]
json.dump({'python': how, 'returncode': rc, 'seconds': seconds, 'log': log, 'log_tail': tail},
          open(out, 'w'))
EOF
  if [ "$RC" != 0 ]; then
    echo "gpu_check: the environment FAILED (exit $RC after ${INSTALL_S}s); see $LOG" >&2
    tail -n 20 "$LOG" >&2
    "$PYJSON" - "$INSTALL_JSON" "$OUT" <<'EOF' || echo "{\"error\": \"install failed, exit $RC\"}" > "$OUT"
import json, sys
install = json.load(open(sys.argv[1]))
json.dump({'what': 'rqvae-jax GPU check', 'mode': 'gpu', 'finished': False,
           'error': 'no working Python environment (see install): no section ran',
           'install': install, 'sections': {}}, open(sys.argv[2], 'w'), indent=1)
EOF
    exit 2
  fi
  DRY_FLAG=''
fi

LEFT=$(( BUDGET - ($(date +%s) - START) ))
if [ "$LEFT" -lt 30 ]; then
  echo "gpu_check: only ${LEFT}s left after the install; nothing run" >&2
  exit 3
fi
echo "gpu_check: ${LEFT}s left for the sections; results go to $OUT"
# The Python side keeps its own deadline 10 s short of this hard limit.
timeout --kill-after=10 "$LEFT" "$PY" -m benchmarks.gpu_check $DRY_FLAG --out "$OUT" \
  --deadline-s $(( LEFT - 10 )) --install-json "$INSTALL_JSON" ${SECTIONS:+--sections "$SECTIONS"}
RC=$?
[ "$RC" = 124 ] && echo "gpu_check: killed at the hard limit; $OUT holds the finished sections" >&2
exit "$RC"
