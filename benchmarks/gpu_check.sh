#!/usr/bin/env bash
# The GPU check in one command (README: GPU check). On a machine with one CUDA 12 GPU:
#
#   bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json [--budget 470]
#
# creates .venv with the lock plus jax[cuda12] (`make install CUDA=12`; reused when it
# already has JAX's CUDA plugin) and pytest, then runs benchmarks/gpu_check.py under the
# remaining time: GPU tests, conv/LSTM choice, training and separation throughput in float32
# and bfloat16, a short demo training. The JSON is rewritten after every section, so a
# timeout still leaves numbers; an install that fails writes a JSON saying so and exits 2.
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
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
  PY=.venv/bin/python
  LOG="$(dirname "$OUT")/gpu_check_install.log"
  T0=$(date +%s)
  RC=0
  if [ -x "$PY" ] && "$PY" -c 'import jax_cuda12_plugin, pytest' 2>/dev/null; then
    echo "gpu_check: reusing .venv (it has JAX's CUDA plugin and pytest)" | tee "$LOG"
  else
    echo "gpu_check: installing .venv (make install CUDA=12, at most ${INSTALL_BUDGET}s)..."
    # No internet is promised: short network timeouts, so a missing package fails fast.
    export PIP_DEFAULT_TIMEOUT=20 PIP_RETRIES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    {
      timeout "$INSTALL_BUDGET" make install CUDA=12 &&
      timeout 60 "$PY" -m pip install -q "$(grep '^pytest==' requirements-dev.txt)"
    } > "$LOG" 2>&1
    RC=$?
  fi
  INSTALL_S=$(( $(date +%s) - T0 ))
  PYJSON="$PY"
  [ -x "$PYJSON" ] || PYJSON=python3
  "$PYJSON" - "$RC" "$INSTALL_S" "$LOG" "$INSTALL_JSON" <<'EOF' || echo '{}' > "$INSTALL_JSON"
import json, sys
rc, seconds, log, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
tail = open(log, errors='replace').read()[-3000:]
json.dump({'command': 'make install CUDA=12 && pip install pytest', 'returncode': rc,
           'seconds': seconds, 'log': log, 'log_tail': tail}, open(out, 'w'))
EOF
  if [ "$RC" != 0 ]; then
    echo "gpu_check: the install FAILED (exit $RC after ${INSTALL_S}s); see $LOG" >&2
    tail -n 20 "$LOG" >&2
    "$PYJSON" - "$INSTALL_JSON" "$OUT" <<'EOF' || echo "{\"error\": \"install failed, exit $RC\"}" > "$OUT"
import json, sys
install = json.load(open(sys.argv[1]))
json.dump({'what': 'rqvae-jax GPU check', 'mode': 'gpu', 'finished': False,
           'error': 'the install failed (make install CUDA=12): no section ran; see install',
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
