#!/usr/bin/env bash
# Layer-stack benchmark on a GPU in ONE call: device ceilings (measured inside every suite), a check of
# the Triton kernels against the references, prefill 8K..128K (+200K if time allows) for
# glm-30b-a3b and deepseek-v3.2 shapes (4 layers each), decode at 200K (batch 1 and larger), with
# per-component seconds and efficiency against the FLOP/byte floors. JSON, summary and log in $OUT.
#
# Usage (repo root): OUT=out/gpu scripts/gpu_bench_stack.sh [BUDGET_SECONDS]   (default 250)
#        SMOKE=1 scripts/gpu_bench_stack.sh   checks the script on a CPU (toy sizes, Triton interpreter)
set -uo pipefail
mkdir -p "${OUT:=out/gpu_bench_stack}"
OUT=$(cd "$OUT" && pwd)
BUDGET=${1:-250}
PY=${PYTHON:-python3}
[ -x "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")   # absolute, venv link kept
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
    TRITON_INTERPRET=1 "$PY" scripts/gpu_bench_stack.py "$OUT" "$BUDGET" --smoke 2>&1 | tee "$OUT/log.txt"
    exit
fi
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/log.txt"
# The device's python is not ours (3.12, its own torch/triton): lay the package out as pyproject.toml
# maps it (kernels/ and calibration/ inside sglang_indexcache), no dependencies installed.
SITE=$(mktemp -d)
cp -r sglang_indexcache "$SITE/" && cp -r kernels "$SITE/sglang_indexcache/kernels" \
    && cp -r calibration "$SITE/sglang_indexcache/calibration" \
    || { echo "package layout failed" | tee -a "$OUT/log.txt"; exit 1; }
PYTHONPATH="$SITE" "$PY" scripts/gpu_bench_stack.py "$OUT" "$BUDGET" 2>&1 | tee -a "$OUT/log.txt"
