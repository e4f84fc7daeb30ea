#!/usr/bin/env bash
# Issue 24 in one GPU call (H200, ~150 s): our top-k past 2**31 elements against the exact top-k, then
# our kernels against SGLang 0.5.17's (DeepGEMM, sgl-kernel, FlashMLA from the offline bundle), then
# the markdown tables of docs/perf.md made from the JSON.
#
#   OUT=dir [BUDGET_S=150] bash scripts/gpu_kernels_24.sh
#
# Writes $OUT/large_checks.json (scripts/gpu_large_checks.py: 16,384 and 32,768 x 200,000),
# $OUT/kernel_compare.json (scripts/gpu_kernel_compare.py), $OUT/report.md
# (scripts/kernel_compare_report.py) and $OUT/log.txt. Needs .gpu/bundle (carried, not committed);
# installs it with its install.py into $SITE (default /tmp/ic-site, the live script's: a warm host
# keeps it). Time guard: every step runs under `timeout` within BUDGET_S seconds of the start, the
# comparison gets what the checks left (less a margin for its last case and the report); the
# comparison's JSON is rewritten after every case, so a cut run keeps what it measured.
# SMOKE=1: the same plumbing on a CPU (Triton's interpreter, toy sizes, PyTorch stand-ins for
# SGLang, no bundle) -- tests/test_gpu_kernels_24.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-kernels-24}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-150}
SITE=${SITE:-/tmp/ic-site}
START=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
within() { local s=$(( $(left) - $1 )); [ -n "${2:-}" ] && [ "$s" -gt "$2" ] && s=$2; echo $(( s > 1 ? s : 1 )); }

main() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  local smoke="" status=0
  if [ -n "${SMOKE:-}" ]; then
    smoke="--smoke"
    export TRITON_INTERPRET=1
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    if [ ! -f "$SITE/.installed" ]; then          # SGLang 0.5.17's stack, checked and installed offline
      local t0=$(date +%s)
      timeout "$(within 60)" "$PY" .gpu/bundle/install.py --target "$SITE" > "$OUT/install.log" 2>&1 \
        || { echo "bundle install failed (see install.log)"; tail -3 "$OUT/install.log"; return 2; }
      echo ok > "$SITE/.installed"
      echo "bundle installed in $(( $(date +%s) - t0 )) s"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$SITE"
  fi
  # an uninstalled checkout: kernels/ is sglang_indexcache.kernels, as pyproject.toml maps it
  if ! "$PY" -c "import sglang_indexcache.kernels" 2>/dev/null; then
    [ -e sglang_indexcache/kernels ] || ln -s ../kernels sglang_indexcache/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

  echo "[$(( $(date +%s) - START )) s] large checks"
  timeout "$(within 40 "${LARGE_S:-60}")" "$PY" scripts/gpu_large_checks.py --out "$OUT/large_checks.json" $smoke
  echo "large checks exit $?"; [ -s "$OUT/large_checks.json" ] || status=1

  local limit=$(( $(left) - 25 ))                 # the comparison's --time-limit: room for its last case
  if [ "$limit" -gt 5 ]; then
    echo "[$(( $(date +%s) - START )) s] comparison, --time-limit $limit"
    local only=()
    [ -n "$smoke" ] && only=(--only "${SMOKE_ONLY:-indexer_prefill,mla_decode}")
    timeout "$(within 5)" "$PY" scripts/gpu_kernel_compare.py --out "$OUT" --time-limit "$limit" \
      $smoke "${only[@]}" ${COMPARE_ARGS:-}
    echo "comparison exit $?"
  else
    echo "no time left for the comparison"; status=1
  fi
  if [ -s "$OUT/kernel_compare.json" ]; then
    "$PY" scripts/kernel_compare_report.py "$OUT/kernel_compare.json" --large "$OUT/large_checks.json" \
      > "$OUT/report.md" && echo "report: $OUT/report.md"
  else
    status=1
  fi
  echo "[$(( $(date +%s) - START )) s] done"
  return $status
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
