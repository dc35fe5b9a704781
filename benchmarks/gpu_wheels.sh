#!/usr/bin/env bash
# Fetches, where pip can reach the package index, the wheels that benchmarks/gpu_check.sh
# installs beside the machine's own Python on a GPU machine without internet (README: GPU
# check): the modules this project needs that such an image (JAX, flax, optax, orbax, NumPy,
# SciPy, pytest, but no TensorFlow) lacks. ~2 MB, into .whl/ (git-ignored; carry it):
#
#   bash benchmarks/gpu_wheels.sh [--python-version 3.12] [--dest .whl]
#
# Versions: the lock's (requirements.txt) and soundfile's cffi/pycparser as in .venv.
# TensorFlow (tf.data; clu's TensorBoard writer, so clu too) is left out, ~250 MB: without
# it training reads batches on a thread pool and logs scalars only (data/pipeline.py,
# rqvae_jax/summaries.py).
set -eu -o pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
pin() { grep -i "^$1==" requirements.txt; }
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  "$(pin ml-collections)" "$(pin soundfile)" "$(pin soxr)" \
  cffi==2.1.1 pycparser==3.12
ls -l "$DEST"
