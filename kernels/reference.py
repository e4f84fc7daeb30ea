"""Pure-PyTorch float32 references: the specification of every kernel in this package.

Each ``*_ref`` has the signature of its Triton kernel (``indexer_topk.py``, ``sparse_mla_decode.py``)
and is the answer the kernel is tested against. They are also the CPU path of the rest of the project
where Triton is not wanted. Dimension names, used identically in docstrings, code and tests:

``b`` requests, ``t`` tokens of a ragged batch, ``h`` heads, ``d`` index head dim (128),
``d_qk`` MLA query/key dim (576 = latent 512 + rope 64), ``d_v`` value dim (512), ``topk`` selected
tokens, ``num_pages`` physical pages of a paged cache, ``max_pages`` page-table width, page size 64.

Token indices are int32 positions *within the request* (0 .. seq_len-1), padded with -1.
A paged cache stores position ``p`` of request ``i`` at ``cache[page_table[i, p // 64], p % 64]``.
"""

from __future__ import annotations

import torch

PAGE_SIZE = 64

__all__ = [
    "PAGE_SIZE", "paged_rows", "select_topk", "index_scores", "gathered_attention",
    "indexer_scores_prefill_ref", "indexer_topk_prefill_ref", "indexer_scores_decode_ref",
    "indexer_topk_decode_ref", "sparse_mla_decode_ref", "set_overlap",
]


def paged_rows(page_table_row: torch.Tensor, positions: torch.Tensor, page_size: int = PAGE_SIZE):
    """Flat cache rows ``[n]`` (int64) of ``positions`` [n] (valid, >= 0) for one request's page table."""
    pos = positions.long()
    return page_table_row.long()[pos // page_size] * page_size + pos % page_size


def select_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices ``[rows, topk]`` int32 of the ``topk`` largest of ``scores`` [rows, n] fp32.

    ``-inf`` marks a non-candidate: its slot becomes -1, as do slots beyond ``n``.
    """
    rows, n = scores.shape
    out = torch.full((rows, topk), -1, dtype=torch.int32, device=scores.device)
    k = min(topk, n)
    if k == 0:
        return out
    vals, idx = torch.topk(scores, k, dim=-1)                    # [rows, k]
    out[:, :k] = torch.where(vals == float("-inf"), -1, idx).to(torch.int32)
    return out


def index_scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The lightning-indexer formula: ``I[.., r, n] = scale * sum_h w[.., r, h] * relu(q[.., r, h] . k[.., n])``.

    Args:
        q: ``[.., r, h, d]`` index queries (leading dims, e.g. a batch, broadcast with ``k``'s).
        weights: ``[.., r, h]`` per-query per-head weights.
        k: ``[.., n, d]`` index keys, q's dtype.
        scale: score scale (> 0, so ``scale * relu(x) = relu(scale * x)``).

    Returns:
        ``[.., r, n]`` fp32, no mask. The products ``q . k`` run in q's dtype and the head sum in
        ``weights``' dtype: the references pass fp32 throughout; callers after speed (the benchmark's
        PyTorch kernel set) pass bf16. Differentiable (used for indexer training).
    """
    logits = torch.einsum("...rhd,...nd->...rhn", q, k).relu_()                  # [.., r, h, n]
    return torch.einsum("...rhn,...rh->...rn", logits.to(weights.dtype), weights).float() * scale


def gathered_attention(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, sm_scale: float, d_v: int,
                       return_lse: bool = False):
    """Sparse attention of each query row over its own gathered key rows (absorbed MLA form).

    Args:
        q: ``[r, h, d_qk]`` queries, kv's dtype.
        kv: ``[r, n, d_qk]`` the ``n`` selected cache rows of each query; K = the whole row, V = its
            first ``d_v`` dims.
        valid: ``[r, n]`` bool, False where a slot holds no key (a -1 index, a future token).
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value dim.
        return_lse: also return the log-sum-exp.

    Returns:
        ``out [r, h, d_v]`` in kv's dtype, ``softmax(sm_scale * q K^T) V`` over the valid slots (products
        in kv's dtype, softmax in fp32), and with ``return_lse`` also ``lse [r, h]`` fp32. A row
        with no valid slot gives ``out = 0`` and ``lse = -inf``.
    """
    logits = torch.bmm(q, kv.transpose(1, 2)).float() * sm_scale                # [r, h, n]
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0).to(kv.dtype)          # no valid slot -> 0
    out = torch.bmm(probs, kv[..., :d_v])                                        # [r, h, d_v]
    return (out, torch.logsumexp(logits, dim=-1)) if return_lse else out


def indexer_scores_prefill_ref(q, weights, k, cu_seqlens, scale: float, k_scale=None) -> torch.Tensor:
    """Dense causal index scores ``[t, max_len]`` fp32 of a ragged batch (small sizes: tests, CPU).

    Row ``t`` (position ``p`` in its request) holds ``I[t, s]`` for positions ``s <= p`` and -inf
    elsewhere. Argument shapes as in ``indexer_topk_prefill_ref``.
    """
    if k_scale is not None:
        k = k.float() * k_scale.float()[:, None]                   # fp8 value x per-token scale
    bounds = cu_seqlens.tolist()
    max_len = max([e - s for s, e in zip(bounds[:-1], bounds[1:])], default=0)
    out = torch.full((q.shape[0], max_len), float("-inf"), dtype=torch.float32, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n <= 0:
            continue
        scores = index_scores(q[start:end].float(), weights[start:end].float(), k[start:end].float(), scale)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out[start:end, :n] = scores.masked_fill(~causal, float("-inf"))
    return out


def indexer_topk_prefill_ref(q, weights, k, cu_seqlens, topk: int, scale: float,
                             k_scale=None) -> torch.Tensor:
    """Lightning-indexer top-k for a ragged prefill batch (no cached prefix).

    Args:
        q: ``[t, h, d]`` bf16/fp32 (or float8_e4m3fn: fold its per-(token, head) scale into
            ``weights``, as ``relu(a x) = a relu(x)`` for ``a > 0``), index queries of the batch.
        weights: ``[t, h]`` fp32, per-token per-head weights ``w[t, h]``.
        k: ``[t, d]`` bf16/fp32, or float8_e4m3fn with ``k_scale``, index keys of the same tokens.
        cu_seqlens: ``[b+1]`` int32, request i owns tokens ``cu_seqlens[i] .. cu_seqlens[i+1]-1``.
        topk: number of indices per token (<= 2048).
        scale: score scale.
        k_scale: ``[t]`` fp32 per-token scales (> 0) of fp8 keys (key = fp8 value * scale).

    Returns:
        ``[t, topk]`` int32: positions within the request of the ``topk`` largest
        ``I[t, s] = scale * sum_h w[t, h] * relu(q[t, h] . k[s])`` over ``s <= t`` (causal, same
        request), in no guaranteed order; -1 in the slots beyond the ``position + 1`` candidates.
    """
    return select_topk(indexer_scores_prefill_ref(q, weights, k, cu_seqlens, scale, k_scale), topk)


def _dequant_keys(k_cache, k_scale, rows):
    """Keys ``[n, d]`` fp32 at flat ``rows`` of the paged cache, times the per-token fp8 scale if given."""
    keys = k_cache.reshape(-1, k_cache.shape[-1])[rows].float()  # [n, d]
    if k_scale is not None:
        keys = keys * k_scale.reshape(-1)[rows].float()[:, None]
    return keys


def indexer_scores_decode_ref(q, weights, k_cache, page_table, seq_lens, scale: float,
                              k_scale=None) -> torch.Tensor:
    """Dense index scores ``[b, max(seq_lens)]`` fp32 of decode queries, -inf past each seq_len.

    Argument shapes as in ``indexer_topk_decode_ref``.
    """
    b = q.shape[0]
    width = max(int(seq_lens.max()) if b else 0, 0)
    out = torch.full((b, width), float("-inf"), dtype=torch.float32, device=q.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue
        rows = paged_rows(page_table[i], torch.arange(n, device=q.device))
        keys = _dequant_keys(k_cache, k_scale, rows)              # [n, d]
        out[i, :n] = index_scores(q[i:i + 1].float(), weights[i:i + 1].float(), keys, scale)[0]
    return out


def indexer_topk_decode_ref(q, weights, k_cache, page_table, seq_lens, topk: int, scale: float,
                            k_scale=None) -> torch.Tensor:
    """Lightning-indexer top-k for one decode query per request against a paged index-K cache.

    Args:
        q: ``[b, h, d]`` bf16/fp32, the new token's index queries.
        weights: ``[b, h]`` fp32.
        k_cache: ``[num_pages, 64, d]`` bf16/fp32, or float8_e4m3fn with ``k_scale``.
        page_table: ``[b, max_pages]`` int32, logical page j of request i -> physical page.
        seq_lens: ``[b]`` int32, cached tokens of each request (the query attends to all of them).
        topk: number of indices per request.
        scale: score scale.
        k_scale: ``[num_pages, 64]`` fp32 per-token scales of an fp8 cache (key = fp8 value * scale).

    Returns:
        ``[b, topk]`` int32 positions ``0 .. seq_len-1`` of the largest scores, -1 padded.
    """
    scores = indexer_scores_decode_ref(q, weights, k_cache, page_table, seq_lens, scale, k_scale)
    return select_topk(scores, topk)


def sparse_mla_decode_ref(q, kv_cache, page_table, indices, sm_scale: float, d_v: int = 512,
                          return_lse: bool = False):
    """Absorbed MLA attention of each request's query over its selected tokens in a paged latent cache.

    Args:
        q: ``[b, h, d_qk]`` bf16/fp32, absorbed query (latent ``d_v`` + rope).
        kv_cache: ``[num_pages, 64, d_qk]`` bf16/fp32; K = the whole row, V = its first ``d_v`` dims.
        page_table: ``[b, max_pages]`` int32.
        indices: ``[b, topk]`` int32 positions within the request; -1 entries are skipped.
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value dim (512).
        return_lse: also return the log-sum-exp.

    Returns:
        ``out [b, h, d_v]`` in q's dtype, ``softmax(sm_scale * q K^T) V`` over the valid indices, and
        with ``return_lse`` also ``lse [b, h]`` fp32 (natural log of ``sum exp(sm_scale * q . k)``).
        A request with no valid index gives ``out = 0`` and ``lse = -inf``.
    """
    b, h, _ = q.shape
    out = torch.zeros(b, h, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h), float("-inf"), dtype=torch.float32, device=q.device)
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    for i in range(b):
        sel = indices[i][indices[i] >= 0]                          # [n]
        if sel.numel() == 0:
            continue
        kv = flat[paged_rows(page_table[i], sel)].float()[None]    # [1, n, d_qk]
        valid = torch.ones(kv.shape[:2], dtype=torch.bool, device=q.device)
        o, l = gathered_attention(q[i:i + 1].float(), kv, valid, sm_scale, d_v, return_lse=True)
        out[i], lse[i] = o[0], l[0]                                # [h, d_v], [h]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How top-k results are compared, as sets (the one definition): per row, the share of ``a``'s
    valid indices (>= 0) that ``b`` holds, ``[rows]`` fp32.

    ``a, b [rows, k]`` integer index sets without repeats, -1 padded (rows with no valid index of
    ``a`` count 1.0). With ``a`` the exact top-k, this is the recall of ``b``."""
    merged = torch.cat([a.long(), b.long()], 1).sort(1).values      # [rows, 2k]
    both = ((merged[:, 1:] == merged[:, :-1]) & (merged[:, 1:] >= 0)).sum(1).float()
    valid = (a >= 0).sum(1).float()
    return torch.where(valid > 0, both / valid.clamp(min=1), torch.ones_like(valid))
