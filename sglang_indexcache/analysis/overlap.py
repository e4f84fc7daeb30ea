"""Cross-layer top-k overlap: how much of layer i's own top-k layer j also selects.

Entry ``[i][j]`` = mean over query tokens of ``|topk_i(t) & topk_j(t)| / k``, where ``topk_l(t)`` is
layer l's OWN top-k (every indexer run, as if all F). Only queries with more candidates than k
count (query t sees t + 1 keys, so ``t >= k``): earlier queries select every visible key in every
layer and would inflate the overlap to 1.
"""

from __future__ import annotations

import torch

METRIC = "mean share of layer i's own top-k that layer j also selects (queries with more than k candidates)"


def overlap_sums(topk: list[torch.Tensor], keys: int) -> tuple[torch.Tensor, int]:
    """Summed intersection shares ``[L, L]`` (float64) and the number of queries counted.

    ``topk``: per layer ``[B, S, k]`` int32 token indices (a layer's own top-k); ``keys``: S.
    """
    layers = len(topk)
    batch, seq, k = topk[0].shape
    if seq <= k:
        return torch.zeros(layers, layers, dtype=torch.float64), 0
    sums = torch.zeros(layers, layers, dtype=torch.float64)
    for b in range(batch):
        chosen = torch.stack([t[b, k:].long() for t in topk])  # [L, Q, k], queries t >= k
        member = torch.zeros(layers, seq - k, keys, dtype=torch.bool)  # [L, Q, T]
        member.scatter_(2, chosen, True)
        for i in range(layers):
            hits = member.gather(2, chosen[i].expand(layers, -1, -1))  # [L, Q, k]
            sums[i] += hits.sum(dim=(1, 2)).double() / k
    return sums, batch * (seq - k)


def overlap_matrix(backend, batches, progress=None) -> dict:
    """``{"layers", "topk", "tokens", "metric", "matrix"}`` over ``batches`` (each ``[B, S]``)."""
    total, count = None, 0
    for ids in (progress(batches) if progress else batches):
        topk = backend.record_topk(ids)
        sums, n = overlap_sums(topk, ids.shape[1])
        total = sums if total is None else total + sums
        count += n
    layers = backend.num_layers
    if count == 0:
        raise ValueError("no query has more candidates than k: use longer blocks (--seq-len) than index_topk")
    matrix = (total / count).tolist()
    return {"layers": layers, "topk": int(backend.config.index_topk), "tokens": count, "metric": METRIC,
            "matrix": matrix}


def adjacent_mean(matrix) -> float:
    """Mean of ``matrix[i][i+1]`` (layer i's top-k found in the next layer's)."""
    values = [matrix[i][i + 1] for i in range(len(matrix) - 1)]
    return sum(values) / len(values) if values else float("nan")
