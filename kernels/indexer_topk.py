"""Lightning-indexer scores + streamed top-k (Triton), for ragged prefill and paged decode.

``I[t, s] = scale * sum_h w[t, h] * relu(q[t, h] . k[s])``; the specification is
``reference.indexer_topk_prefill_ref`` / ``indexer_topk_decode_ref``.

How it streams: a Triton kernel scores one tile of ``[rows, key_chunk]`` (causal and padding slots
get -inf), and ``torch.topk`` merges that tile with the running best ``[rows, topk]``. Prefill also
walks the query positions in chunks, so memory stays under ``budget_bytes`` for any context and the
full ``[t, t]`` score matrix never exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import dot_precision, interpreting, mma
from .reference import PAGE_SIZE

__all__ = ["indexer_topk_prefill", "indexer_topk_decode"]

DEFAULT_KEY_CHUNK = 65536
DEFAULT_BUDGET_BYTES = 1 << 30
NEG_INF = float("-inf")


@triton.jit
def _prefill_scores_kernel(
    q_ptr, w_ptr, k_ptr, cu_ptr, out_ptr,
    p0, k0, n_rows, n_cols, scale, H,
    stride_qt, stride_qh, stride_wt, stride_kt, stride_ob, stride_or,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[i, r, c] = score of query position p0+r against key position k0+c of request i (or -inf)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    i = tl.program_id(2)
    start = tl.load(cu_ptr + i)
    length = tl.load(cu_ptr + i + 1) - start
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # [BLOCK_M] local rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # [BLOCK_N] local cols
    pos = p0 + rows
    key = k0 + cols
    out_ptrs = out_ptr + i * stride_ob + rows[:, None] * stride_or + cols[None, :]
    out_mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    last_pos = tl.minimum(p0 + pid_m * BLOCK_M + BLOCK_M, length) - 1
    if k0 + pid_n * BLOCK_N > last_pos:                            # tile wholly above the diagonal
        tl.store(out_ptrs, tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32), mask=out_mask)
    else:
        row_ok = (rows < n_rows) & (pos < length)
        d = tl.arange(0, D)
        tok = (start + pos).to(tl.int64)
        kt = tl.load(k_ptr + (start + key).to(tl.int64)[:, None] * stride_kt + d[None, :],
                     mask=(key <= last_pos)[:, None], other=0.0)   # [BLOCK_N, D]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for h in range(H):
            qh = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                         mask=row_ok[:, None], other=0.0)         # [BLOCK_M, D]
            wh = tl.load(w_ptr + tok * stride_wt + h, mask=row_ok, other=0.0)  # [BLOCK_M]
            s = mma(qh, tl.trans(kt), UPCAST, PRECISION)         # [BLOCK_M, BLOCK_N]
            acc += tl.maximum(s, 0.0) * wh[:, None]
        valid = row_ok[:, None] & (key[None, :] <= pos[:, None])
        tl.store(out_ptrs, tl.where(valid, acc * scale, float("-inf")), mask=out_mask)


@triton.jit
def _decode_scores_kernel(
    q_ptr, w_ptr, kc_ptr, ks_ptr, pt_ptr, len_ptr, out_ptr,
    k0, n_cols, scale, H,
    stride_qb, stride_qh, stride_wb, stride_kc, stride_pt, stride_ob,
    HAS_SCALE: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[i, c] = score of request i's query against its cached position k0+c (or -inf)."""
    pid_n = tl.program_id(0)
    i = tl.program_id(1)
    length = tl.load(len_ptr + i)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # [BLOCK_N]
    key = k0 + cols
    out_ptrs = out_ptr + i * stride_ob + cols
    if k0 + pid_n * BLOCK_N >= length:
        tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=cols < n_cols)
    else:
        ok = (key < length) & (cols < n_cols)
        page = tl.load(pt_ptr + i * stride_pt + key // PAGE, mask=ok, other=0)
        row = page.to(tl.int64) * PAGE + key % PAGE                # [BLOCK_N] flat cache rows
        d = tl.arange(0, D)
        kt = tl.load(kc_ptr + row[:, None] * stride_kc + d[None, :], mask=ok[:, None], other=0.0)
        hs = tl.arange(0, BLOCK_H)
        qh = tl.load(q_ptr + i * stride_qb + hs[:, None] * stride_qh + d[None, :],
                     mask=(hs < H)[:, None], other=0.0)            # [BLOCK_H, D]
        if HAS_SCALE:
            kt = kt.to(qh.dtype)                                   # e4m3 -> bf16 is exact
        s = mma(qh, tl.trans(kt), UPCAST, PRECISION)               # [BLOCK_H, BLOCK_N]
        if HAS_SCALE:
            s = s * tl.load(ks_ptr + row, mask=ok, other=0.0)[None, :]
        wh = tl.load(w_ptr + i * stride_wb + hs, mask=hs < H, other=0.0)  # [BLOCK_H]
        score = tl.sum(tl.maximum(s, 0.0) * wh[:, None], axis=0) * scale
        tl.store(out_ptrs, tl.where(ok, score, float("-inf")), mask=cols < n_cols)


def _merge(best_v, best_i, tile, k0: int, topk: int):
    """Running top-k: merge ``tile`` [rows, n] (scores of keys k0..k0+n-1) into best [rows, topk]."""
    idx = torch.arange(k0, k0 + tile.shape[1], device=tile.device, dtype=torch.int32)
    vals = torch.cat([best_v, tile], dim=1)                        # [rows, topk + n]
    cand = torch.cat([best_i, idx.expand(tile.shape[0], -1)], dim=1)
    top_v, pos = torch.topk(vals, topk, dim=1)
    return top_v, torch.gather(cand, 1, pos)


def _stream_topk(score_tile, rows: int, n_keys: int, topk: int, key_chunk: int, device):
    """Top-k indices [rows, topk] int32 (-1 padded) over keys scored tile by tile by ``score_tile``."""
    best_v = torch.full((rows, topk), NEG_INF, dtype=torch.float32, device=device)
    best_i = torch.full((rows, topk), -1, dtype=torch.int32, device=device)
    if n_keys <= key_chunk and n_keys >= topk:                     # one tile: no merge needed
        best_v, pos = torch.topk(score_tile(0, n_keys), topk, dim=1)
        best_i = pos.to(torch.int32)
    else:
        for k0 in range(0, n_keys, key_chunk):
            best_v, best_i = _merge(best_v, best_i, score_tile(k0, min(key_chunk, n_keys - k0)), k0, topk)
    return best_i.masked_fill_(best_v == NEG_INF, -1)


def _out_buffer(out, shape, device):
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.int32:
        raise ValueError(f"out must be int32 {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out


def _check(topk: int, d: int):
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    if d & (d - 1):
        raise ValueError(f"index head dim must be a power of two, got {d}")


def indexer_topk_prefill(q, weights, k, cu_seqlens, topk: int, scale: float, *,
                         key_chunk: int | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                         block_m: int = 64, block_n: int = 64, out=None):
    """Triton version of ``reference.indexer_topk_prefill_ref`` (same arguments and result).

    ``q [t, h, d]``, ``weights [t, h]`` fp32, ``k [t, d]``, ``cu_seqlens [b+1]`` int32 ->
    ``[t, topk]`` int32 positions within the request, -1 padded, in no guaranteed order.
    ``key_chunk`` keys are scored per tile (default 65536); ``budget_bytes`` bounds the score tile;
    ``out`` [t, topk] int32 receives the result when given (every element is written).
    """
    t, h, d = q.shape
    _check(topk, d)
    out = _out_buffer(out, (t, topk), q.device)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()              # [b]
    b, max_len = lens.numel(), int(lens.max()) if t else 0
    if max_len == 0:
        return out.fill_(-1)
    for p0, n_rows, n_keys, score_tile in prefill_score_tiles(
            q, weights, k, cu_seqlens, scale, key_chunk=key_chunk, budget_bytes=budget_bytes,
            block_m=block_m, block_n=block_n):
        best = _stream_topk(score_tile, b * n_rows, n_keys, topk, key_chunk or DEFAULT_KEY_CHUNK, q.device)
        pos = p0 + torch.arange(n_rows, device=q.device)           # [n_rows]
        tok = cu_seqlens.long()[:-1, None] + pos[None, :]          # [b, n_rows] global token
        keep = (pos[None, :] < lens[:, None]).reshape(-1)
        out[tok.reshape(-1)[keep]] = best[keep]
    return out


def prefill_score_tiles(q, weights, k, cu_seqlens, scale: float, *, key_chunk: int | None = None,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES, block_m: int = 64, block_n: int = 64):
    """Yield ``(p0, n_rows, n_keys, score_tile)`` per chunk of query positions ``p0 .. p0+n_rows-1``.

    ``score_tile(k0, n_cols)`` runs the score kernel and returns ``[b * n_rows, n_cols]`` fp32: row
    ``i * n_rows + r`` scores request i's position ``p0 + r`` against its positions ``k0 ..``, -inf
    where not causal or past the request. The tile is reused: consume it before the next call.
    """
    t, h, d = q.shape
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()              # [b]
    b, max_len = lens.numel(), int(lens.max()) if t else 0
    key_chunk = key_chunk or DEFAULT_KEY_CHUNK
    q, k, w, cu = q.contiguous(), k.contiguous(), weights.float().contiguous(), cu_seqlens.int().contiguous()
    chunk_q = max(1, min(max_len, budget_bytes // (4 * b * min(key_chunk, max(max_len, 1)))))
    for p0 in range(0, max_len, chunk_q):
        n_rows = min(chunk_q, max_len - p0)
        buf = torch.empty(b * n_rows * min(key_chunk, p0 + n_rows), dtype=torch.float32, device=q.device)

        def score_tile(k0, n_cols, n_rows=n_rows, p0=p0, buf=buf):
            tile = buf[:b * n_rows * n_cols].view(b, n_rows, n_cols)
            grid = (triton.cdiv(n_cols, block_n), triton.cdiv(n_rows, block_m), b)
            _prefill_scores_kernel[grid](
                q, w, k, cu, tile, p0, k0, n_rows, n_cols, scale, h,
                q.stride(0), q.stride(1), w.stride(0), k.stride(0), tile.stride(0), tile.stride(1),
                D=d, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
                UPCAST=interpreting(_prefill_scores_kernel))
            return tile.view(b * n_rows, n_cols)

        yield p0, n_rows, p0 + n_rows, score_tile


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
                        k_scale=None, *, key_chunk: int | None = None, block_n: int = 64,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES, out=None, max_seq_len: int | None = None):
    """Triton version of ``reference.indexer_topk_decode_ref`` (same arguments and result).

    ``q [b, h, d]``, ``weights [b, h]`` fp32, ``k_cache [num_pages, 64, d]`` bf16 (or fp8 e4m3 with
    ``k_scale [num_pages, 64]`` fp32), ``page_table [b, max_pages]`` int32, ``seq_lens [b]`` int32 ->
    ``[b, topk]`` int32 positions ``0 .. seq_len-1``, -1 padded (written into ``out`` when given).
    By default whole rows are scored and selected at once when ``b * max(seq_lens)`` fp32 scores fit
    in ``budget_bytes`` (one ``torch.topk``, no merges); otherwise ``key_chunk`` keys per tile.
    ``max_seq_len`` (an upper bound of ``seq_lens``, capped at ``max_pages * 64``) sizes the work
    without reading ``seq_lens`` on the host, so the call can be captured in a CUDA graph;
    ``max_seq_len=page_table.shape[1] * 64`` is always valid. Default: ``seq_lens.max()`` (a host sync).
    """
    b, h, d = q.shape
    _check(topk, d)
    out = _out_buffer(out, (b, topk), q.device)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None):
        raise ValueError("k_scale is required with (and only with) a float8_e4m3fn k_cache")
    n_keys = _key_bound(seq_lens, page_table, max_seq_len)
    if n_keys <= 0:
        return out.fill_(-1)
    if key_chunk is None:
        key_chunk = n_keys if 4 * b * n_keys <= budget_bytes else DEFAULT_KEY_CHUNK
    n_keys, score_tile = decode_score_tiles(q, weights, k_cache, page_table, seq_lens, scale, k_scale,
                                            key_chunk=key_chunk, block_n=block_n, max_seq_len=n_keys)
    return out.copy_(_stream_topk(score_tile, b, n_keys, topk, key_chunk, q.device))


def decode_score_tiles(q, weights, k_cache, page_table, seq_lens, scale: float, k_scale=None, *,
                       key_chunk: int | None = None, block_n: int = 64, max_seq_len: int | None = None):
    """``(n_keys, score_tile)``: ``score_tile(k0, n_cols)`` returns ``[b, n_cols]`` fp32 scores of
    positions ``k0 ..`` (-inf past each seq_len); the tile is reused, consume it before the next call.
    ``max_seq_len``: as in ``indexer_topk_decode`` (no host read of ``seq_lens`` when given)."""
    b, h, d = q.shape
    n_keys = _key_bound(seq_lens, page_table, max_seq_len)
    key_chunk = key_chunk or DEFAULT_KEY_CHUNK
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    q, w = q.contiguous(), weights.float().contiguous()
    kc = k_cache.reshape(-1, d)
    ks = k_scale.float().reshape(-1).contiguous() if fp8 else w
    pt, lens = page_table.int().contiguous(), seq_lens.int().contiguous()
    buf = torch.empty(b * min(key_chunk, max(n_keys, 1)), dtype=torch.float32, device=q.device)

    def score_tile(k0, n_cols):
        tile = buf[:b * n_cols].view(b, n_cols)
        _decode_scores_kernel[(triton.cdiv(n_cols, block_n), b)](
            q, w, kc, ks, pt, lens, tile, k0, n_cols, scale, h,
            q.stride(0), q.stride(1), w.stride(0), kc.stride(0), pt.stride(0), tile.stride(0),
            HAS_SCALE=fp8, D=d, PAGE=PAGE_SIZE, BLOCK_H=max(16, triton.next_power_of_2(h)),
            BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), UPCAST=interpreting(_decode_scores_kernel))
        return tile

    return n_keys, score_tile
