#!/usr/bin/env bash
# Fetch the stock anchors that `indexcache bench kernels` times beside our kernels (never committed):
#   .cache/kernels-wheels/   sgl-flash-mla==1.0.0 wheel (cp312, x86_64; the version SGLang 0.5.23 pins)
#   .cache/kernel-anchors/   SGLang 0.5.23's triton_sparse_mla.py + triton_sparse_mla_decode.py, from its wheel
# Both folders are under .cache/, which git ignores. Re-runnable; needs pip and network access.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/kernels-wheels .cache/kernel-anchors
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
ls .cache/kernels-wheels/sgl_flash_mla-1.0.0-*.whl >/dev/null 2>&1 || \
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .cache/kernels-wheels sgl-flash-mla==1.0.0
if [ ! -f .cache/kernel-anchors/triton_sparse_mla_decode.py ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_34_x86_64 -d "$tmp" sglang==0.5.23
  unzip -q -j -o "$tmp"/sglang-0.5.23-*.whl \
    'sglang/kernels/ops/attention/dsa/triton_sparse_mla.py' \
    'sglang/kernels/ops/attention/dsa/triton_sparse_mla_decode.py' -d .cache/kernel-anchors
  rm -rf "$tmp"
fi
ls -l .cache/kernels-wheels .cache/kernel-anchors
