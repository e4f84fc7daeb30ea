"""Row-wise top-k of long fp32 rows in about one read: a sampled threshold, then exact selection.

Same contract as ``topk.topk_rows`` (the specification: ``reference.select_topk`` per row over
``scores[r, :lengths[r]]``, ``-inf`` not a candidate, ``-1`` padding), except that exactly-equal
scores at the threshold may be taken in any order (candidates are appended with atomics).

How (all on the device, no host sync, so it can be captured in a CUDA graph):

1. ``_threshold_kernel`` (one program per row): sorts ``SAMPLE`` scores read at evenly spaced
   positions of the row and takes as threshold ``tau`` the one at the rank that ``target`` (1.5 x
   topk by default) candidates of the whole row would have. A row no longer than ``SAMPLE`` is
   sampled whole; if the rank reaches its end, ``tau`` is the row's minimum ("exhaustive").
2. ``_gather_kernel`` (``parts`` programs per row, each one slice of it; more slices when there are
   few rows): one read of the row; every score ``>= tau`` is appended, with its column, to the row's
   candidate list of ``capacity`` slots (a per-row atomic counter reserves each block's slots).
3. ``topk.topk_rows`` on the candidate lists (at most ``capacity`` each: cheap), columns mapped back.
4. Rows where the sample misled (fewer than ``topk`` candidates and not exhaustive, or more than
   ``capacity``: heavy ties, adversarial order) are selected again by ``topk_rows`` on the whole row
   (all rows go through that call; the others with length 0, which costs nothing).

Full-row reads: one (plus ``SAMPLE`` scattered elements); a fallback row takes the radix kernel's 2-5.
With ``SAMPLE`` = 4096 and 1.5 x topk expected candidates, a random row of 200K falls back when the
sampled rank misses by more than a third: about 0.3% of rows (the binomial tail at 63 samples).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import interpreting
from .topk import topk_rows

__all__ = ["topk_rows_sampled"]

SAMPLE = 4096
BLOCK = 4096


@triton.jit
def _threshold_kernel(x_ptr, len_ptr, tau_ptr, exh_ptr, n, stride_x, target,
                      HAS_LEN: tl.constexpr, S: tl.constexpr):
    """tau[r] = the sampled score at the rank ``target`` candidates would have; exh[r] = 1 when every
    finite score of the row is >= tau (the sample was the whole row and the rank reached its end)."""
    r = tl.program_id(0)
    length = n
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), n)
    i = tl.arange(0, S)
    pos = (i.to(tl.int64) * length) // S                           # [S] evenly spaced, all if length <= S
    x = tl.load(x_ptr + r.to(tl.int64) * stride_x + pos, mask=pos < length, other=float("-inf"))
    xs = tl.sort(x, descending=True)                                # [S]
    rank = tl.minimum(tl.cdiv(target * S, tl.maximum(length, 1)), S)  # 1-based rank in the sample
    tau = tl.sum(tl.where(i == rank - 1, xs, 0.0))
    tau = tl.where(rank >= S, tl.min(xs), tau)
    exhaustive = (tau == float("-inf")) | ((rank >= S) & (length <= S))
    tl.store(tau_ptr + r, tau)
    tl.store(exh_ptr + r, exhaustive.to(tl.int32))


@triton.jit
def _gather_kernel(x_ptr, len_ptr, tau_ptr, val_ptr, col_ptr, cnt_ptr, n, stride_x, part_len, cap,
                   HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    """Append the scores >= tau of columns [p*part_len, (p+1)*part_len) of row r to its list."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    length = n
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), n)
    tau = tl.load(tau_ptr + r)
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
                      target: int | None = None, parts: int | None = None, sample: int | None = None,
                      fallback: bool = True):
    """Column indices ``[R, topk]`` int32 of the ``topk`` largest candidates of each row.

    Args as ``topk.topk_rows`` (``scores [R, N]`` fp32 unit column stride, ``lengths [R]`` int32,
    ``out [R, topk]`` int32), plus: ``capacity`` candidate slots per row (default 4 x topk),
    ``target`` expected candidates (default 1.5 x topk), ``parts`` programs per row (default: enough
    to fill the device twice over), ``sample`` scores sorted per row (a power of two; default
    ``SAMPLE``, and 32 under the CPU interpreter, whose sort takes about 0.25 s per row at 256: more
    rows fall back there, the results are the same), ``fallback=False`` skips step 4 (tests of the
    sampled path only: a misled row is then wrong).
    """
    if not isinstance(topk, int) or isinstance(topk, bool) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
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
    sample = sample or (32 if interpreting(_threshold_kernel) else SAMPLE)
    if sample < 16 or sample & (sample - 1):
        raise ValueError(f"sample must be a power of two >= 16, got {sample}")
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
    tau = torch.empty(rows, dtype=torch.float32, device=dev)
    exh = torch.empty(rows, dtype=torch.int32, device=dev)
    count = torch.zeros(rows, dtype=torch.int32, device=dev)
    vals = torch.empty(rows, capacity, dtype=torch.float32, device=dev)
    cols = torch.empty(rows, capacity, dtype=torch.int32, device=dev)
    _threshold_kernel[(rows,)](scores, len_arg, tau, exh, n, scores.stride(0), target,
                               HAS_LEN=has_len, S=sample, num_warps=8)
    _gather_kernel[(rows, triton.cdiv(max(n, 1), part_len))](
        scores, len_arg, tau, vals, cols, count, n, scores.stride(0), part_len, capacity,
        HAS_LEN=has_len, BLOCK=BLOCK, num_warps=8)
    ok = (count <= capacity) & ((count >= topk) | (exh > 0))
    local = topk_rows(vals, topk, lengths=torch.where(ok, count, 0))
    picked = cols.gather(1, local.clamp(min=0).long())
    out.copy_(torch.where(local >= 0, picked, -1))
    if fallback:
        full = lengths if has_len else torch.full((rows,), n, dtype=torch.int32, device=dev)
        again = topk_rows(scores, topk, lengths=torch.where(ok, 0, full))
        out.copy_(torch.where(ok[:, None], out, again))
    return out
