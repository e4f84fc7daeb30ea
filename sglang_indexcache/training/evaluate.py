"""Held-out losses of a trained tiny model under IndexCache patterns, and the unigram baseline.

A pattern is applied the simple way transformers allows: every layer's indexer is loaded, then the
S layers' ``self_attn.indexer`` is set to ``None`` so they reuse the previous F layer's top-k.
Losses are total nats over total predicted tokens (STYLE.md).
"""

from __future__ import annotations

import numpy as np
import torch

from sglang_indexcache import pattern as pattern_mod


def apply_pattern(model, indexers: list, pattern: str) -> None:
    """Give the F layers of ``pattern`` their indexer (from ``indexers``) and the S layers none."""
    pattern = pattern_mod.validate(pattern, len(indexers))
    for layer, indexer, kind in zip(model.model.layers, indexers, pattern):
        layer.self_attn.indexer = indexer if kind == "F" else None


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 4, autocast: bool = False) -> float:
    """Mean next-token loss (nats) over ``blocks [n, seq_len]`` (int64), every block full length."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=batch, labels=batch)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(out.loss) * n
        count += n
    return total / count


def pattern_losses(model, blocks: torch.Tensor, patterns: dict[str, str], batch_size: int = 4,
                   autocast: bool = False) -> dict[str, float]:
    """``{label: loss}`` for each ``{label: pattern}``; the model's indexers are restored after."""
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    if any(ix is None for ix in indexers):
        raise ValueError("pattern_losses needs a model loaded with every layer's indexer")
    try:
        out = {}
        for label, pattern in patterns.items():
            apply_pattern(model, indexers, pattern)
            out[label] = lm_loss(model, blocks, batch_size, autocast)
        return out
    finally:
        apply_pattern(model, indexers, "F" * len(indexers))


def standard_patterns(num_layers: int) -> dict[str, str]:
    """all-F, every-2, every-4 and only layer 0 full (``every-N`` = ``pattern.uniform(n, N)``)."""
    return {
        "all-F": "F" * num_layers,
        "every-2": pattern_mod.uniform(num_layers, 2),
        "every-4": pattern_mod.uniform(num_layers, 4),
        "only-0": pattern_mod.uniform(num_layers, num_layers),
    }


def unigram_loss(train_stream: np.ndarray, blocks: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the add-one-smoothed training unigram distribution on the tokens a
    causal LM predicts in ``blocks`` (positions 1..seq_len-1 of each block)."""
    counts = np.bincount(train_stream.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = blocks[:, 1:].reshape(-1).numpy()
    return float(-logp[targets].mean())
