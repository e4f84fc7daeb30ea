"""Where the fused prefill chunk's time goes (GPU): one 2048-row chunk at 128K, 64 index heads.
``python3 scripts/gpu_fused_profile.py`` from a tree where ``sglang_indexcache.kernels`` imports."""

import torch
import triton
from kernel_research import indexer_fused as f

from sglang_indexcache.kernels import indexer_topk_prefill
from sglang_indexcache.kernels.indexer_scores import prefill_scores

N, H, D, K, ROWS = 131072, 64, 128, 2048, 2048


def main():
    q = torch.randn(N, H, D, device="cuda").bfloat16()
    k = torch.randn(N, D, device="cuda").bfloat16()
    w = torch.rand(N, H, device="cuda")
    cu = torch.tensor([0, N], dtype=torch.int32, device="cuda")
    p0 = N - ROWS
    calls = {"fallback": 0}
    orig = f.prefill_scores

    def counted(*a, **kw):
        calls["fallback"] += 1
        return orig(*a, **kw)

    f.prefill_scores = counted
    buf = torch.empty(1, ROWS, N, device="cuda")
    print("score kernel, chunk", triton.testing.do_bench(lambda: prefill_scores(q, w, k, cu, 0.1, buf, p0, ROWS)))
    for kw in ({"atomic": True}, {"atomic": False}, {"atomic": True, "sample": 1024}):
        calls["fallback"] = 0
        f.fused_prefill_chunk(q, w, k, cu, 0.1, p0, ROWS, K, **kw)
        fb = calls["fallback"]
        ms = triton.testing.do_bench(lambda: f.fused_prefill_chunk(q, w, k, cu, 0.1, p0, ROWS, K, **kw))
        print("fused chunk", kw, "ms", ms, "fallback on first call", fb)
    f.prefill_scores = orig
    for n in (65536, 131072):
        qq, kk, ww = q[:n], k[:n], w[:n]
        c = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        for fused in (None, 16384):
            hook = f.fused_chunks(fused) if fused else None
            ms = triton.testing.do_bench(lambda: indexer_topk_prefill(qq, ww, kk, c, K, 0.1, chunk_topk=hook),
                                         rep=200)
            print("prefill", n, "fused_from", fused, "ms", ms)


if __name__ == "__main__":
    main()
