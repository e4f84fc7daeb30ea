#!/usr/bin/env bash
# End-to-end check of the patched SGLang 0.5.23 server on an ordinary SGLang GPU host.
#
# Needs: Linux x86_64, NVIDIA GPU(s) SGLang's DSA kernels support (Hopper or Blackwell), CUDA driver
# for torch 2.14.1, Python 3.11, network to PyPI (sglang 0.5.23 + sglang-kernel, about 0.5 GB), and a
# DSA checkpoint the DSA backend can run (DeepSeek-V3.2 / GLM-5 class, or any GlmMoeDsa checkpoint with
# SGLang's head shapes: MLA latent 512 + rope 64, index head dim 128). The embedded tiny model does
# not have those shapes, so MODEL must be given. Runs 2 and 4 need indexer weights in every layer
# (a GLM-5.2-style checkpoint with shared layers lacking them is refused there, by design).
#
#   MODEL=/models/GLM-5 TP=8 scripts/gpu_e2e_sglang.sh
#
# Steps: fresh venv; pip install sglang==0.5.23 and this project; apply the patch set; then four
# server runs, each checked through HTTP and the server log:
#   1. no IndexCache flag (stock behaviour)        -> greedy output A
#   2. --index-cache-pattern all-F                 -> greedy output equals A (indexer_types overridden, logged)
#   3. --index-cache-pattern-file every-4          -> start-up line, /server_info index_cache, gauge in /metrics
#   4. --index-cache-calibration + admin key       -> /index_cache (401 without key), pattern switch, overlap
# Results (JSON replies, logs, a summary) go to $OUT.
set -euo pipefail

MODEL=${MODEL:?set MODEL to a DSA checkpoint directory}
TP=${TP:-1}
PORT=${PORT:-30123}
OUT=${OUT:-out/gpu_e2e_sglang}
VENV=${VENV:-.venv-sglang-gpu}
ADMIN_KEY=${ADMIN_KEY:-indexcache-e2e}
PROMPT=${PROMPT:-"The capital of France is"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT"

python3.11 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "sglang==$(cat "$REPO/patches/sglang-version")"
"$PY" -m pip install -q -e "$REPO"
SITE=$("$PY" -c 'import os, sglang; print(os.path.dirname(os.path.dirname(sglang.__file__)))')
"$PY" -m sglang_indexcache.sglang_overlay.patchset apply "$SITE"

LAYERS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['num_hidden_layers'])" "$MODEL")
ALL_F=$(printf 'F%.0s' $(seq 1 "$LAYERS"))
"$PY" - "$MODEL" "$OUT/every4.json" <<'EOF'
import sys
from sglang_indexcache import pattern, pattern_file
from sglang_indexcache.model_info import load_model_info
info = load_model_info(sys.argv[1])
pattern_file.write(sys.argv[2], pattern_file.make_document(
    pattern.uniform(info.num_dsa_layers, 4), info, method="uniform"))
EOF

SERVER_PID=
start_server() {  # name, extra flags...
  local name=$1; shift
  "$PY" -m sglang.launch_server --model-path "$MODEL" --tp "$TP" --port "$PORT" "$@" >"$OUT/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 900); do
    curl -sf "$URL/health" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server $name died; see $OUT/$name.log"; exit 1; }
    sleep 2
  done
  echo "server $name did not become healthy"; exit 1
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT
generate() {  # -> greedy completion text
  curl -sf "$URL/generate" -H 'Content-Type: application/json' \
    -d "{\"text\": \"$PROMPT\", \"sampling_params\": {\"max_new_tokens\": 32, \"temperature\": 0}}" | tee -a "$OUT/generate.jsonl"
}
text_of() { echo "$1" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["text"])'; }
check() { if eval "$2"; then echo "PASS $1" | tee -a "$OUT/summary.txt"; else echo "FAIL $1" | tee -a "$OUT/summary.txt"; FAILED=1; fi; }
FAILED=0
: >"$OUT/summary.txt"

start_server stock
A=$(generate); stop_server
check "no flag: no IndexCache log line" "! grep -q 'IndexCache:' '$OUT/stock.log'"

start_server all_f --index-cache-pattern "$ALL_F"
B=$(generate); stop_server
TEXT_A=$(text_of "$A"); TEXT_B=$(text_of "$B")
check "all-F flag: greedy output equals no-flag output" '[ -n "$TEXT_A" ] && [ "$TEXT_A" = "$TEXT_B" ]'
check "all-F flag: overrode the checkpoint's pattern keys (if any), logged" "grep -q 'IndexCache: pattern' '$OUT/all_f.log'"

start_server every4 --index-cache-pattern-file "$OUT/every4.json" --enable-metrics
generate >/dev/null
curl -sf "$URL/server_info" >"$OUT/server_info.json"
curl -sf "$URL/metrics" >"$OUT/metrics.txt"
stop_server
check "start-up line" "grep -q 'IndexCache: pattern' '$OUT/every4.log'"
check "server_info index_cache" "$PY -c 'import json,sys; d=json.load(open(sys.argv[1]))[\"index_cache\"]; assert d[\"kept_indexers\"] == sum(1 for i in range($LAYERS) if i % 4 == 0)' '$OUT/server_info.json'"
check "kept-indexer gauge" "grep -q '^sglang:index_cache_kept_indexers' '$OUT/metrics.txt'"

start_server calibration --index-cache-calibration --admin-api-key "$ADMIN_KEY"
AUTH=(-H "Authorization: Bearer $ADMIN_KEY" -H 'Content-Type: application/json')
NO_KEY=$(curl -s -o /dev/null -w '%{http_code}' "$URL/index_cache")
check "endpoints need the admin key" '[ "$NO_KEY" = 401 ]'
curl -sf "${AUTH[@]}" "$URL/index_cache" >"$OUT/index_cache.json"
curl -sf "${AUTH[@]}" "$URL/index_cache/pattern" -d "{\"pattern\": \"$("$PY" -c "from sglang_indexcache import pattern; print(pattern.uniform($LAYERS, 4))")\"}" >"$OUT/switch.json"
BAD=$(curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$URL/index_cache/pattern" -d '{"pattern": "S"}')
check "bad pattern refused" '[ "$BAD" = 400 ]'
generate >/dev/null
curl -sf "${AUTH[@]}" "$URL/index_cache/overlap" -d "{\"text\": [\"$PROMPT a long enough text to measure the overlap of the top-k selections between layers.\"]}" >"$OUT/overlap.json"
stop_server
check "switch applied" "grep -q 'switched to pattern' '$OUT/calibration.log'"
check "overlap measured" "$PY -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d[\"layers\"] and d[\"mean_recall\"] is not None' '$OUT/overlap.json'"

"$PY" -m sglang_indexcache.sglang_overlay.patchset revert "$SITE"
echo "summary: $OUT/summary.txt"
exit "$FAILED"
