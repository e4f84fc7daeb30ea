"""Lightning-indexer score kernels (Triton): one query block's index heads stay on chip, keys stream.

``I[t, s] = scale * k_scale[s] * sum_h w[t, h] * relu(q[t, h] . k[s])`` (``k_scale`` 1 for bf16
keys); the specification is ``reference.indexer_scores_prefill_ref`` / ``indexer_scores_decode_ref``.

Prefill: a program holds ``BT`` query tokens x all ``h`` index heads (padded to ``HP``, a power of
two) as the rows of one ``[BT*HP, d]`` operand, loaded once, and walks its share of the causal keys in
blocks of ``BN``: one matrix product ``[BT*HP, d] x [d, BN]`` per block, then ReLU, the head weights and
the sum over each token's ``HP`` rows.

Decode: a program holds one request's ``[HP, d]`` query (loaded once) and walks ``keys_per_prog``
keys of the paged cache. Earlier designs and measured speeds: docs/kernels.md.

fp8 (e4m3) operands: ``q`` and ``k`` may both be float8_e4m3fn (tensor-core fp8 products, fp32
accumulation) with per-key scales ``k_scale`` (> 0); a per-(token, head) query scale belongs in the
weights, since ``relu(a x) = a relu(x)`` for ``a > 0``. Only the columns a consumer reads are written:
prefill rows get keys ``0 .. position`` (causal), decode rows keys ``0 .. seq_len - 1``; pass those
lengths to the top-k (``topk.topk_rows(..., lengths=...)``), which never reads past them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import dot_precision, interpreting, mma
from .reference import PAGE_SIZE

__all__ = ["prefill_scores", "decode_scores", "PREFILL_CONFIG", "DECODE_CONFIG"]

# rows = query tokens x padded heads per program; keys per block; warps; pipeline stages; key order
# (chosen by the GPU sweep in docs/kernels.md)
PREFILL_CONFIG = {"rows": 256, "block_n": 64, "num_warps": 8, "num_stages": 3, "keys_major": True}
DECODE_CONFIG = {"block_n": 64, "keys_per_prog": 1024, "num_warps": 4, "num_stages": 3}


@triton.jit
def _load_queries(q_ptr, w_ptr, start, p0, pid_m, n_rows, length, H, stride_qt, stride_qh, stride_wt,
                  D: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr):
    """Queries ``[BT*HP, D]`` and weights ``[BT*HP]`` of rows (token, head) of query block ``pid_m``
    (tokens ``p0 + pid_m*BT ..`` of the request at ``start``; zero past the chunk, request, heads)."""
    r = tl.arange(0, BT * HP)
    r_t = pid_m * BT + r // HP
    r_h = r % HP
    r_ok = (r_t < n_rows) & (p0 + r_t < length) & (r_h < H)
    tok = (start + p0 + r_t).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + r_h[:, None] * stride_qh + d[None, :],
                mask=r_ok[:, None], other=0.0)
    w = tl.load(w_ptr + tok * stride_wt + r_h, mask=r_ok, other=0.0)
    return q, w


@triton.jit
def _head_sum(q, w, kt, BN: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BN, BT] = sum over each token's HP head rows of w * relu(k . q) (keys-major product)."""
    s = mma(kt, tl.trans(q), UPCAST, PRECISION)                     # [BN, BT*HP]
    s = tl.maximum(s, 0.0) * w[None, :]
    return tl.sum(tl.reshape(s, [BN, BT, HP]), axis=2)


@triton.jit
def _prefill_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, cu_ptr, out_ptr,
    p0, n_rows, k0, n_cols, keys_per_prog, scale, H,
    stride_qt, stride_qh, stride_wt, stride_kt, stride_ob, stride_or,
    HAS_SCALE: tl.constexpr, CAST_K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
    HP: tl.constexpr, BN: tl.constexpr, KEYS_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[i, r, c] = score of request i's position p0+r against its position k0+c, for k0+c <= p0+r."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    i = tl.program_id(2)
    start = tl.load(cu_ptr + i)
    length = tl.load(cu_ptr + i + 1) - start
    t_loc = pid_m * BT + tl.arange(0, BT)                          # [BT] rows of the chunk
    pos = p0 + t_loc
    # 64-bit tile offsets: a chunk of 16384 rows x 200K keys has 3.3e9 elements (> 2**31)
    o_row = out_ptr + i.to(tl.int64) * stride_ob + t_loc.to(tl.int64) * stride_or   # [BT] row starts
    last = tl.minimum(p0 + pid_m * BT + BT, length) - 1            # last key any row here sees
    k_lo = k0 + pid_k * keys_per_prog
    k_hi = tl.minimum(tl.minimum(k_lo + keys_per_prog, last + 1), k0 + n_cols)
    if k_lo < k_hi:
        q, w = _load_queries(q_ptr, w_ptr, start, p0, pid_m, n_rows, length, H, stride_qt, stride_qh,
                             stride_wt, D, BT, HP)                 # [BT*HP, D], [BT*HP] fp32
        d = tl.arange(0, D)
        row_ok = (t_loc < n_rows) & (pos < length)
        for kb in range(k_lo, k_hi, BN):
            key = kb + tl.arange(0, BN)                            # [BN] key positions
            k_ok = key < k_hi
            kt = tl.load(k_ptr + (start + key).to(tl.int64)[:, None] * stride_kt + d[None, :],
                         mask=k_ok[:, None], other=0.0)            # [BN, D]
            if CAST_K:
                kt = kt.to(q.dtype)                                # fp8 keys, bf16 queries: exact
            if KEYS_MAJOR:
                sc = _head_sum(q, w, kt, BN, BT, HP, PRECISION, UPCAST)  # [BN, BT]
                if HAS_SCALE:
                    sc = sc * tl.load(ks_ptr + start + key, mask=k_ok, other=0.0)[:, None]
                ok = row_ok[None, :] & (key[:, None] <= pos[None, :])
                tl.store(o_row[None, :] + (key - k0)[:, None],
                         tl.where(ok, sc * scale, float("-inf")),
                         mask=(t_loc < n_rows)[None, :] & k_ok[:, None])
            else:
                s = mma(q, tl.trans(kt), UPCAST, PRECISION)        # [BT*HP, BN]
                s = tl.maximum(s, 0.0) * w[:, None]
                sc = tl.sum(tl.reshape(s, [BT, HP, BN]), axis=1)   # [BT, BN]
                if HAS_SCALE:
                    sc = sc * tl.load(ks_ptr + start + key, mask=k_ok, other=0.0)[None, :]
                ok = row_ok[:, None] & (key[None, :] <= pos[:, None])
                tl.store(o_row[:, None] + (key - k0)[None, :],
                         tl.where(ok, sc * scale, float("-inf")),
                         mask=(t_loc < n_rows)[:, None] & k_ok[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, w_ptr, kc_ptr, ks_ptr, pt_ptr, len_ptr, out_ptr,
    k0, n_cols, keys_per_prog, scale, H,
    stride_qb, stride_qh, stride_wb, stride_kp, stride_kt, stride_sp, stride_pt, stride_ob,
    HAS_SCALE: tl.constexpr, CAST_K: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    HP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[i, c] = score of request i's query against its cached position k0+c, for k0+c < seq_len."""
    pid_k = tl.program_id(0)
    i = tl.program_id(1)
    i64 = i.to(tl.int64)                                            # 64-bit row offsets (any batch x keys)
    length = tl.minimum(tl.load(len_ptr + i), k0 + n_cols)
    k_lo = k0 + pid_k * keys_per_prog
    k_hi = tl.minimum(k_lo + keys_per_prog, length)
    if k_lo < k_hi:
        hs = tl.arange(0, HP)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + i64 * stride_qb + hs[:, None] * stride_qh + d[None, :],
                    mask=(hs < H)[:, None], other=0.0)             # [HP, D]
        w = tl.load(w_ptr + i64 * stride_wb + hs, mask=hs < H, other=0.0)  # [HP]
        for kb in range(k_lo, k_hi, BN):
            key = kb + tl.arange(0, BN)
            ok = key < k_hi
            page = tl.load(pt_ptr + i64 * stride_pt + key // PAGE, mask=ok, other=0).to(tl.int64)
            slot = key % PAGE                                       # [BN] token within its page
            kt = tl.load(kc_ptr + (page * stride_kp + slot * stride_kt)[:, None] + d[None, :],
                         mask=ok[:, None], other=0.0)               # [BN, D]
            if CAST_K:
                kt = kt.to(q.dtype)
            s = mma(q, tl.trans(kt), UPCAST, PRECISION)            # [HP, BN]
            score = tl.sum(tl.maximum(s, 0.0) * w[:, None], axis=0)
            if HAS_SCALE:
                score = score * tl.load(ks_ptr + page * stride_sp + slot, mask=ok, other=0.0)
            tl.store(out_ptr + i64 * stride_ob + (key - k0), score * scale, mask=ok)


def _fp8_pair(q, k, k_scale, what: str) -> bool:
    fp8 = k.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None):
        raise ValueError(f"k_scale is required with (and only with) float8_e4m3fn {what}")
    if (q.dtype == torch.float8_e4m3fn) and not fp8:
        raise ValueError("float8_e4m3fn queries need float8_e4m3fn keys (with k_scale)")
    return fp8


def _splits(programs: int, keys: int, block: int, device) -> int:
    """Keys per program: enough programs to fill the device twice over, whole blocks each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(keys, block)))
    return triton.cdiv(triton.cdiv(keys, split), block) * block


def prefill_scores(q, weights, k, cu_seqlens, scale: float, out, p0: int, n_rows: int,
                   k_scale=None, k0: int = 0, **config):
    """Score positions ``p0 .. p0+n_rows-1`` of every request against their causal keys ``k0 ..``.

    ``q [t, h, d]``, ``weights [t, h]`` fp32, ``k [t, d]`` (bf16/fp32, or fp8 e4m3 with ``k_scale [t]``
    fp32 and then ``q`` bf16 or fp8), ``cu_seqlens [b+1]`` int32; ``out [b, n_rows, >= p0+n_rows]``
    fp32 (unit column stride): column ``c`` of row ``r`` of request ``i`` is key ``k0 + c``, written
    for ``k0 + c <= p0 + r`` and for ``c < out.shape[2]``; a column past the position is left as it
    is or set to -inf (up to the last position of the row's query block), never to a score.
    Offsets into ``out`` are 64-bit (any ``b x n_rows x columns``). ``config``: ``PREFILL_CONFIG`` keys.
    """
    t, h, d = q.shape
    b = cu_seqlens.numel() - 1
    fp8 = _fp8_pair(q, k, k_scale, "keys")
    hp = max(1, triton.next_power_of_2(h))
    cfg = {**PREFILL_CONFIG, **config}
    bt = max(1, cfg["rows"] // hp)
    n_cols = min(out.shape[2], max(0, p0 + n_rows - k0))
    if n_cols == 0 or n_rows == 0 or b == 0:
        return out
    row_blocks = triton.cdiv(n_rows, bt)
    per_prog = _splits(row_blocks * b, n_cols, cfg["block_n"], q.device)
    grid = (triton.cdiv(n_cols, per_prog), row_blocks, b)
    ks = k_scale.float().contiguous() if fp8 else weights
    _prefill_kernel[grid](
        q, weights, k, ks, cu_seqlens, out, p0, n_rows, k0, n_cols, per_prog, scale, h,
        q.stride(0), q.stride(1), weights.stride(0), k.stride(0), out.stride(0), out.stride(1),
        HAS_SCALE=fp8, CAST_K=fp8 and q.dtype != k.dtype, D=d, BT=bt, HP=hp, BN=cfg["block_n"], KEYS_MAJOR=cfg["keys_major"],
        PRECISION=dot_precision(q.dtype), UPCAST=interpreting(_prefill_kernel),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def decode_scores(q, weights, k_cache, page_table, seq_lens, scale: float, out, k_scale=None,
                  k0: int = 0, **config):
    """Score each request's query against its cached positions ``k0 .. min(seq_len, k0+n_cols) - 1``.

    ``q [b, h, d]``, ``weights [b, h]`` fp32, ``k_cache [num_pages, 64, d]`` (or fp8 e4m3 with
    ``k_scale [num_pages, 64]`` fp32), ``page_table [b, max_pages]``, ``seq_lens [b]`` int32;
    ``out [b, n_cols]`` fp32 (unit column stride), column ``c`` = position ``k0 + c``; columns past a
    request's length are not written.
    ``k_cache`` and ``k_scale`` may have any page stride (unit stride along ``d`` and within a page's
    scales): views of SGLang's fused index-K buffer (``[num_pages, 64 * 132]`` uint8, a page's fp8
    values then its 64 scales) are read in place, without a copy.
    ``seq_lens`` is read on the device only (no host sync: the call can be captured in a CUDA graph).
    """
    cfg = {**DECODE_CONFIG, **config}
    b, h, d = q.shape
    n_cols = out.shape[1]
    fp8 = _fp8_pair(q, k_cache, k_scale, "k_cache")
    if n_cols == 0 or b == 0:
        return out
    if k_cache.dim() != 3 or k_cache.shape[1:] != (PAGE_SIZE, d):
        raise ValueError(f"k_cache must be [num_pages, {PAGE_SIZE}, {d}], got {list(k_cache.shape)}")
    if fp8 and tuple(k_scale.shape) != tuple(k_cache.shape[:2]):
        raise ValueError(f"k_scale must be [num_pages, {PAGE_SIZE}], got {list(k_scale.shape)}")
    kc = k_cache if k_cache.stride(2) == 1 else k_cache.contiguous()
    ks = weights
    if fp8:
        in_place = k_scale.dtype == torch.float32 and k_scale.stride(1) == 1
        ks = k_scale if in_place else k_scale.float().contiguous()
    per_prog = max(cfg["block_n"], min(cfg["keys_per_prog"], triton.cdiv(n_cols, cfg["block_n"]) * cfg["block_n"]))
    grid = (max(1, triton.cdiv(n_cols, per_prog)), b)
    _decode_kernel[grid](
        q, weights, kc, ks, page_table, seq_lens, out, k0, n_cols, per_prog, scale, h,
        q.stride(0), q.stride(1), weights.stride(0), kc.stride(0), kc.stride(1), ks.stride(0) if fp8 else 0,
        page_table.stride(0), out.stride(0),
        HAS_SCALE=fp8, CAST_K=fp8 and q.dtype != k_cache.dtype, D=d, PAGE=PAGE_SIZE, HP=max(16, triton.next_power_of_2(h)), BN=cfg["block_n"],
        PRECISION=dot_precision(q.dtype), UPCAST=interpreting(_decode_kernel),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
