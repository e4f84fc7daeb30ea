#!/usr/bin/env bash
# One GPU call that says where the DSA kernels' time goes (issues 7 and 9), measure-first:
#  1. `python scripts/mla_variants.py --diagnose`: sparse MLA launch variants (some
#     sized for two CTAs per SM) x index sets (random / contiguous / L2-resident), DeepSeek-V3.2
#     decode batch 64 at 128K and the 128-head prefill shape, each with the registers, spills,
#     shared memory and CTAs per SM the compiler gave it -> $OUT/mla_diagnose.json
#  2. Nsight Compute (--clock-control none, as METHOD.md asks) on one warm call of each case of
#     scripts/ncu_targets.py: speed of light, occupancy, warp stall reasons, memory workload ->
#     $OUT/ncu-CASE.txt (text only: the .ncu-rep files stay on the machine)
# Usage (repo root): OUT=dir bash scripts/gpu_mla_profile.sh [--skip-diagnose] [CASE ...]
set -uo pipefail
mkdir -p "${OUT:=out/gpu-mla-profile}"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DIAGNOSE=1
CASES=()
for arg in "$@"; do
  case "$arg" in
    --skip-diagnose) DIAGNOSE= ;;
    *) CASES+=("$arg") ;;
  esac
done
[ ${#CASES[@]} -gt 0 ] || CASES=(mla-decode mla-prefill indexer-prefill indexer-decode)
REPO=$(pwd)
# The device's python is not ours: lay the package out as pyproject.toml maps it, no dependencies.
SITE=$(mktemp -d)
cp -r sglang_indexcache "$SITE/" && cp -r kernels "$SITE/sglang_indexcache/kernels" \
    && cp -r calibration "$SITE/sglang_indexcache/calibration" || { echo "package layout failed"; exit 1; }
export PYTHONPATH="$SITE"
cd "$SITE"
SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis)
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [ -n "$DIAGNOSE" ]; then
    $PY scripts/mla_variants.py --diagnose --budget 0.1 --out "$OUT/mla_diagnose.json"
    echo "diagnose exit $?"
  fi
  command -v ncu >/dev/null || { echo "ncu not found: skipping the Nsight Compute part"; exit 0; }
  for case in "${CASES[@]}"; do
    rep="$SITE/ncu-$case"
    ncu --clock-control none --nvtx --nvtx-include "profile/" --kernel-name regex:'^_' \
        "${SECTIONS[@]}" -f -o "$rep" $PY "$REPO/scripts/ncu_targets.py" "$case" > "$SITE/ncu-$case.log" 2>&1
    echo "ncu $case exit $?"; tail -3 "$SITE/ncu-$case.log"
    if [ -f "$rep.ncu-rep" ]; then
      ncu -i "$rep.ncu-rep" --page details > "$OUT/ncu-$case.txt" 2>&1
      grep -E "^  _|Duration|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|Compute \(SM\) Throughput|Block Limit" \
          "$OUT/ncu-$case.txt" | head -60
    fi
  done
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee "$OUT/log.txt"
