"""Correctness of the Triton kernels on a GPU against their fp32 references, at serving sizes.

``python scripts/gpu_kernel_checks.py [--out FILE]`` runs every case, prints one line per
case and exits 1 if any fails. Uses the same comparators as the CPU tests (``kernels.testing``):
top-k as sets with gathered scores, outputs NaN-poisoned before each run, NaN in unowned cache slots.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from kernel_research.indexer_fused import fused_chunks

from sglang_indexcache.atomic import atomic_write_json
from sglang_indexcache.kernels import indexer_topk_decode, indexer_topk_prefill, reference as ref, sparse_mla_decode, testing

SENTINEL = -7


def _tie_free(q, k):
    q[:, 0] = 0
    q[:, 0, 0] = 1
    k[..., 0] = k[..., 0].abs() + 0.25


def check_prefill(dev, lens, h, topk, fp8=None, fused=None, **kw):
    """``fp8``: None (bf16), "keys" (e4m3 keys + per-token scales, bf16 queries) or "both";
    ``fused``: keywords of ``kernel_research.indexer_fused.fused_chunks`` (the fused variant)."""
    if fused:
        kw["chunk_topk"] = fused_chunks(**fused)
    t, d = sum(lens), 128
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k = torch.randn(t, h, d, device=dev), torch.randn(t, d, device=dev)
    _tie_free(q, k)
    k_scale = None
    if fp8:
        k, k_scale = k.to(torch.float8_e4m3fn), torch.rand(t, device=dev) + 0.5
        q = q.to(torch.float8_e4m3fn) if fp8 == "both" else q.bfloat16()
    else:
        q, k = q.bfloat16(), k.bfloat16()
    w = (torch.rand(t, h, device=dev) + 0.1) * torch.where(torch.rand(t, h, device=dev) < 0.3, -1.0, 1.0)
    w[:, 0] = w[:, 0].abs()
    out = torch.full((t, topk), SENTINEL, dtype=torch.int32, device=dev)
    indexer_topk_prefill(q, w, k, cu, topk, d ** -0.5, k_scale, out=out, **kw)
    assert not (out == SENTINEL).any(), "outputs never written"
    # Hopper's fp8 tensor cores add products with fewer mantissa bits than fp32 (about 14, per the
    # DeepSeek-V3 report): scores of fp8 x fp8 differ from the fp32 reference by ~1e-3 relative.
    tol = 1e-2 if fp8 == "both" else 1e-4
    testing.check_topk(out, ref.indexer_scores_prefill_ref(q, w, k, cu, d ** -0.5, k_scale), topk, tol)


def check_topk_rows(dev, rows, n, topk, ties=False, sampled=False):
    """A top-k kernel alone on long rows (a column slice of a wider, NaN-poisoned buffer): the radix
    select, or with ``sampled`` the sampled-threshold one."""
    from sglang_indexcache.kernels.topk import topk_rows
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    buf = torch.full((rows, n + 64), float("nan"), device=dev)
    vals = torch.randint(0, 50, (rows, n), device=dev).float() if ties else torch.randn(rows, n, device=dev)
    lengths = torch.randint(1, n + 1, (rows,), device=dev, dtype=torch.int32)
    lengths[0] = n
    for r in range(rows):
        buf[r, :int(lengths[r])] = vals[r, :int(lengths[r])]
    out = (topk_rows_sampled if sampled else topk_rows)(buf[:, :n], topk, lengths=lengths)
    dense = torch.where(torch.arange(n, device=dev)[None, :] < lengths[:, None].long(), buf[:, :n], float("-inf"))
    testing.check_topk(out, dense, topk, 0.0)


def check_decode_graph(dev, seq_lens, h, topk):
    """Decode captured in a CUDA graph (``max_seq_len`` from the page table: no host sync), replayed
    after the inputs change in place."""
    b, d = len(seq_lens), 128
    cache, page_table = testing.make_paged_cache(seq_lens, d)
    cache, page_table = cache.to(dev).bfloat16(), page_table.to(dev)
    q = torch.randn(b, h, d, device=dev).bfloat16()
    w = torch.rand(b, h, device=dev) + 0.1
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    out = torch.full((b, topk), SENTINEL, dtype=torch.int32, device=dev)
    bound = page_table.shape[1] * 64
    run = lambda: indexer_topk_decode(q, w, cache, page_table, lens, topk, 0.5, out=out, max_seq_len=bound)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    q.copy_(torch.randn_like(q, dtype=torch.float32).bfloat16())
    out.fill_(SENTINEL)
    graph.replay()
    torch.cuda.synchronize()
    assert not (out == SENTINEL).any(), "outputs never written"
    testing.check_topk(out, ref.indexer_scores_decode_ref(q, w, cache, page_table, lens, 0.5), topk, 1e-4)


def check_decode(dev, seq_lens, h, topk, fp8=False, **kw):
    b, d = len(seq_lens), 128
    cache, page_table = testing.make_paged_cache(seq_lens, d)
    q = torch.randn(b, h, d)
    _tie_free(q, cache)
    cache, page_table, q = cache.to(dev), page_table.to(dev), q.to(dev).bfloat16()
    k_scale = None
    if fp8:
        cache, k_scale = cache.to(torch.float8_e4m3fn), torch.rand(cache.shape[:2], device=dev) + 0.5
    else:
        cache = cache.bfloat16()
    w = torch.rand(b, h, device=dev) + 0.1
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    out = torch.full((b, topk), SENTINEL, dtype=torch.int32, device=dev)
    indexer_topk_decode(q, w, cache, page_table, lens, topk, 0.5, k_scale=k_scale, out=out, **kw)
    assert not (out == SENTINEL).any(), "outputs never written"
    testing.check_topk(out, ref.indexer_scores_decode_ref(q, w, cache, page_table, lens, 0.5, k_scale), topk, 1e-4)


def check_mla(dev, seq_lens, h, topk, empty_last=False, **kw):
    b = len(seq_lens)
    cache, page_table = testing.make_paged_cache(seq_lens, 576, torch.bfloat16)
    cache, page_table = cache.to(dev), page_table.to(dev)
    q = torch.randn(b, h, 576, device=dev).bfloat16()
    idx = torch.full((b, topk), -1, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        sel = torch.randperm(n)[:topk].int()
        idx[i, :sel.numel()] = sel
        idx[i] = idx[i][torch.randperm(topk)]
    if empty_last:
        idx[-1] = -1
    idx = idx.to(dev)
    out = torch.full((b, h, 512), float("nan"), dtype=torch.bfloat16, device=dev)
    lse = torch.full((b, h), float("nan"), device=dev)
    sparse_mla_decode(q, cache, page_table, idx, 576 ** -0.5, return_lse=True, out=out, lse=lse, **kw)
    exp_out, exp_lse = ref.sparse_mla_decode_ref(q, cache, page_table, idx, 576 ** -0.5, return_lse=True)
    testing.assert_close(out, exp_out, 2e-3, 1e-2, name="out")
    testing.assert_close(lse, exp_lse, 1e-4, 1e-4, name="lse")


CASES = [
    ("prefill ragged, 64 heads, top-k 2048", check_prefill, dict(lens=[3000, 1000, 17], h=64, topk=2048)),
    ("prefill, key chunks of 1024 merged", check_prefill, dict(lens=[2500], h=32, topk=512, key_chunk=1024)),
    ("prefill fp8 queries and keys, 64 heads", check_prefill, dict(lens=[3000, 900], h=64, topk=2048, fp8="both")),
    ("prefill fp8 keys, bf16 queries, 32 heads", check_prefill, dict(lens=[2600], h=32, topk=2048, fp8="keys")),
    ("prefill 20 heads, keys-major products", check_prefill, dict(lens=[2100, 33], h=20, topk=2048,
                                                                   keys_major=True)),
    ("prefill torch.topk selector", check_prefill, dict(lens=[2300], h=32, topk=2048, selector="torch")),
    ("prefill radix selector, 9000 tokens", check_prefill, dict(lens=[9000], h=32, topk=2048, selector="radix")),
    ("prefill 12000 tokens (sampled top-k path)", check_prefill, dict(lens=[12000, 300], h=64, topk=2048)),
    ("prefill fused chunks, 64 heads", check_prefill, dict(lens=[6000], h=64, topk=2048, fused=dict(fused_from=4096),
                                                           budget_bytes=4 * 6000 * 1024)),
    ("prefill fused chunks, fp8 q+k, 32 heads, 2 requests", check_prefill,
     dict(lens=[5000, 4500], h=32, topk=2048, fp8="both", fused=dict(fused_from=4096), budget_bytes=4 * 2 * 5000 * 512)),
    ("prefill fused chunks, 20 heads, fallback forced", check_prefill,
     dict(lens=[5200], h=20, topk=2048, fused=dict(fused_from=4096, capacity=2100), budget_bytes=4 * 5200 * 512)),
    ("sampled top-k, 64 rows of 200K", check_topk_rows, dict(rows=64, n=200000, topk=2048, sampled=True)),
    ("sampled top-k, ties (fallback rows)", check_topk_rows, dict(rows=8, n=100000, topk=2048, ties=True,
                                                                   sampled=True)),
    ("sampled top-k, 1 row of 200K", check_topk_rows, dict(rows=1, n=200000, topk=2048, sampled=True)),
    ("top-k kernel, 4 rows up to 200K", check_topk_rows, dict(rows=4, n=200000, topk=2048)),
    ("top-k kernel, heavy ties (50 values)", check_topk_rows, dict(rows=3, n=100000, topk=2048, ties=True)),
    ("top-k kernel, 300 rows of <= 5000, k 2048", check_topk_rows, dict(rows=300, n=5000, topk=2048)),
    ("decode in a CUDA graph, max_seq_len bound", check_decode_graph, dict(seq_lens=[70000, 5, 3000], h=64,
                                                                            topk=2048)),
    ("decode bf16, 64 heads, 70K context", check_decode, dict(seq_lens=[5000, 70000, 100, 2048], h=64, topk=2048)),
    ("decode fp8 keys, 32 heads", check_decode, dict(seq_lens=[9000, 3000], h=32, topk=2048, fp8=True)),
    ("decode merge over chunks", check_decode, dict(seq_lens=[20000], h=64, topk=2048, key_chunk=4096)),
    ("mla 128 heads, b=8 (split-K auto)", check_mla, dict(seq_lens=[10000] * 7 + [300], h=128, topk=2048)),
    ("mla 64 heads, empty request, 1 split", check_mla,
     dict(seq_lens=[5000, 1500, 4000], h=64, topk=2048, empty_last=True, num_splits=1)),
    ("mla 16 heads, b=1, split-K 16", check_mla, dict(seq_lens=[3000], h=16, topk=2048, num_splits=16)),
]


def run_checks(device: str = "cuda") -> list[dict]:
    results = []
    for name, fn, kw in CASES:
        torch.manual_seed(len(results))
        t0 = time.perf_counter()
        try:
            fn(device, **kw)
            ok, msg = True, ""
        except Exception as exc:                                   # noqa: BLE001 - report and go on
            ok, msg = False, f"{type(exc).__name__}: {str(exc)[:1000]}"
        results.append({"case": name, "ok": ok, "message": msg, "seconds": round(time.perf_counter() - t0, 2)})
        print(("PASS " if ok else "FAIL ") + name + ("" if ok else ": " + msg), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    results = run_checks(args.device)
    if args.out:
        atomic_write_json(args.out, {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                                     "results": results})
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
