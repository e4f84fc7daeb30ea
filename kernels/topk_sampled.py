"""Row-wise top-k of long fp32 rows in about one read: a sampled threshold, then exact selection.

Same contract as ``topk.topk_rows`` (the specification: ``reference.select_topk`` per row over
``scores[r, :lengths[r]]``, ``-inf`` not a candidate, ``-1`` padding), except that exactly-equal
scores at the threshold may be taken in any order (candidates are appended with atomics).

How (all on the device, no host sync, so it can be captured in a CUDA graph):

1. ``_threshold_kernel`` (one program per row): reads ``SAMPLE`` scores, in groups of 8 adjacent
   ones (one 32-byte sector each) at evenly spaced positions of the row, and finds, by three 8-bit radix digits of their order-preserving keys (histograms in
   registers), the floor ``tau`` of the 24-bit key bin holding the sample rank that ``target`` (1.5 x
   topk by default) candidates of the whole row would have (not a ``tl.sort`` of the sample:
   docs/kernels.md says why). A row no longer than
   ``SAMPLE`` is sampled whole; when the rank passes its finite samples every finite score is taken
   (and the row is "exhaustive" if it was sampled whole).
2. ``_gather_kernel`` (``parts`` programs per row, each one slice of it; more slices when there are
   few rows): one read of the row; every score ``>= tau`` is appended, with its column, to the row's
   candidate list of ``capacity`` slots (a per-row atomic counter reserves each block's slots).
3. ``_finish_kernel`` decides per row whether its list holds the answer; ``topk.topk_rows`` then
   selects on the candidate lists (at most ``capacity`` each: cheap) the rows it does, writing the
   list slots' columns (``columns=``) straight into ``out``.
4. Rows where the sample misled (fewer than ``topk`` candidates and not exhaustive, or more than
   ``capacity``: heavy ties, adversarial order) are selected again by ``topk_rows`` on the whole row,
   into the same ``out`` (the other rows are skipped: ``skip_negative``).

Launches: five (threshold, which also clears the counters; gather; finish; two selections), nothing
else (no PyTorch element-wise op): a decode step's selection is launch-bound at small batch, where
SGLang's one-kernel top-k took 0.026 ms against our 0.13 ms with the ~15 launches before (H200,
2026-12-04).

Full-row reads: one (plus ``SAMPLE`` scattered elements); a fallback row takes the radix kernel's 2-5.
With ``SAMPLE`` = 4096 and 1.5 x topk expected candidates, a random row of 200K falls back when the
sampled rank misses by more than a third: about 0.3% of rows (the binomial tail at 63 samples).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .topk import MAX_COLUMNS, topk_rows

__all__ = ["topk_rows_sampled"]

SAMPLE = 4096
BLOCK = 2048                        # scores per step of the gather (4 warps; GPU sweep: docs/kernels.md)


@triton.jit
def _key(x):
    """Order-preserving int32 key of fp32 ``x`` (a larger float has a larger signed key)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pick(hist, need, NB: tl.constexpr):
    """Bin holding the ``need``-th largest of ``hist`` [NB] (counts per digit) and the count above it."""
    j = tl.arange(0, NB)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist        # [NB] count of digits >= j
    b = tl.max(tl.where(at_or_above >= need, j, 0), 0)
    above = tl.sum(tl.where(j > b, hist, 0), 0)
    return b, above


@triton.jit
def _threshold_kernel(x_ptr, len_ptr, tau_ptr, exh_ptr, n, stride_x, target, rlen_ptr, cnt_ptr,
                      HAS_LEN: tl.constexpr, S: tl.constexpr, HAS_RLEN: tl.constexpr, ZERO_CNT: tl.constexpr):
    """tau[r] = the key of the sampled score at the rank ``target`` candidates would have, down to its
    top 24 bits (three 8-bit radix digits over the sample); exh[r] = 1 when every finite score of
    the row is >= tau (the sample was the whole row and the rank reached its end); ``ZERO_CNT``:
    cnt[r] = 0 (the gather's counter, so that no separate launch clears it)."""
    r = tl.program_id(0)
    if ZERO_CNT:
        tl.store(cnt_ptr + r, 0)
    length = n
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), n)
    i = tl.arange(0, S)
    groups = S // 8                                                 # 8 adjacent scores = one 32-byte sector
    pos = ((i // 8).to(tl.int64) * length) // groups + i % 8       # [S] evenly spread, all if length <= S
    x = tl.load(x_ptr + r.to(tl.int64) * stride_x + pos, mask=pos < length, other=float("-inf"))
    valid = x > float("-inf")
    u = _key(x) ^ -2147483648                                       # unsigned order, int32 bits
    span = length
    if HAS_RLEN:                                                    # the row the sample stands for
        span = tl.load(rlen_ptr + r)
    rank = tl.minimum(tl.cdiv(target * S, tl.maximum(span, 1)), S)  # 1-based, among the samples
    d1 = (u >> 24) & 255
    b1, above = _pick(tl.histogram(d1, 256, mask=valid), rank, 256)
    in1 = valid & (d1 == b1)
    d2 = (u >> 16) & 255
    b2, above2 = _pick(tl.histogram(d2, 256, mask=in1), rank - above, 256)
    in2 = in1 & (d2 == b2)
    d3 = (u >> 8) & 255
    b3, above3 = _pick(tl.histogram(d3, 256, mask=in2), rank - above - above2, 256)
    tau = ((b1 << 24) | (b2 << 16) | (b3 << 8)) ^ -2147483648       # signed key of the bin's floor
    take_all = rank >= tl.sum(valid.to(tl.int32), 0)                # the rank reaches the last finite sample
    tau = tl.where(take_all, -2147483648, tau)
    tl.store(tau_ptr + r, tau)
    tl.store(exh_ptr + r, (take_all & (length <= S)).to(tl.int32))


@triton.jit
def _finish_kernel(cnt_ptr, exh_ptr, len_ptr, list_len_ptr, full_len_ptr, rows, n, topk, cap,
                   HAS_LEN: tl.constexpr, FALLBACK: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: ``ok`` = the list holds the whole answer (no overflow, and ``topk`` candidates or the
    whole row). list_len = count where ok, else -1 (skip; 0 without ``FALLBACK``: the row comes out
    -1); full_len = the row's length where not ok, else -1 (skip)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < rows
    count = tl.load(cnt_ptr + r, mask=m, other=0)
    exh = tl.load(exh_ptr + r, mask=m, other=0)
    length = tl.full([BLOCK], n, tl.int32)
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + r, mask=m, other=0), 0), n)
    ok = (count <= cap) & ((count >= topk) | (exh > 0))
    tl.store(list_len_ptr + r, tl.where(ok, count, -1 if FALLBACK else 0), mask=m)
    tl.store(full_len_ptr + r, tl.where(ok, -1, length), mask=m)


@triton.jit
def _gather_kernel(x_ptr, len_ptr, tau_ptr, val_ptr, col_ptr, cnt_ptr, n, stride_x, part_len, cap,
                   HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    """Append the scores >= tau of columns [p*part_len, (p+1)*part_len) of row r to its list."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    length = n
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), n)
    tau_key = tl.load(tau_ptr + r)                                  # int32 key -> the float it orders as
    tau = (tau_key ^ ((tau_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    tau = tl.where(tau_key == -2147483648, float("-inf"), tau)      # "take all" (its bits are a NaN)
    row = x_ptr + r.to(tl.int64) * stride_x
    lo = p * part_len
    hi = tl.minimum(lo + part_len, length)
    for start in range(lo, hi, BLOCK):
        col = start + tl.arange(0, BLOCK)
        x = tl.load(row + col, mask=col < hi, other=float("-inf"))
        hit = (x >= tau) & (x > float("-inf")) & (col < hi)
        count = tl.sum(hit.to(tl.int32))
        if count > 0:
            base = tl.atomic_add(cnt_ptr + r, count)                # reserve this block's slots
            slot = base + tl.cumsum(hit.to(tl.int32), 0) - 1
            keep = hit & (slot < cap)
            dst = r.to(tl.int64) * cap + slot
            tl.store(val_ptr + dst, x, mask=keep)
            tl.store(col_ptr + dst, col, mask=keep)


def topk_rows_sampled(scores, topk: int, *, lengths=None, out=None, capacity: int | None = None,
                      target: int | None = None, parts: int | None = None, sample: int = SAMPLE,
                      fallback: bool = True, check_fallback: bool = False):
    """Column indices ``[R, topk]`` int32 of the ``topk`` largest candidates of each row.

    Args as ``topk.topk_rows`` (``scores [R, N]`` fp32 unit column stride, ``lengths [R]`` int32,
    ``out [R, topk]`` int32), plus: ``capacity`` candidate slots per row (default 4 x topk),
    ``target`` expected candidates (default 1.5 x topk), ``parts`` programs per row (default: enough
    to fill the device twice over), ``sample`` scores read per row for the threshold (a power of
    two), ``fallback=False`` skips step 4 (tests of the sampled path only: a misled row is wrong),
    ``check_fallback=True`` runs step 4 only if some row needs it (a host sync: not in CUDA graphs;
    step 4 over rows of length 0 still writes every row).
    """
    if not isinstance(topk, int) or isinstance(topk, bool) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if scores.dim() == 2 and scores.shape[1] >= MAX_COLUMNS:
        raise ValueError(f"scores must have fewer than 2**31 columns (int32 column indices), got {scores.shape[1]}")
    if scores.dim() != 2 or scores.dtype != torch.float32 or (scores.shape[1] > 1 and scores.stride(1) != 1):
        raise ValueError(f"scores must be 2-D float32 with unit column stride, got {scores.dtype} "
                         f"{list(scores.shape)} strides {tuple(scores.stride())}")
    rows, n = scores.shape
    if lengths is not None and (lengths.dtype != torch.int32 or tuple(lengths.shape) != (rows,)):
        raise ValueError(f"lengths must be int32 [{rows}], got {lengths.dtype} {list(lengths.shape)}")
    capacity = capacity or 4 * topk
    target = target or (3 * topk + 1) // 2
    if capacity < topk or target < 1:
        raise ValueError(f"capacity must be >= topk and target >= 1, got {capacity}, {target}")
    if sample < 16 or sample & (sample - 1):
        raise ValueError(f"sample must be a power of two >= 16, got {sample}")
    if target * sample >= MAX_COLUMNS:
        raise ValueError(f"target x sample must be below 2**31 (the sampled rank is int32), got {target} x {sample}")
    if out is None:
        out = torch.empty(rows, topk, dtype=torch.int32, device=scores.device)
    if rows == 0:
        return out
    dev = scores.device
    if parts is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        parts = max(1, min(triton.cdiv(2 * sms, rows), triton.cdiv(n, BLOCK)))
    part_len = triton.cdiv(triton.cdiv(max(n, 1), parts), BLOCK) * BLOCK
    has_len = lengths is not None
    len_arg = lengths if has_len else scores
    tau, exh, count, list_len, full_len = torch.empty(5, rows, dtype=torch.int32, device=dev)
    vals = torch.empty(rows, capacity, dtype=torch.float32, device=dev)
    cols = torch.empty(rows, capacity, dtype=torch.int32, device=dev)
    _threshold_kernel[(rows,)](scores, len_arg, tau, exh, n, scores.stride(0), target, tau, count,
                               HAS_LEN=has_len, S=sample, HAS_RLEN=False, ZERO_CNT=True, num_warps=8)
    _gather_kernel[(rows, triton.cdiv(max(n, 1), part_len))](
        scores, len_arg, tau, vals, cols, count, n, scores.stride(0), part_len, capacity,
        HAS_LEN=has_len, BLOCK=BLOCK, num_warps=4)
    _finish_kernel[(triton.cdiv(rows, 1024),)](count, exh, len_arg, list_len, full_len, rows, n, topk, capacity,
                                               HAS_LEN=has_len, FALLBACK=fallback, BLOCK=1024, num_warps=4)
    # the rows the lists answer, written straight into out (list slots mapped to their columns) ...
    topk_rows(vals, topk, lengths=list_len, out=out, columns=cols, skip_negative=True, num_warps=4)
    if fallback and (not check_fallback or bool((full_len >= 0).any())):
        topk_rows(scores, topk, lengths=full_len, out=out, skip_negative=True)   # ... and the others
    return out
