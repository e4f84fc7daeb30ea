#!/usr/bin/env bash
# One GPU call for the lightning-indexer kernels: correctness at serving sizes (every kernel, incl.
# the radix top-k and fp8 prefill), then `python scripts/indexer_variants.py` (launch
# sweep, prefill 32K-128K, decode 128K/200K in CUDA graphs). Writes $OUT/kernel_checks.json,
# $OUT/indexer_variants.json and $OUT/log.txt.
# Usage (repo root): OUT=dir bash scripts/gpu_indexer.sh [extra indexer_variants arguments]
set -uo pipefail
mkdir -p "${OUT:=out/gpu-indexer}"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The device's python is not ours: lay the package out as pyproject.toml maps it, no dependencies.
SITE=$(mktemp -d)
cp -r sglang_indexcache "$SITE/" && cp -r kernels "$SITE/sglang_indexcache/kernels" \
    && cp -r calibration "$SITE/sglang_indexcache/calibration" || { echo "package layout failed"; exit 1; }
export PYTHONPATH="$SITE"
cd "$SITE"                                  # so that python -m finds this layout first
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  [ -n "${SKIP_CHECKS:-}" ] || { $PY "$OLDPWD/scripts/gpu_kernel_checks.py" --out "$OUT/kernel_checks.json"; echo "checks exit $?"; }
  if [ -n "${TOPK_PROFILE:-}" ]; then $PY "$OLDPWD/scripts/gpu_topk_profile.py" "$OUT/topk_profile.json"; echo "profile exit $?"; exit 0; fi
  $PY "$OLDPWD/scripts/indexer_variants.py" --out "$OUT/indexer_variants.json" "$@"; echo "variants exit $?"
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee "$OUT/log.txt"
