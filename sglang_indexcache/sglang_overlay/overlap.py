"""Recall of reused top-k against each layer's own top-k (``POST /index_cache/overlap``).

Input is what SGLang's indexer top-k capturer returns with every indexer running (all-F):
``topk`` int32 ``[t, l, topk]`` — for each of ``t`` token positions and each of ``l`` DSA layers,
the key positions that layer's indexer selected, padded with -1.
"""

from __future__ import annotations

import numpy as np

from .. import pattern as pat


def recall(own: np.ndarray, reused: np.ndarray) -> np.ndarray:
    """Per token, the share of ``own``'s valid indices that ``reused`` also holds
    (``kernels.reference.set_overlap``, the one definition).

    own, reused: int ``[t, topk]`` (-1 = padding). Returns float64 ``[t]``; NaN where ``own`` has
    no valid index.
    """
    import torch

    from ..kernels.reference import set_overlap

    share = set_overlap(torch.from_numpy(np.asarray(own)), torch.from_numpy(np.asarray(reused))).double().numpy()
    return np.where((np.asarray(own) >= 0).any(axis=1), share, np.nan)


def shared_layer_recall(topk: np.ndarray, pattern: str) -> dict:
    """For each layer j of ``pattern``: mean recall of its source layer's top-k against j's own.

    topk: int ``[t, l, k]`` captured with every indexer running. An F layer is its own source, so
    its row measures the capture against itself (1.0 unless a token has no valid index: a check on
    the capture); ``mean_recall`` averages the S layers only. Returns ``{"pattern", "tokens",
    "layers": [{"layer", "source", "shared", "recall"}], "mean_recall"}``.
    """
    if topk.ndim != 3:
        raise ValueError(f"topk must be [tokens, layers, topk], got shape {topk.shape}")
    pattern = pat.validate(pattern, topk.shape[1])
    rows = []
    for layer, source in enumerate(pat.reuse_source(pattern)):
        per_token = recall(topk[:, layer, :], topk[:, source, :])  # [t]
        value = float(np.nanmean(per_token)) if np.isfinite(per_token).any() else None
        rows.append({"layer": layer, "source": source, "shared": source != layer, "recall": value})
    values = [r["recall"] for r in rows if r["shared"] and r["recall"] is not None]
    return {"pattern": pattern, "tokens": int(topk.shape[0]), "layers": rows,
            "mean_recall": float(np.mean(values)) if values else None}
