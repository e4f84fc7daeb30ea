"""Prefill indexer top-k without writing the scores: a sampled threshold, then score-and-append.

For one chunk of query positions ``p0 .. p0+n_rows-1`` (every row sees at least keys ``0 .. p0``):

1. ``_sample_kernel`` scores each query against ``sample`` keys of its request, in groups of 8
   adjacent keys at evenly spaced positions of ``0 .. p0-1`` (so causal for every row of the chunk);
2. ``topk_sampled._threshold_kernel`` turns each row's sample scores into a threshold ``tau`` at the
   rank that ``target`` (2.5 x topk) candidates of the row's ``position + 1`` keys would have (wider
   than the sampled top-k's 1.5 x: a misled row costs a re-score of its whole chunk here, so the
   margins are about 6 sigma for a 4096-key sample of a 200K row; lists hold 8 x topk);
3. ``_append_kernel`` scores every causal key as ``indexer_scores._prefill_kernel`` does and, instead
   of storing the scores, appends those ``>= tau`` with their key positions to the row's list of
   ``capacity`` slots (a running count per row in registers: one program owns a row's keys);
4. ``topk.topk_rows`` selects exactly among each list. A row whose list overflowed, or that got
   fewer than ``min(topk, position + 1)`` candidates, is scored again in full and selected by
   ``topk_sampled.topk_rows_sampled`` (a host check decides whether any row needs it).

This removes the ``[rows, keys]`` fp32 score tile (written once, read about once by the selection)
and the selection's read of it. Same contract as ``indexer_topk.indexer_topk_prefill``; ties at the
threshold may be taken in any order.

Kept for comparison only (slower than the score tile + sampled top-k; docs/kernels.md, *History and
measurements*): ``indexer_topk_prefill(..., chunk_topk=fused_chunks(N))`` runs it on the chunks
from position N on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_indexcache.kernels._triton_common import dot_precision, interpreting
from sglang_indexcache.kernels.indexer_scores import PREFILL_CONFIG, _head_sum, _load_queries, prefill_scores
from sglang_indexcache.kernels.topk import topk_rows
from sglang_indexcache.kernels.topk_sampled import _threshold_kernel, topk_rows_sampled

__all__ = ["fused_prefill_chunk", "fused_chunks"]


@triton.jit
def _sample_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, cu_ptr, out_ptr, p0, n_rows, scale, H,
                   stride_qt, stride_qh, stride_wt, stride_kt, stride_ob, stride_or,
                   S: tl.constexpr, HAS_SCALE: tl.constexpr, CAST_K: tl.constexpr, D: tl.constexpr,
                   BT: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    """out[i, r, j] = score of request i's position p0+r against its sampled key j (of S)."""
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(cu_ptr + i)
    length = tl.load(cu_ptr + i + 1) - start
    if p0 + pid_m * BT < length:
        q, w = _load_queries(q_ptr, w_ptr, start, p0, pid_m, n_rows, length, H, stride_qt, stride_qh,
                             stride_wt, D, BT, HP)
        t_loc = pid_m * BT + tl.arange(0, BT)
        d = tl.arange(0, D)
        for j0 in range(0, S, BN):
            j = j0 + tl.arange(0, BN)
            key = ((j // 8).to(tl.int64) * p0) // (S // 8) + j % 8   # [BN] in 0 .. p0-1 (p0 >= S)
            kt = tl.load(k_ptr + (start + key)[:, None] * stride_kt + d[None, :])
            if CAST_K:
                kt = kt.to(q.dtype)
            sc = _head_sum(q, w, kt, BN, BT, HP, PRECISION, UPCAST)
            if HAS_SCALE:
                sc = sc * tl.load(ks_ptr + start + key)[:, None]
            o_row = out_ptr + i.to(tl.int64) * stride_ob + t_loc.to(tl.int64) * stride_or    # [BT]
            tl.store(o_row[None, :] + j[:, None], sc * scale,
                     mask=(t_loc < n_rows)[None, :])


@triton.jit
def _append_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, cu_ptr, tau_ptr, val_ptr, col_ptr, cnt_ptr,
                   p0, n_rows, scale, H, cap,
                   stride_qt, stride_qh, stride_wt, stride_kt,
                   HAS_SCALE: tl.constexpr, CAST_K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                   HP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   ATOMIC: tl.constexpr):
    """Append the causal scores >= tau[row] of rows p0+pid_m*BT .. (+BT) of request i to their lists.

    ``ATOMIC``: each hit takes its slot with a relaxed atomic increment of its row's counter
    (``cnt_ptr`` zeroed by the caller; no cross-thread scan); else a prefix sum over the tile."""
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(cu_ptr + i)
    length = tl.load(cu_ptr + i + 1) - start
    t_loc = pid_m * BT + tl.arange(0, BT)                           # [BT] rows of the chunk
    pos = p0 + t_loc
    row_ok = (t_loc < n_rows) & (pos < length)
    lst = (i * n_rows + t_loc).to(tl.int64)                         # [BT] list rows
    tau_key = tl.load(tau_ptr + lst, mask=row_ok, other=0)
    tau = (tau_key ^ ((tau_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    tau = tl.where(tau_key == -2147483648, float("-inf"), tau)      # "take all" (its bits are a NaN)
    count = tl.zeros([BT], tl.int32)
    last = tl.minimum(p0 + pid_m * BT + BT, length) - 1
    if p0 + pid_m * BT < length:
        q, w = _load_queries(q_ptr, w_ptr, start, p0, pid_m, n_rows, length, H, stride_qt, stride_qh,
                             stride_wt, D, BT, HP)
        d = tl.arange(0, D)
        for kb in range(0, last + 1, BN):
            key = kb + tl.arange(0, BN)                             # [BN] key positions
            k_ok = key <= last
            kt = tl.load(k_ptr + (start + key).to(tl.int64)[:, None] * stride_kt + d[None, :],
                         mask=k_ok[:, None], other=0.0)
            if CAST_K:
                kt = kt.to(q.dtype)
            sc = _head_sum(q, w, kt, BN, BT, HP, PRECISION, UPCAST) * scale
            if HAS_SCALE:
                sc = sc * tl.load(ks_ptr + start + key, mask=k_ok, other=0.0)[:, None]
            hit = row_ok[None, :] & (key[:, None] <= pos[None, :]) & (sc >= tau[None, :])  # [BN, BT]
            if ATOMIC:
                ones = tl.full([BN, BT], 1, tl.int32)
                slot = tl.atomic_add(cnt_ptr + lst[None, :] + 0 * key[:, None], ones, mask=hit, sem="relaxed")
            else:
                slot = count[None, :] + tl.cumsum(hit.to(tl.int32), axis=0) - 1
                count += tl.sum(hit.to(tl.int32), axis=0)
            keep = hit & (slot < cap)
            dst = lst[None, :] * cap + slot
            tl.store(val_ptr + dst, sc, mask=keep)
            tl.store(col_ptr + dst, key[:, None] + tl.zeros([BN, BT], tl.int32), mask=keep)
    if not ATOMIC:
        tl.store(cnt_ptr + lst, count, mask=t_loc < n_rows)


def fused_prefill_chunk(q, weights, k, cu_seqlens, scale: float, p0: int, n_rows: int, topk: int,
                        k_scale=None, *, sample: int = 4096, capacity: int | None = None,
                        target: int | None = None, atomic: bool = True, **config):
    """Top-k ``[b * n_rows, topk]`` int32 (-1 padded) of positions ``p0 .. p0+n_rows-1`` of every request.

    Row ``i * n_rows + r`` is request i's position ``p0 + r`` (rows past a request are -1). Needs
    ``p0 >= sample``; inputs as ``indexer_topk.indexer_topk_prefill`` (contiguous; weights fp32)."""
    cfg = {**PREFILL_CONFIG, **config}
    t, h, d = q.shape
    b = cu_seqlens.numel() - 1
    if p0 < sample or sample % 8 or sample & (sample - 1):
        raise ValueError(f"need a power-of-two sample >= 8 and <= p0, got sample={sample}, p0={p0}")
    capacity = capacity or 8 * topk
    target = target or (5 * topk + 1) // 2
    fp8 = k_scale is not None
    hp = max(1, triton.next_power_of_2(h))
    bt = max(1, cfg["rows"] // hp)
    rows = b * n_rows
    dev = q.device
    ks = k_scale.float().contiguous() if fp8 else weights
    common = dict(HAS_SCALE=fp8, CAST_K=fp8 and q.dtype != k.dtype, D=d, BT=bt, HP=hp, BN=cfg["block_n"],
                  PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (triton.cdiv(n_rows, bt), b)
    samples = torch.empty(b, n_rows, sample, dtype=torch.float32, device=dev)
    _sample_kernel[grid](q, weights, k, ks, cu_seqlens, samples, p0, n_rows, scale, h,
                         q.stride(0), q.stride(1), weights.stride(0), k.stride(0), samples.stride(0),
                         samples.stride(1), S=sample, UPCAST=interpreting(_sample_kernel), **common)
    pos = p0 + torch.arange(n_rows, device=dev)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    row_len = torch.where(pos[None, :] < lens[:, None], pos[None, :] + 1, 0).reshape(-1).to(torch.int32)
    tau = torch.empty(rows, dtype=torch.int32, device=dev)
    exh = torch.empty(rows, dtype=torch.int32, device=dev)
    flat = samples.view(rows, sample)
    _threshold_kernel[(rows,)](flat, row_len, tau, exh, sample, flat.stride(0), target, row_len, tau,
                               HAS_LEN=False, S=sample, HAS_RLEN=True, ZERO_CNT=False, num_warps=4)
    vals = torch.empty(rows, capacity, dtype=torch.float32, device=dev)
    cols = torch.empty(rows, capacity, dtype=torch.int32, device=dev)
    count = torch.zeros(rows, dtype=torch.int32, device=dev)
    _append_kernel[grid](q, weights, k, ks, cu_seqlens, tau, vals, cols, count, p0, n_rows, scale, h, capacity,
                         q.stride(0), q.stride(1), weights.stride(0), k.stride(0),
                         UPCAST=interpreting(_append_kernel), ATOMIC=atomic, **common)
    ok = (count <= capacity) & (count >= row_len.clamp(max=topk))
    local = topk_rows(vals, topk, lengths=torch.where(ok, count, 0), num_warps=4)
    out = torch.where(local >= 0, cols.gather(1, local.clamp(min=0).long()), -1)
    if not bool(ok.all()):                                          # rows the sample misled: in full
        full = torch.empty(b, n_rows, p0 + n_rows, dtype=torch.float32, device=dev)
        prefill_scores(q, weights, k, cu_seqlens, scale, full, p0, n_rows, k_scale=k_scale, **config)
        again = topk_rows_sampled(full.view(rows, -1), topk, lengths=torch.where(ok, 0, row_len))
        out = torch.where(ok[:, None], out, again)
    return out


def fused_chunks(fused_from: int, sample: int = 4096, **fused):
    """``chunk_topk`` hook for ``indexer_topk_prefill``: chunks whose first position is at least
    ``fused_from`` (and ``sample``) go through ``fused_prefill_chunk`` (``sample`` and ``fused``:
    its keywords, e.g. ``capacity``, ``target``, ``atomic``); earlier chunks keep the score tile."""

    def hook(q, weights, k, cu_seqlens, scale, p0, n_rows, topk, k_scale, **config):
        if p0 < max(fused_from, sample):
            return None
        return fused_prefill_chunk(q, weights, k, cu_seqlens, scale, p0, n_rows, topk, k_scale,
                                   sample=sample, **{**config, **fused})

    return hook
