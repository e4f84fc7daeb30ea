"""Decode-stride top-k reuse in serving: the stored top-k merged with the newer positions (Triton).

An F layer with decode stride ``N`` runs its indexer only on *refresh* steps; on the steps in
between it attends over the top-k it stored at its last refresh plus every position generated since
(``models/decode_reuse.py`` states the rule the quality numbers were measured with). In the server
the stored top-k lives per request slot (row of SGLang's ``ReqToTokenPool``), sorted by score, best
first; :func:`merge_reused_topk` builds one decode step's selection from it.

Specification (:func:`merge_reused_topk_ref`), for batch row ``b``:

- ``r = rows[b]`` (the request slot), ``t = seq_lens[b] - 1`` (this step's query position),
  ``t0 = refresh_pos[r]`` (the query position of the last refresh), ``d = t - t0`` the positions
  generated since, ``n = clamp(d, 0, k)`` of them taken;
- ``m``: the length of the stored row's valid prefix (entries ``>= 0``; a refresh at a query with
  fewer than ``k`` visible keys stores fewer, ``-1`` after them);
- output column ``c`` (``a = min(m, k - n)``): stored entry ``c`` if ``c < a`` (the **best**-scored
  stored entries are kept, the lowest-scored dropped first); the position ``t - (n - 1 - (c - a))``
  if ``a <= c < a + n`` (so the newest ``n`` positions, the query's own last); ``-1`` after.

With a full store (``m = k``) and ``1 <= d <= k`` this is exactly ``decode_reuse.reuse_topk``'s
column rule (stored entry ``c`` if ``c < k - d``, else position ``t - (k - 1 - c)``); with a short
store the valid entries are packed at the front (SGLang's sparse attention reads the first
``min(seq_len, k)`` columns), the same set as the reference rule.

Positions or KV slots: SGLang's DSA decode consumes physical KV slots when its top-k is fused with
the page-table transform (the default), token positions otherwise. With ``page_table`` (``[B, P]``
int32, pages of ``page_size`` tokens, the indexer's own ``get_page_table_64()``) the new positions
are mapped as ``page_table[b, p // page_size] * page_size + p % page_size`` (the stored entries are
already slots: :func:`positions_to_slots` mapped them at the refresh); a position outside the table
gives ``-1``. Without it, positions are written as they are.

Refresh side (plain PyTorch, graph-capturable): :func:`order_by_score` sorts an unsorted top-k by its
scores, best first (``-1`` last), and :func:`positions_to_slots` maps it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import interpreting

__all__ = ["merge_reused_topk", "merge_reused_topk_ref", "order_by_score", "positions_to_slots"]

DEFAULT_BLOCK = 1024


def _check(stored, refresh_pos, rows, seq_lens, page_table, page_size, out):
    if stored.dim() != 2 or stored.dtype != torch.int32 or stored.stride(1) != 1:
        raise ValueError(f"stored must be int32 [R, k] with unit column stride, got {stored.dtype} "
                         f"{list(stored.shape)}")
    r, k = stored.shape
    if refresh_pos.dtype != torch.int32 or tuple(refresh_pos.shape) != (r,):
        raise ValueError(f"refresh_pos must be int32 [{r}], got {refresh_pos.dtype} {list(refresh_pos.shape)}")
    if rows.dim() != 1 or seq_lens.shape != rows.shape:
        raise ValueError(f"rows and seq_lens must be [B] alike, got {list(rows.shape)} and {list(seq_lens.shape)}")
    for name, t in (("rows", rows), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    b = rows.shape[0]
    if page_table is not None:
        if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] < b \
                or page_table.stride(1) != 1:
            raise ValueError(f"page_table must be int32 [>= {b}, P] with unit column stride, got "
                             f"{page_table.dtype} {list(page_table.shape)}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
    if out is not None and (out.dtype != torch.int32 or tuple(out.shape) != (b, k) or out.stride(1) != 1):
        raise ValueError(f"out must be int32 [{b}, {k}] with unit column stride, got {out.dtype} {list(out.shape)}")
    return b, k


def positions_to_slots(positions: torch.Tensor, page_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV slots ``[B, k]`` int32 of token ``positions`` ``[B, k]`` (``-1`` stays ``-1``).

    ``page_table[b, p // page_size] * page_size + p % page_size``; a position past the table's
    width gives ``-1`` (it is never a valid key of the row)."""
    pos = positions.long()
    page = torch.div(pos, page_size, rounding_mode="floor")
    valid = (pos >= 0) & (page < page_table.shape[1])
    pages = page_table[: pos.shape[0]].long().gather(1, torch.where(valid, page, torch.zeros_like(page)))
    slots = pages * page_size + pos.remainder(page_size)
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32)


def order_by_score(positions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An unsorted top-k ``positions`` ``[B, k]`` (``-1`` padded) sorted by ``scores[b, p]``, best first.

    ``scores``: ``[B, T]`` float, the indexer's logits the top-k was taken from. ``-1`` entries go
    last; ties keep no particular order."""
    valid = positions >= 0
    gathered = scores[: positions.shape[0]].gather(1, positions.long().clamp(min=0)).float()
    keys = torch.where(valid, gathered, torch.full_like(gathered, float("-inf")))
    keys = torch.where(valid & torch.isnan(keys), torch.full_like(keys, float("inf")), keys)
    order = keys.argsort(dim=1, descending=True, stable=True)
    return positions.gather(1, order)


def merge_reused_topk_ref(stored: torch.Tensor, refresh_pos: torch.Tensor, rows: torch.Tensor,
                          seq_lens: torch.Tensor, page_table: torch.Tensor | None = None,
                          page_size: int = 64) -> torch.Tensor:
    """The specification of :func:`merge_reused_topk` (module docstring): ``[B, k]`` int32."""
    b, k = _check(stored, refresh_pos, rows, seq_lens, page_table, page_size, None)
    if b == 0:
        return torch.empty((0, k), dtype=torch.int32, device=stored.device)
    row = stored[rows.long()].long()                                      # [B, k]
    t = seq_lens.long() - 1                                               # [B]
    n = (t - refresh_pos[rows.long()].long()).clamp(0, k)                 # [B] new positions taken
    c = torch.arange(k, device=stored.device)                             # [k]
    invalid = row < 0
    m = torch.where(invalid.any(1), invalid.int().argmax(1), torch.full_like(t, k))  # [B] valid prefix
    a = torch.minimum(m, k - n)                                           # [B] stored entries kept
    new = t[:, None] - (n[:, None] - 1 - (c[None, :] - a[:, None]))       # [B, k]
    if page_table is not None:
        new = positions_to_slots(new, page_table, page_size).long()
    new = torch.where(new >= 0, new, torch.full_like(new, -1))
    out = torch.where(c[None, :] < a[:, None], row, torch.full_like(row, -1))
    out = torch.where((c[None, :] >= a[:, None]) & (c[None, :] < (a + n)[:, None]), new, out)
    return out.to(torch.int32)


@triton.jit
def _merge_kernel(stored_ptr, stored_stride, refresh_ptr, rows_ptr, seq_lens_ptr, table_ptr, table_stride,
                  table_width, out_ptr, out_stride, K, PAGE_SIZE, MAPPED: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                 # [BLOCK] output columns
    row = tl.load(rows_ptr + b).to(tl.int64)
    t = tl.load(seq_lens_ptr + b).to(tl.int64) - 1
    t0 = tl.load(refresh_ptr + row).to(tl.int64)
    n = tl.minimum(tl.maximum(t - t0, 0), K)
    base = stored_ptr + row * stored_stride
    m = K                                                                 # valid prefix of the stored row
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        entry = tl.load(base + idx, mask=idx < K, other=0)
        m = tl.minimum(m, tl.min(tl.where((entry < 0) & (idx < K), idx, K), axis=0))
    a = tl.minimum(m, K - n)
    live = cols < K
    kept = tl.load(base + cols, mask=live & (cols < a), other=-1).to(tl.int64)
    pos = t - (n - 1 - (cols - a))                                        # [BLOCK]
    is_new = (cols >= a) & (cols < a + n)
    if MAPPED:
        page = pos // PAGE_SIZE
        ok = is_new & (pos >= 0) & (page < table_width)
        slot = tl.load(table_ptr + b.to(tl.int64) * table_stride + page, mask=ok & live, other=0).to(tl.int64)
        new = tl.where(ok, slot * PAGE_SIZE + pos % PAGE_SIZE, -1)
    else:
        new = tl.where(pos >= 0, pos, -1)
    value = tl.where(cols < a, kept, tl.where(is_new, new, -1))
    tl.store(out_ptr + b.to(tl.int64) * out_stride + cols, value.to(tl.int32), mask=live)


def merge_reused_topk(stored: torch.Tensor, refresh_pos: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor,
                      page_table: torch.Tensor | None = None, page_size: int = 64, out: torch.Tensor | None = None,
                      block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """One decode step's reused top-k ``[B, k]`` int32; see the module docstring (the spec is
    :func:`merge_reused_topk_ref`). Reads only device tensors, launches one grid: capturable in a
    CUDA graph.

    Args:
        stored: ``[R, k]`` int32, per request slot the top-k of its last refresh, best first, ``-1``
            padded (KV slots with ``page_table``, else positions).
        refresh_pos: ``[R]`` int32, per request slot the query position of that refresh.
        rows: ``[B]`` int32/int64, the batch's request slots (SGLang's ``req_pool_indices``).
        seq_lens: ``[B]`` int32/int64, the batch's sequence lengths including this step's token.
        page_table: ``[>= B, P]`` int32 or None, pages of the batch's rows (maps new positions to slots).
        page_size: tokens per page of ``page_table``.
        out: optional ``[B, k]`` int32 destination.
    """
    b, k = _check(stored, refresh_pos, rows, seq_lens, page_table, page_size, out)
    if stored.device.type != "cuda" and not interpreting(_merge_kernel):
        raise ValueError(f"stored must be on a CUDA device (or run under TRITON_INTERPRET=1), got {stored.device}")
    if out is None:
        out = torch.empty((b, k), dtype=torch.int32, device=stored.device)
    if b == 0:
        return out
    block = min(block, triton.next_power_of_2(k))
    mapped = page_table is not None
    table = page_table if mapped else out                                # any int32 tensor when unused
    _merge_kernel[(b, triton.cdiv(k, block))](
        stored, stored.stride(0), refresh_pos, rows, seq_lens, table, table.stride(0),
        table.shape[1] if mapped else 0, out, out.stride(0), k, page_size, MAPPED=mapped, BLOCK=block)
    return out
