"""Top-k reuse across decode steps, simulated teacher-forced over a whole block (no KV cache).

An F layer with decode stride ``N`` runs its indexer only at *refresh* positions, the multiples of
``N`` (``t0 = (t // N) * N``; stride 1 refreshes at every position, i.e. today's behaviour). A
refresh query ``t = t0`` attends over its own top-k, as today; a later query ``t`` of the period
attends over

- the newest positions ``t0 + 1 .. t`` (``d = t - t0`` of them, the query's own token last), always in;
- the top-k that query ``t0`` computed (keys ``<= t0``, stored sorted by their score at ``t0``), of
  which only the best ``k - d`` are kept: **the lowest-scored stored entries (scores at ``t0``) are
  dropped** so that the set never holds more than ``k = min(index_topk, keys)`` entries.

So at most ``k`` distinct keys, every one ``<= t``; when ``d >= k`` only the newest ``k`` positions
remain. S layers reuse what their F layer produced at the same position, as within one forward.

Teacher-forced reading: every position of the block is treated as a decode step of the same
request (the prompt is decoded too), which is pessimistic for a real request whose prompt is
prefilled with exact top-k. Refreshes at absolute positions ``0, N, 2N, ...`` stand for "every N
decode steps"; a server counts steps per request instead.

``drop="random"`` (:func:`drop_order`, for comparison) drops stored entries in a random order
instead of the lowest-scored first: what a server would do with an unsorted top-k and no scores.

Slots that hold no key (queries with fewer than ``k`` visible keys) point after the query
(``keys - 1``), as transformers' own top-k does: the attention masks them (index ``> t``).
"""

from __future__ import annotations

import torch

__all__ = ["DROPS", "drop_order", "refresh_rows", "reuse_topk"]
DROPS = ("lowest", "random")


def refresh_rows(seq: int, stride: int, device=None) -> torch.Tensor:
    """Refresh positions ``[0, N, 2N, ...] < seq`` (int64 ``[R]``, ``R = ceil(seq / N)``)."""
    return torch.arange(0, seq, stride, device=device)


def drop_order(stored_idx: torch.Tensor, stored_score: torch.Tensor, drop: str, seed: int = 0):
    """Reorder a sorted stored top-k ``[B, R, k]`` so that :func:`reuse_topk` drops by ``drop``.

    ``"lowest"``: as given (best first). ``"random"``: the entries with a key in a random order (a
    fixed ``seed``), the empty slots (``-inf``) still last.
    """
    if drop == "lowest":
        return stored_idx, stored_score
    if drop != "random":
        raise ValueError(f"unknown drop order {drop!r}; one of {', '.join(DROPS)}")
    gen = torch.Generator(device=stored_score.device).manual_seed(seed)
    keys = torch.rand(stored_score.shape, generator=gen, device=stored_score.device)
    keys = keys.masked_fill(~torch.isfinite(stored_score), -1.0)                 # empty slots last
    order = keys.argsort(dim=-1, descending=True)
    return stored_idx.gather(-1, order), stored_score.gather(-1, order)


def reuse_topk(stored_idx: torch.Tensor, stored_score: torch.Tensor, stride: int, seq: int,
               keys: int) -> torch.Tensor:
    """The selection of every query of a block under decode stride ``stride`` -> int32 ``[B, S, k]``.

    Args:
        stored_idx: ``[B, R, k]`` int, the top-k of each refresh query ``t0 = r * stride``, sorted by
            score, highest first (``torch.topk``'s order).
        stored_score: ``[B, R, k]`` float, their scores at ``t0``; ``-inf`` marks a slot without a
            visible key (``t0 + 1 < k``).
        stride: ``N >= 1``; ``R = ceil(seq / N)``.
        seq: queries ``S`` of the block (query ``t`` is position ``t``).
        keys: keys ``T`` of the block (``>= S``), for the placeholder ``T - 1`` of empty slots.

    Column ``c`` of query ``t`` (``d = t - t0``): stored entry ``c`` if ``c < k - d``, else the new
    position ``t - (k - 1 - c)`` (so the last column is ``t`` itself). Built for all queries at once.
    """
    batch, rows, k = stored_idx.shape
    device = stored_idx.device
    t = torch.arange(seq, device=device)                                  # [S]
    r = t // stride                                                       # [S] refresh row of each query
    if rows != int(r[-1]) + 1:
        raise ValueError(f"{rows} stored rows for {seq} queries at stride {stride}; expected {int(r[-1]) + 1}")
    d = t - r * stride                                                    # [S] steps since the refresh
    c = torch.arange(k, device=device)                                    # [k]
    from_store = c[None, :] < (k - d)[:, None]                            # [S, k]
    newest = t[:, None] - (k - 1 - c)[None, :]                            # [S, k]
    stored = stored_idx.long()[:, r]                                      # [B, S, k]
    present = torch.isfinite(stored_score)[:, r]                          # [B, S, k]
    stored = torch.where(present, stored, torch.full_like(stored, keys - 1))
    return torch.where(from_store[None], stored, newest[None].expand(batch, -1, -1)).to(torch.int32)
