"""Absorbed sparse MLA decode over top-k token indices in a paged latent KV cache (Triton).

The specification is ``reference.sparse_mla_decode_ref``. One program handles ``BLOCK_H`` heads of
one request over a slice of its ``topk`` indices: it gathers the selected latent rows (page table
lookup per index, -1 skipped), runs an online softmax, and writes either the final output (one
split) or a partial output + log-sum-exp per split, which a combine kernel merges
(FlashDecoding-style split-K, sized so that there is about one program per SM).

Two variants of the gather (``config["rows"]``): ``"flat"`` (default) first translates every index
to its flat cache row in a small kernel (``[b, topk]`` int32, -1 kept), so the attention loop has one
level of indirection (row -> latent), as FlashMLA's and SGLang's kernels take it; ``"paged"`` (the
first version, timed against it by ``scripts/mla_variants.py``; also the way to a cache of 2**31 rows
or more) looks the page table up inside the loop (index -> page -> latent).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._triton_common import dot_precision, interpreting, mma
from .reference import PAGE_SIZE

__all__ = ["sparse_mla_decode", "plan_sparse_mla", "run_sparse_mla", "MlaPlan", "DEFAULT_CONFIG", "flat_rows"]

LOG2E = 1.4426950408889634
# Launch parameters from the GPU sweep (docs/kernels.md); num_warps None = 8 for 64-head blocks,
# 4 for blocks of <= 32 heads.
DEFAULT_CONFIG = {"block_h": 64, "block_n": 64, "num_warps": None, "num_stages": 2, "rows": "flat"}


@triton.jit
def _rows_kernel(idx_ptr, pt_ptr, rows_ptr, TOPK, stride_ib, stride_pt, stride_rb,
                 PAGE: tl.constexpr, BLOCK: tl.constexpr):
    """rows[i, j] = page_table[i, idx[i, j] // PAGE] * PAGE + idx[i, j] % PAGE, or -1 where idx < 0."""
    i = tl.program_id(0).to(tl.int64)                               # 64-bit row offsets
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(idx_ptr + i * stride_ib + cols, mask=cols < TOPK, other=-1)
    ok = tok >= 0
    page = tl.load(pt_ptr + i * stride_pt + tok // PAGE, mask=ok, other=0)
    tl.store(rows_ptr + i * stride_rb + cols, tl.where(ok, page * PAGE + tok % PAGE, -1), mask=cols < TOPK)


@triton.jit
def _sparse_mla_kernel(
    q_ptr, kv_ptr, pt_ptr, idx_ptr, o_ptr, lse_ptr,
    H, TOPK, per_split, scale_log2,
    stride_qb, stride_qh, stride_kv, stride_pt, stride_ib, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    D_V: tl.constexpr, D_R: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLAT: tl.constexpr,
):
    """o[i, h, split] = softmax-weighted V over indices [split*per_split, +per_split) of request i.

    ``FLAT``: ``idx_ptr`` holds flat cache rows (``_rows_kernel``) and ``pt_ptr`` is unused."""
    hb = tl.program_id(0)                                           # fastest: head blocks share KV in L2
    i = tl.program_id(1).to(tl.int64)                               # 64-bit offsets: b * h * 576 > 2**31
    sp = tl.program_id(2)                                           # at 29K queries of 128 heads
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)                       # [BLOCK_H]
    hm = hs < H
    dv = tl.arange(0, D_V)
    dr = tl.arange(0, D_R)
    q_row = q_ptr + i * stride_qb + hs[:, None] * stride_qh
    q_nope = tl.load(q_row + dv[None, :], mask=hm[:, None], other=0.0)        # [BLOCK_H, D_V]
    q_rope = tl.load(q_row + D_V + dr[None, :], mask=hm[:, None], other=0.0)  # [BLOCK_H, D_R]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_V], tl.float32)
    start = sp * per_split
    end = tl.minimum(start + per_split, TOPK)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        tok = tl.load(idx_ptr + i * stride_ib + cols, mask=cols < end, other=-1)  # [BLOCK_N]
        ok = tok >= 0
        if FLAT:
            row = tok.to(tl.int64) * stride_kv                      # tok is already the flat row
        else:
            page = tl.load(pt_ptr + i * stride_pt + tok // PAGE, mask=ok, other=0)
            row = (page.to(tl.int64) * PAGE + tok % PAGE) * stride_kv
        kv = tl.load(kv_ptr + row[:, None] + dv[None, :], mask=ok[:, None], other=0.0)       # [BLOCK_N, D_V]
        kr = tl.load(kv_ptr + row[:, None] + D_V + dr[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, D_R]
        s = mma(q_nope, tl.trans(kv), UPCAST, PRECISION) + mma(q_rope, tl.trans(kr), UPCAST, PRECISION)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))    # [BLOCK_H, BLOCK_N] log2 units
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(kv.dtype), kv, UPCAST, PRECISION)
        m = m_new
    has = l > 0.0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptrs = o_ptr + i * stride_ob + hs[:, None] * stride_oh + sp * stride_os + dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=hm[:, None])
    tl.store(lse_ptr + i * stride_lb + hs * stride_lh + sp, lse, mask=hm)


@triton.jit
def _combine_kernel(
    part_ptr, plse_ptr, o_ptr, lse_ptr, SPLITS,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_fb,
    D_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the per-split outputs and LSEs of one (request, head) into the final output and LSE."""
    i = tl.program_id(0).to(tl.int64)                               # 64-bit row offsets
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    plse = tl.load(plse_ptr + i * stride_lb + h * stride_lh + ss, mask=ss < SPLITS, other=float("-inf"))
    mx = tl.max(plse, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(plse - mx_safe)                                      # [BLOCK_S], 0 for empty splits
    total = tl.sum(w, axis=0)
    dv = tl.arange(0, D_V)
    parts = tl.load(part_ptr + i * stride_pb + h * stride_ph + ss[:, None] * stride_ps + dv[None, :],
                    mask=(ss < SPLITS)[:, None], other=0.0)         # [BLOCK_S, D_V]
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + i * stride_ob + h * stride_oh + dv, out.to(o_ptr.dtype.element_ty))
    safe_total = tl.where(total > 0.0, total, 1.0)
    tl.store(lse_ptr + i * stride_fb + h, tl.where(total > 0.0, mx_safe + tl.log(safe_total), float("-inf")))


def _num_splits(b: int, head_blocks: int, topk: int, block_n: int, device) -> int:
    """Split-K factor: the largest power of two <= SMs / programs (at most 32, one index block each).

    (Checked against the GPU sweep: docs/kernels.md.)
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    fill = max(1, sms // max(1, b * head_blocks))
    return max(1, min(1 << (fill.bit_length() - 1), 32, triton.cdiv(topk, block_n)))


def _check_args(q, kv_cache, page_table, indices, d_v, out=None, lse=None):
    b, h, d_qk = q.shape
    if out is not None and (tuple(out.shape) != (b, h, d_v) or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be [{b}, {h}, {d_v}] {q.dtype} with unit last stride, got "
                         f"{out.dtype} {list(out.shape)} strides {tuple(out.stride())}")
    if lse is not None and (tuple(lse.shape) != (b, h) or lse.dtype != torch.float32 or lse.stride(-1) != 1):
        raise ValueError(f"lse must be [{b}, {h}] float32 with unit last stride, got "
                         f"{lse.dtype} {list(lse.shape)} strides {tuple(lse.stride())}")
    if kv_cache.shape[1] != PAGE_SIZE or kv_cache.shape[2] != d_qk:
        raise ValueError(f"kv_cache must be [num_pages, {PAGE_SIZE}, {d_qk}], got {list(kv_cache.shape)}")
    if indices.shape[0] != b or page_table.shape[0] != b:
        raise ValueError("q, page_table and indices must have the same batch size")
    rope = d_qk - d_v
    if d_v & (d_v - 1) or rope <= 0 or rope & (rope - 1):
        raise ValueError(f"d_v ({d_v}) and d_qk - d_v ({rope}) must be powers of two")


@dataclasses.dataclass
class MlaPlan:
    """What ``sparse_mla_decode`` computes before its attention kernel, for one batch and one top-k:
    the launch configuration, the split-K scratch and the index rows (flat cache rows through the
    page table, or the positions themselves for ``rows="paged"``). An F layer's plan serves that
    layer and every S layer that reuses its top-k (same batch, page table and indices; each layer
    its own ``q`` and ``kv_cache``): ``run_sparse_mla(plan, q, kv_cache, ...)`` then launches only
    the attention kernel (and the combine kernel when split)."""

    b: int
    h: int
    d_qk: int
    d_v: int
    topk: int
    dtype: torch.dtype
    cache_rows: int             # num_pages * 64 of the caches it was planned for
    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int
    per_split: int
    flat: bool
    page_table: torch.Tensor    # [b, max_pages] int32, contiguous
    idx: torch.Tensor           # [b, topk] int32: flat rows (flat) or positions (paged), -1 kept
    o_part: torch.Tensor | None  # [b, h, splits, d_v] fp32 scratch when splits > 1
    l_part: torch.Tensor | None  # [b, h, splits] fp32


def plan_sparse_mla(q, kv_cache, page_table, indices, d_v: int = 512, *, num_splits: int | None = None,
                    config=None) -> MlaPlan:
    """Plan ``sparse_mla_decode`` for this batch and top-k (arguments as there; ``q`` and ``kv_cache``
    give shapes, dtype and device only). Launches ``flat_rows`` once (``rows="flat"``)."""
    _check_args(q, kv_cache, page_table, indices, d_v)
    b, h, d_qk = q.shape
    topk = indices.shape[1]
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if cfg["rows"] not in ("flat", "paged"):
        raise ValueError(f"config rows must be 'flat' or 'paged', got {cfg['rows']!r}")
    block_h = min(cfg["block_h"], max(16, triton.next_power_of_2(h)))
    block_n = cfg["block_n"]
    head_blocks = triton.cdiv(h, block_h)
    splits = num_splits or _num_splits(b, head_blocks, topk, block_n, q.device)
    per_split = triton.cdiv(triton.cdiv(max(topk, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(topk, per_split))
    cache_rows = kv_cache.shape[0] * kv_cache.shape[1]
    flat = cfg["rows"] == "flat"
    if flat and cache_rows >= 2 ** 31:
        raise ValueError("rows 'flat' needs fewer than 2**31 cache rows; use config rows='paged'")
    pt, idx = page_table.int().contiguous(), indices.int().contiguous()
    if flat and b > 0:
        idx = flat_rows(idx, pt)                                    # [b, topk] flat rows, -1 kept
    o_part = l_part = None
    if splits > 1:
        o_part = torch.empty(b, h, splits, d_v, dtype=torch.float32, device=q.device)
        l_part = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    return MlaPlan(b, h, d_qk, d_v, topk, q.dtype, cache_rows, block_h, block_n,
                   cfg["num_warps"] or (8 if block_h >= 64 else 4), cfg["num_stages"], splits, per_split, flat,
                   pt, idx, o_part, l_part)


def run_sparse_mla(plan: MlaPlan, q, kv_cache, sm_scale: float, return_lse: bool = False, *, out=None, lse=None):
    """``sparse_mla_decode`` of one layer on a plan: ``q [b, h, d_qk]`` and ``kv_cache`` of the shapes
    planned (this layer's own tensors), results as ``sparse_mla_decode``'s."""
    b, h, d_qk, d_v = plan.b, plan.h, plan.d_qk, plan.d_v
    if tuple(q.shape) != (b, h, d_qk) or q.dtype != plan.dtype:
        raise ValueError(f"q must be [{b}, {h}, {d_qk}] {plan.dtype} as planned, got {q.dtype} {list(q.shape)}")
    if kv_cache.dim() != 3 or kv_cache.shape[1] != PAGE_SIZE or kv_cache.shape[2] != d_qk \
            or kv_cache.shape[0] * PAGE_SIZE != plan.cache_rows:
        raise ValueError(f"kv_cache must be [{plan.cache_rows // PAGE_SIZE}, {PAGE_SIZE}, {d_qk}] as planned, "
                         f"got {list(kv_cache.shape)}")
    _check_args(q, kv_cache, plan.page_table, plan.idx, d_v, out, lse)
    out = torch.empty(b, h, d_v, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(b, h, dtype=torch.float32, device=q.device) if lse is None else lse
    q = q if q.stride(-1) == 1 else q.contiguous()                  # any row / head stride is read in place
    kv, pt, idx = kv_cache.reshape(-1, d_qk), plan.page_table, plan.idx
    o_part, l_part = (out.view(b, h, 1, d_v), lse.view(b, h, 1)) if plan.splits == 1 else (plan.o_part, plan.l_part)
    if b > 0 and h > 0:
        _sparse_mla_kernel[(triton.cdiv(h, plan.block_h), b, plan.splits)](
            q, kv, pt, idx, o_part, l_part, h, plan.topk, plan.per_split, sm_scale * LOG2E,
            q.stride(0), q.stride(1), kv.stride(0), pt.stride(0), idx.stride(0),
            o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
            D_V=d_v, D_R=d_qk - d_v, PAGE=PAGE_SIZE, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n,
            PRECISION=dot_precision(q.dtype), UPCAST=interpreting(_sparse_mla_kernel), FLAT=plan.flat,
            num_warps=plan.num_warps, num_stages=plan.num_stages)
        if plan.splits > 1:
            _combine_kernel[(b, h)](
                o_part, l_part, out, lse, plan.splits,
                o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
                out.stride(0), out.stride(1), lse.stride(0),
                D_V=d_v, BLOCK_S=max(2, triton.next_power_of_2(plan.splits)))
    return (out, lse) if return_lse else out


def sparse_mla_decode(q, kv_cache, page_table, indices, sm_scale: float, d_v: int = 512,
                      return_lse: bool = False, *, num_splits: int | None = None, config=None,
                      out=None, lse=None):
    """Triton version of ``reference.sparse_mla_decode_ref`` (same arguments and result).

    ``q [b, h, d_qk]`` bf16, ``kv_cache [num_pages, 64, d_qk]`` bf16, ``page_table [b, max_pages]``
    int32, ``indices [b, topk]`` int32 (-1 skipped) -> ``out [b, h, d_v]`` in q's dtype and, with
    ``return_lse``, ``lse [b, h]`` fp32 (natural log; -inf and out = 0 for a request with no index).
    ``num_splits`` overrides the split-K factor (default: from the SM count; 1 off the GPU);
    ``config`` overrides ``DEFAULT_CONFIG`` (``rows="paged"``: the first version, page-table lookup in
    the loop); ``out``/``lse`` receive the results when given. Layers that share a top-k (an F layer
    and its S layers): ``plan_sparse_mla`` once, ``run_sparse_mla`` per layer.
    """
    plan = plan_sparse_mla(q, kv_cache, page_table, indices, d_v, num_splits=num_splits, config=config)
    return run_sparse_mla(plan, q, kv_cache, sm_scale, return_lse, out=out, lse=lse)


def flat_rows(indices, page_table, block: int = 1024):
    """Flat cache rows ``[b, topk]`` int32 (``page * 64 + slot``; -1 where ``indices`` is -1) of
    positions ``indices [b, topk]`` int32 through ``page_table [b, max_pages]`` int32 (both contiguous)."""
    b, topk = indices.shape
    rows = torch.empty_like(indices)
    if b > 0 and topk > 0:
        _rows_kernel[(b, triton.cdiv(topk, block))](
            indices, page_table, rows, topk, indices.stride(0), page_table.stride(0), rows.stride(0),
            PAGE=PAGE_SIZE, BLOCK=block)
    return rows


def mla_flops(b: int, h: int, n_valid: int, d_qk: int = 576, d_v: int = 512) -> float:
    """FLOPs of sparse MLA decode: ``2 * b * h * n_valid * (d_qk + d_v)`` (QK^T and PV)."""
    return 2.0 * b * h * n_valid * (d_qk + d_v)


def mla_bytes(b: int, h: int, topk: int, d_qk: int = 576, d_v: int = 512, elem: int = 2) -> float:
    """Minimum HBM bytes: each selected latent row once, q, out and the indices."""
    return b * (topk * (d_qk * elem + 4) + h * (d_qk + d_v) * elem)

