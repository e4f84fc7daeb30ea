#!/usr/bin/env bash
# One GPU session for the DSA kernels: correctness against the fp32 references at serving sizes, then
# `indexcache bench kernels` (with the anchors fetched by scripts/fetch_kernel_anchors.sh, if present).
# Writes $OUT/kernel_checks.json, $OUT/kernels_bench.json and $OUT/gpu_kernels.log.
# Usage: OUT=dir bash scripts/gpu_kernels.sh [extra `bench kernels` arguments]
# On the lent device: carry .cache (anchors) and run `bash scripts/gpu_kernels.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-kernels}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# An uninstalled checkout: map kernels/ to sglang_indexcache.kernels as pyproject.toml does.
if ! $PY -c "import sglang_indexcache.kernels" 2>/dev/null; then
  [ -e sglang_indexcache/kernels ] || ln -s ../kernels sglang_indexcache/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .cache/kernels-wheels/*.whl >/dev/null 2>&1 && ! $PY -c "import flash_mla" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/kernel-anchor-site .cache/kernels-wheels/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/kernel-anchor-site"
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  [ -n "${SKIP_CHECKS:-}" ] || { $PY scripts/gpu_kernel_checks.py --out "$OUT/kernel_checks.json"; echo "checks exit $?"; }
  $PY -m sglang_indexcache bench kernels --save "$OUT/kernels_bench.json" "$@"; echo "bench exit $?"
} 2>&1 | tee "$OUT/gpu_kernels.log"
