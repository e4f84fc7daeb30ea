#!/usr/bin/env bash
# Train the embedded tiny model on one lent GPU in a single call (the device tool's `run`).
#
# What: probes the seconds per step of each stage (15 steps each), scales the steps so that the
# dense / warm-up / sparse stages take 50% / 15% / 35% of BUDGET seconds, trains, evaluates, and
# copies the model files and logs to $OUT.
# Why one call: the device machine starts bare and its time is scarce; the probe also exercises
# every stage on the GPU before the long run starts.
# Needs (carried): .whl/transformers-5.19.0-*.whl, .cache/train-tiny/train_tokens.npy, and the
# tokenizer + data/*.txt already in models/tiny-glm-dsa (built here by `indexcache train-tiny`).
# Usage: scripts/train_tiny_device.sh BUDGET_SECONDS [BATCH]
# (The committed model was trained with fixed steps instead, see models/tiny-glm-dsa/README.md: a
# first run of this script diverged at a peak lr of 2e-3, since lowered to 1e-3.)
set -euo pipefail
BUDGET=${1:-360}
BATCH=${2:-32}
OUT=${OUT:-/tmp/train-tiny-out}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
# the package maps calibration/ and kernels/ through package-dir; without an install, link them
[ -e sglang_indexcache/calibration ] || ln -s ../calibration sglang_indexcache/calibration
[ -e sglang_indexcache/kernels ] || ln -s ../kernels sglang_indexcache/kernels
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; from transformers import GlmMoeDsaForCausalLM; print('torch', torch.__version__, 'transformers', transformers.__version__)"

MODEL=models/tiny-glm-dsa
PROBE=/tmp/probe
mkdir -p $PROBE/state $PROBE/model/data
cp .cache/train-tiny/train_tokens.npy $PROBE/state/
cp $MODEL/tokenizer.json $MODEL/tokenizer_config.json $PROBE/model/
cp $MODEL/data/*.txt $PROBE/model/data/
python3 -m sglang_indexcache --quiet train-tiny --device cuda --batch-size "$BATCH" --steps 15,15,15 \
    --out $PROBE/model --work-dir $PROBE/state --log-every 5 --save-every 1000 --no-eval > $PROBE/probe.json
STEPS=$(python3 - "$PROBE/state/train_log.jsonl" "$BUDGET" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
budget = float(sys.argv[2])
share = {"dense": 0.50, "warmup": 0.15, "sparse": 0.35}
steps = []
for stage in ("dense", "warmup", "sparse"):
    t = {r["step"]: r["seconds"] for r in rows if r["stage"] == stage}
    per_step = (t[15] - t[5]) / 10
    print(f"{stage}: {per_step * 1000:.1f} ms/step", file=sys.stderr)
    steps.append(str(int(share[stage] * budget / per_step)))
print(",".join(steps))
EOF
)
echo "steps: $STEPS (batch $BATCH, budget $BUDGET s)"
rm -f .cache/train-tiny/state.pt .cache/train-tiny/train_log.jsonl
# --no-eval: the device image has no `datasets`; evaluate the returned model here instead
time python3 -m sglang_indexcache --quiet train-tiny --device cuda --batch-size "$BATCH" --steps "$STEPS" \
    --out $MODEL --work-dir .cache/train-tiny --log-every 25 --save-every 10000 --no-eval
cp $MODEL/config.json $MODEL/model.safetensors $MODEL/generation_config.json .cache/train-tiny/train_log.jsonl \
    .cache/train-tiny/summary.json "$OUT"/
cp $PROBE/state/train_log.jsonl "$OUT"/probe_log.jsonl
