"""Programs for Nsight Compute (scripts/gpu_mla_profile.sh): each runs one DSA op three times on
DeepSeek-V3.2 / GLM-5 shapes, so that ``ncu --nvtx --nvtx-include profile/`` profiles the last, warm call only.

``python3 scripts/ncu_targets.py CASE`` with CASE one of: mla-decode (128 heads, batch 64, 128K
cache, random top-k 2048), mla-prefill (2048 query tokens x 128 heads of one 128K request),
indexer-prefill (the last 2048-row chunk of a 128K prefill, 32 index heads: score kernel and sampled
top-k), indexer-decode (batch 64 at 128K, 64 index heads). ``--smoke`` runs every case at tiny
sizes on the CPU (under TRITON_INTERPRET=1) to check the program before a GPU call.
"""

import sys

import torch

from kernel_research.mla_inputs import mla_inputs
from sglang_indexcache.bench.kernel_bench_ops import paged_cache
from sglang_indexcache.bench.shapes import D_QK
from sglang_indexcache.kernels import indexer_topk_decode, sparse_mla_decode, topk_rows_sampled
from sglang_indexcache.kernels.indexer_scores import prefill_scores

CASES = ("mla-decode", "mla-prefill", "indexer-prefill", "indexer-decode")


def main(case: str, dev=torch.device("cuda"), ctx: int = 131072, batch: int = 64, rows: int = 2048,
         repeat: int = 3) -> None:
    torch.manual_seed(0)
    if case in ("mla-decode", "mla-prefill"):
        b, shared = (batch, False) if case == "mla-decode" else (rows, True)
        q, cache, table, idx, _ = mla_inputs(b, ctx, 128, shared, dev)
        run = lambda: sparse_mla_decode(q, cache, table, idx, D_QK ** -0.5)  # noqa: E731
    elif case == "indexer-prefill":
        n, h = ctx, 32
        q = torch.randn(n, h, 128, device=dev).bfloat16()
        k = torch.randn(n, 128, device=dev).bfloat16()
        w = torch.rand(n, h, device=dev)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        buf = torch.empty(1, rows, n, device=dev)
        lens = torch.arange(n - rows + 1, n + 1, dtype=torch.int32, device=dev)

        def run():
            prefill_scores(q, w, k, cu, 0.1, buf, n - rows, rows)
            topk_rows_sampled(buf[0], 2048, lengths=lens)
    elif case == "indexer-decode":
        b, h = batch, 64
        cache, table, _ = paged_cache(b, ctx, 128, torch.bfloat16, dev)
        q = torch.randn(b, h, 128, device=dev).bfloat16()
        w = torch.rand(b, h, device=dev)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        run = lambda: indexer_topk_decode(q, w, cache, table, lens, 2048, 0.1)  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case!r}; one of {', '.join(CASES)}")
    for i in range(repeat):
        last = dev.type == "cuda" and i == repeat - 1
        if last:                                # ncu --nvtx-include profile/ takes this call's kernels
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("profile")
        run()
        if last:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    if sys.argv[1:] == ["--smoke"]:
        for name in CASES:
            main(name, torch.device("cpu"), ctx=4096, batch=2, rows=4, repeat=1)
            print("smoke ok:", name)
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "")
