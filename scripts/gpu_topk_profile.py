"""Stage-by-stage GPU times of the sampled top-k (kernels/topk_sampled.py) on one prefill chunk of
scores, and a few launch variants: ``python3 scripts/gpu_topk_profile.py OUT.json`` (run from a tree
where ``sglang_indexcache.kernels`` imports, e.g. inside scripts/gpu_indexer.sh's layout)."""

import sys

import torch
import triton

from sglang_indexcache.atomic import atomic_write_json
from sglang_indexcache.kernels import topk_sampled as ts
from sglang_indexcache.kernels.topk import topk_rows

K = 2048


def ms(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=40)


def main(path):
    rows = []
    for n_rows, n in ((2048, 131072), (8192, 32768), (64, 200000)):
        p0 = n - n_rows if n_rows < n else 0
        x = torch.randn(n_rows, n, device="cuda")
        lens = (p0 + torch.arange(n_rows, device="cuda") + 1).clamp(max=n).int()
        tau = torch.empty(n_rows, dtype=torch.int32, device="cuda")
        exh = torch.empty_like(tau)
        cnt = torch.zeros_like(tau)
        cap = 4 * K
        vals = torch.empty(n_rows, cap, device="cuda")
        cols = torch.empty(n_rows, cap, dtype=torch.int32, device="cuda")
        base = {"rows": n_rows, "n": n}
        for warps in (4, 8):
            rows.append({**base, "stage": f"threshold w{warps}", "ms": ms(lambda: ts._threshold_kernel[(n_rows,)](
                x, lens, tau, exh, n, x.stride(0), 3 * K // 2, tau, HAS_LEN=True, S=ts.SAMPLE, num_warps=warps))})
        ts._threshold_kernel[(n_rows,)](x, lens, tau, exh, n, x.stride(0), 3 * K // 2, tau, HAS_LEN=True, S=ts.SAMPLE)
        for block, warps, parts in ((4096, 8, 1), (2048, 4, 1), (8192, 8, 1), (4096, 4, 1), (4096, 8, 4)):
            part_len = triton.cdiv(triton.cdiv(n, parts), block) * block

            def gather():
                cnt.zero_()
                ts._gather_kernel[(n_rows, triton.cdiv(n, part_len))](x, lens, tau, vals, cols, cnt, n, x.stride(0),
                                                                      part_len, cap, HAS_LEN=True, BLOCK=block,
                                                                      num_warps=warps)
            rows.append({**base, "stage": f"gather b{block} w{warps} parts{parts}", "ms": ms(gather)})
        gather()
        c = cnt.clone()
        rows.append({**base, "stage": "candidates per row (mean, max)", "ms": 0.0,
                     "mean": float(c.float().mean()), "max": int(c.max())})
        for warps in (4, 8, 16):
            rows.append({**base, "stage": f"topk_rows on candidates w{warps}", "ms": ms(
                lambda: topk_rows(vals, K, lengths=c.clamp(max=cap), num_warps=warps))})
        zero = torch.zeros_like(lens)
        rows.append({**base, "stage": "fallback call, no row", "ms": ms(lambda: topk_rows(x, K, lengths=zero))})
        rows.append({**base, "stage": "whole topk_rows_sampled", "ms": ms(lambda: ts.topk_rows_sampled(x, K, lengths=lens))})
        for target in (1.25, 2.0):
            rows.append({**base, "stage": f"whole, target {target} k", "ms": ms(
                lambda: ts.topk_rows_sampled(x, K, lengths=lens, target=int(target * K)))})
        rows.append({**base, "stage": "whole, no fallback", "ms": ms(
            lambda: ts.topk_rows_sampled(x, K, lengths=lens, fallback=False))})
        del x, vals, cols
        torch.cuda.empty_cache()
    for r in rows:
        print(r, flush=True)
    atomic_write_json(path, rows)


if __name__ == "__main__":
    main(sys.argv[1])
