"""Stand-in references with the signatures of ``sglang_indexcache.kernels`` (KERNELS_API).

Used only while the kernels package does not export its functions yet (see ``ops.load_api``); the
kernels package's own ``*_ref`` functions are the specification and replace these as soon as they
are importable. Indices are int32 positions within the request, -1 padded; page size 64.
"""

from __future__ import annotations

import torch

PAGE_SIZE = 64


def select_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """``[rows, topk]`` int32 indices of the largest ``scores`` [rows, n]; -inf and missing -> -1."""
    rows, n = scores.shape
    out = torch.full((rows, topk), -1, dtype=torch.int32, device=scores.device)
    k = min(topk, n)
    if k:
        vals, idx = torch.topk(scores, k, dim=-1)                   # [rows, k]
        out[:, :k] = torch.where(vals == float("-inf"), -1, idx).to(torch.int32)
    return out


def _rows(page_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    pos = positions.long()
    return page_row.long()[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE


def indexer_topk_prefill_ref(q, weights, k, cu_seqlens, topk, scale):
    """q [t, h, d], weights [t, h] fp32, k [t, d], cu_seqlens [b+1] int32 -> [t, topk] int32."""
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n <= 0:
            continue
        logits = torch.einsum("thd,sd->ths", q[start:end].float(), k[start:end].float()).relu()
        scores = torch.einsum("ths,th->ts", logits, weights[start:end].float()) * scale  # [n, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out[start:end] = select_topk(scores.masked_fill(~causal, float("-inf")), topk)
    return out


def indexer_topk_decode_ref(q, weights, k_cache, page_table, seq_lens, topk, scale, k_scale=None):
    """q [b, h, d], weights [b, h], k_cache [pages, 64, d], page_table [b, max_pages] -> [b, topk]."""
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    flat = k_cache.reshape(-1, k_cache.shape[-1])
    for i, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        rows = _rows(page_table[i], torch.arange(n, device=q.device))
        keys = flat[rows].float()                                   # [n, d]
        if k_scale is not None:
            keys = keys * k_scale.reshape(-1)[rows].float()[:, None]
        scores = (q[i].float() @ keys.T).relu().T @ weights[i].float() * scale  # [n]
        out[i] = select_topk(scores[None], topk)[0]
    return out


def sparse_mla_decode_ref(q, kv_cache, page_table, indices, sm_scale, d_v=512, return_lse=False):
    """q [b, h, d_qk], kv_cache [pages, 64, d_qk], indices [b, topk] -> out [b, h, d_v] (+ lse [b, h])."""
    b, h, _ = q.shape
    out = torch.zeros(b, h, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h), float("-inf"), dtype=torch.float32, device=q.device)
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    for i in range(b):
        sel = indices[i][indices[i] >= 0]
        if sel.numel() == 0:
            continue
        kv = flat[_rows(page_table[i], sel)].float()               # [n, d_qk]
        logits = q[i].float() @ kv.T * sm_scale                     # [h, n]
        lse[i] = torch.logsumexp(logits, dim=-1)
        out[i] = torch.softmax(logits, dim=-1) @ kv[:, :d_v]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
