"""Lightning-indexer top-k (Triton) for ragged prefill and paged decode.

``I[t, s] = scale * sum_h w[t, h] * relu(q[t, h] . k[s])``; the specification is
``reference.indexer_topk_prefill_ref`` / ``indexer_topk_decode_ref``.

How it streams: the score kernels of ``indexer_scores.py`` write one tile of ``[rows, keys]`` fp32
scores (a prefill walks its query positions in chunks so that a tile stays under ``budget_bytes``;
the full ``[t, t]`` matrix never exists), then ``topk_sampled.topk_rows_sampled`` picks each row's
top-k reading only the row's causal / cached length, about once (a sampled threshold, then an exact
radix select among the few candidates). With ``key_chunk`` smaller than the keys, tiles of
``key_chunk`` keys are selected one by one and merged into a running ``[rows, topk]``.
``selector`` (comparison points for benchmarks): ``"radix"`` runs ``topk.topk_rows`` on whole rows
(2-5 reads of each), ``"torch"`` ``torch.topk``. Variants that replace a prefill chunk's score tile
(the fused prefill of ``scripts/kernel_research/indexer_fused.py``) plug in through ``chunk_topk``;
this module never imports them.
"""

from __future__ import annotations

import torch

from .indexer_scores import decode_scores, prefill_scores
from .reference import PAGE_SIZE, select_topk

__all__ = ["indexer_topk_prefill", "indexer_topk_decode", "SELECTORS"]

DEFAULT_BUDGET_BYTES = 1 << 30
SELECTORS = ("triton", "radix", "torch")
NEG_INF = float("-inf")


def _select_torch(scores, topk: int, lengths):
    """``torch.topk`` over each row's first ``lengths[r]`` columns (the rest masked in place)."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    return select_topk(scores.masked_fill_(cols[None, :] >= lengths[:, None], NEG_INF), topk)


def _select(scores, topk: int, lengths, selector: str, check_fallback: bool = False, out=None):
    """Indices ``[rows, topk]`` int32 (-1 padded) of the largest of ``scores[r, :lengths[r]]``
    (``lengths`` int32, clamped to the columns), written into ``out`` when given."""
    if selector == "torch":
        idx = _select_torch(scores, topk, lengths)
        return idx if out is None else out.copy_(idx)
    if selector == "radix":
        from .topk import topk_rows

        return topk_rows(scores, topk, lengths=lengths, out=out)
    from .topk_sampled import topk_rows_sampled

    return topk_rows_sampled(scores, topk, lengths=lengths, check_fallback=check_fallback, out=out)


def _merge(best_v, best_i, tile, lengths, k0: int, topk: int, selector: str, check: bool):
    """Fold the top-k of ``tile`` (keys ``k0 ..``, rows valid up to ``lengths``) into the running best."""
    idx = _select(tile, topk, lengths, selector, check)             # [rows, topk] local, -1 padded
    vals = tile.gather(1, idx.clamp(min=0).long()).masked_fill_(idx < 0, NEG_INF)
    glob = torch.where(idx < 0, idx, idx + k0)
    if best_v is None:
        return vals, glob
    top_v, pos = torch.topk(torch.cat([best_v, vals], 1), topk, dim=1)
    return top_v, torch.cat([best_i, glob], 1).gather(1, pos)


def _select_tiles(score_tile, row_len, n_keys: int, topk: int, key_chunk: int, selector: str,
                  check: bool = False):
    """Top-k ``[rows, topk]`` over keys ``0 .. n_keys-1`` scored ``key_chunk`` at a time.

    ``score_tile(k0, n_cols)`` -> ``[rows, n_cols]`` fp32 (columns past a row's length unwritten);
    ``row_len [rows]`` int64: keys each row may select; ``check``: the sampled selector may read on
    the host whether any row needs its fallback (prefill; never in a CUDA graph).
    """
    if n_keys <= key_chunk:
        return _select(score_tile(0, n_keys), topk, row_len.to(torch.int32), selector, check)
    best_v = best_i = None
    for k0 in range(0, n_keys, key_chunk):
        n_cols = min(key_chunk, n_keys - k0)
        lengths = (row_len - k0).clamp(0, n_cols).to(torch.int32)
        best_v, best_i = _merge(best_v, best_i, score_tile(k0, n_cols), lengths, k0, topk, selector, check)
    return best_i.masked_fill_(best_v == NEG_INF, -1)


def _out_buffer(out, shape, device):
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.int32:
        raise ValueError(f"out must be int32 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out


def _check(topk: int, d: int, selector: str):
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    if d & (d - 1):
        raise ValueError(f"index head dim must be a power of two, got {d}")
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")


def indexer_topk_prefill(q, weights, k, cu_seqlens, topk: int, scale: float, k_scale=None, *,
                         key_chunk: int | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                         out=None, selector: str = "triton", chunk_topk=None, **config):
    """Triton version of ``reference.indexer_topk_prefill_ref`` (same arguments and result).

    ``q [t, h, d]``, ``weights [t, h]`` fp32, ``k [t, d]`` (bf16/fp32, or fp8 e4m3 with ``k_scale
    [t]``; ``q`` may then be fp8 too, its scales folded into ``weights``), ``cu_seqlens [b+1]`` int32
    -> ``[t, topk]`` int32 positions within the request, -1 padded, in no guaranteed order.
    Query positions are scored in chunks whose ``[rows, keys]`` fp32 tile fits ``budget_bytes``;
    ``key_chunk`` (default: all keys) splits the keys too, merging a running top-k. ``out`` [t, topk]
    int32 receives the result when given (every element is written). ``config``: launch settings of
    ``indexer_scores.PREFILL_CONFIG``. ``chunk_topk``: a hook for comparison variants, called for each
    chunk whose keys fit one tile as ``chunk_topk(q, weights, k, cu_seqlens, scale, p0, n_rows, topk,
    k_scale, **config)`` (contiguous inputs, fp32 weights, int32 ``cu_seqlens``); it returns the
    chunk's ``[b * n_rows, topk]`` (row ``i * n_rows + r`` = request i's position ``p0 + r``) or None
    to let the score tile and the selector run.
    """
    t, h, d = q.shape
    _check(topk, d, selector)
    out = _out_buffer(out, (t, topk), q.device)
    bounds = cu_seqlens.tolist()                                    # one host read of the batch layout
    host_lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()              # [b]
    b, max_len = len(host_lens), max(host_lens, default=0) if t else 0
    if max_len == 0:
        return out.fill_(-1)
    q, k, w, cu = q.contiguous(), k.contiguous(), weights.float().contiguous(), cu_seqlens.int().contiguous()
    key_chunk = key_chunk or max_len
    chunk_q = max(1, min(max_len, budget_bytes // (4 * b * min(key_chunk, max_len))))
    for p0 in range(0, max_len, chunk_q):
        n_rows = min(chunk_q, max_len - p0)
        n_keys = p0 + n_rows
        best = chunk_topk(q, w, k, cu, scale, p0, n_rows, topk, k_scale, **config) \
            if chunk_topk is not None and key_chunk >= n_keys else None
        if best is not None:
            _write_rows(out, best, bounds, host_lens, p0, n_rows)
            continue
        buf = torch.empty(b * n_rows * min(key_chunk, n_keys), dtype=torch.float32, device=q.device)
        pos = p0 + torch.arange(n_rows, device=q.device)           # [n_rows]
        row_len = torch.where(pos[None, :] < lens[:, None], pos[None, :] + 1, 0).reshape(-1)  # [b*n_rows]

        def score_tile(k0, n_cols, n_rows=n_rows, p0=p0, buf=buf):
            tile = buf[:b * n_rows * n_cols].view(b, n_rows, n_cols)
            prefill_scores(q, w, k, cu, scale, tile, p0, n_rows, k_scale=k_scale, k0=k0, **config)
            return tile.view(b * n_rows, n_cols)

        best = _select_tiles(score_tile, row_len, n_keys, topk, key_chunk, selector, check=True)
        _write_rows(out, best, bounds, host_lens, p0, n_rows)
    return out


def _write_rows(out, best, bounds, host_lens, p0: int, n_rows: int):
    """Copy chunk rows ``i * n_rows + r`` (request i, position p0 + r) that exist into ``out``."""
    for i, (start, n) in enumerate(zip(bounds[:-1], host_lens)):
        rows = min(n_rows, n - p0)
        if rows > 0:
            out[start + p0:start + p0 + rows] = best[i * n_rows:i * n_rows + rows]


def _key_bound(seq_lens, page_table, max_seq_len: int | None) -> int:
    """Keys to score per request: ``max_seq_len`` capped at ``max_pages * 64`` (no host sync), else
    ``seq_lens.max()`` read on the host."""
    if seq_lens.numel() == 0:
        return 0
    if max_seq_len is None:
        return int(seq_lens.max())
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len must be >= 0, got {max_seq_len}")
    return min(int(max_seq_len), page_table.shape[1] * PAGE_SIZE)


def indexer_topk_decode(q, weights, k_cache, page_table, seq_lens, topk: int, scale: float,
                        k_scale=None, *, key_chunk: int | None = None,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES, out=None,
                        max_seq_len: int | None = None, selector: str = "triton", **config):
    """Triton version of ``reference.indexer_topk_decode_ref`` (same arguments and result).

    ``q [b, h, d]``, ``weights [b, h]`` fp32, ``k_cache [num_pages, 64, d]`` bf16 (or fp8 e4m3 with
    ``k_scale [num_pages, 64]`` fp32), ``page_table [b, max_pages]`` int32, ``seq_lens [b]`` int32 ->
    ``[b, topk]`` int32 positions ``0 .. seq_len-1``, -1 padded (written into ``out`` when given).
    Whole rows are scored and selected at once when ``b * keys`` fp32 scores fit in ``budget_bytes``;
    otherwise ``key_chunk`` keys per tile (merged). ``max_seq_len`` (an upper bound of ``seq_lens``,
    capped at ``max_pages * 64``) sizes the work without reading ``seq_lens`` on the host, so the call
    can be captured in a CUDA graph; ``max_seq_len=page_table.shape[1] * 64`` is always valid.
    Default: ``seq_lens.max()`` (a host sync). ``config``: ``indexer_scores.DECODE_CONFIG`` keys.
    """
    b, h, d = q.shape
    _check(topk, d, selector)
    out = _out_buffer(out, (b, topk), q.device)
    n_keys = _key_bound(seq_lens, page_table, max_seq_len)
    if n_keys <= 0:
        return out.fill_(-1)
    if key_chunk is None:
        key_chunk = n_keys if 4 * b * n_keys <= budget_bytes else max(PAGE_SIZE, budget_bytes // (4 * b))
    q, w = q.contiguous(), weights.float().contiguous()
    pt, lens = page_table.int().contiguous(), seq_lens.int().contiguous()
    buf = torch.empty(b * min(key_chunk, n_keys), dtype=torch.float32, device=q.device)

    def score_tile(k0, n_cols):
        tile = buf[:b * n_cols].view(b, n_cols)
        return decode_scores(q, w, k_cache, pt, lens, scale, tile, k_scale=k_scale, k0=k0, **config)

    if n_keys <= key_chunk:                                         # one tile, selected into out: no extra launch
        return _select(score_tile(0, n_keys), topk, lens, selector, out=out)
    row_len = lens.long().clamp(0, n_keys)
    return out.copy_(_select_tiles(score_tile, row_len, n_keys, topk, key_chunk, selector))
