"""The diagnostic index sets of the sparse MLA studies (``scripts/mla_variants.py``,
``scripts/ncu_targets.py``): random top-k sets, one request's consecutive rows, or one L2-resident
set shared by every request. Research only: ``bench kernels`` draws its own random sets.
"""

from __future__ import annotations

import math

import torch

from sglang_indexcache.bench.shapes import D_QK, TOPK

DATA_MODES = ("random", "contiguous", "l2")


def mla_inputs(b: int, ctx: int, heads: int, shared_table: bool, device, data: str = "random"):
    """q [b, h, 576], cache [pages, 64, 576], page_table [b, pages/req], idx [b, topk], rows [b, topk].

    ``data``: ``random`` top-k sets over a random page table; ``contiguous``: each request's rows
    are consecutive cache rows (identity page table, indices 0..topk-1 of its own pages); ``l2``:
    every request uses the same page table row and indices (one request's rows, L2-resident)."""
    if data not in DATA_MODES:
        raise ValueError(f"data must be one of {DATA_MODES}, got {data!r}")
    per = math.ceil(ctx / 64)
    if data != "random":
        n_req = 1 if (shared_table or data == "l2") else b
        cache = torch.randn(n_req * per, 64, D_QK, device=device).bfloat16()
        table = torch.arange(n_req * per, device=device, dtype=torch.int32).view(n_req, per)
        table = table.expand(b, -1).contiguous() if n_req == 1 else table
        one = torch.randperm(ctx, device=device)[:TOPK] if data == "l2" else torch.arange(TOPK, device=device)
        idx = one.int().expand(b, -1).contiguous()
        rows = (table.long().gather(1, idx.long() // 64) * 64 + idx.long() % 64).int()
        q = torch.randn(b, heads, D_QK, device=device).bfloat16()
        return q, cache, table, idx, rows
    n_req = 1 if shared_table else b
    cache = torch.randn(n_req * per, 64, D_QK, device=device).bfloat16()
    table = torch.randperm(n_req * per, device=device, dtype=torch.int32).view(n_req, per)
    if shared_table:
        table = table.expand(b, -1).contiguous()                    # one request's row per query
    idx = torch.empty(b, TOPK, dtype=torch.int32, device=device)
    for a in range(0, b, 256):                                      # bounded memory for the draw
        idx[a:a + 256] = torch.rand(min(256, b - a), ctx, device=device).topk(TOPK, dim=1).indices.int()
    rows = (table.long().gather(1, idx.long() // 64) * 64 + idx.long() % 64).int()
    q = torch.randn(b, heads, D_QK, device=device).bfloat16()
    return q, cache, table, idx, rows
