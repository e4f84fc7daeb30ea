"""Held-out losses of a trained tiny model under IndexCache patterns, and the unigram baseline.

A pattern is applied the simple way transformers allows: every layer's indexer is loaded, then the
S layers' ``self_attn.indexer`` is set to ``None`` so they reuse the previous F layer's top-k.
Losses are total nats over total predicted tokens (STYLE.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sglang_indexcache import pattern as pattern_mod
from sglang_indexcache.models import lm_loss as lm
from sglang_indexcache.models.swap import apply_pattern, current_indexers
from sglang_indexcache.validation import require_every_indexer


def lm_loss(model, blocks: torch.Tensor, batch_size: int = 4, autocast: bool = False) -> float:
    """Mean next-token loss (nats) over ``blocks [n, seq_len]`` (int64), every block full length."""
    return lm.summed_loss(lm.forward_nll(model, autocast), blocks, batch_size).mean


def pattern_losses(model, blocks: torch.Tensor, patterns: dict[str, str], batch_size: int = 4,
                   autocast: bool = False) -> dict[str, float]:
    """``{label: loss}`` for each ``{label: pattern}``; the model's indexers are restored after."""
    indexers = current_indexers(model)
    require_every_indexer(len(indexers), [i for i, ix in enumerate(indexers) if ix is not None], "the model",
                          "pattern_losses needs every layer's indexer", ValueError)
    try:
        losses = lm.pattern_losses(lambda p: apply_pattern(model, indexers, p), lm.forward_nll(model, autocast),
                                   blocks, patterns, batch_size)
        return {label: result.mean for label, result in losses.items()}
    finally:
        apply_pattern(model, indexers, pattern_mod.FULL * len(indexers))


def standard_patterns(num_layers: int) -> dict[str, str]:
    """all-F, every-2, every-4 and only layer 0 full (``every-N`` = ``pattern.uniform(n, N)``)."""
    return {
        "all-F": pattern_mod.FULL * num_layers,
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


def heldout_losses(model_dir, stream: np.ndarray, device: str, batch_size: int, seq_len: int) -> dict:
    """Held-out losses of a saved tiny model (float32) on ``model_dir/data/evaluation.txt``: the
    :func:`standard_patterns` and the unigram baseline of the training ``stream``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_indexcache.calibration.data import load_blocks
    from sglang_indexcache.models.indexer import install_fast_indexers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = load_blocks(Path(model_dir) / "data" / "evaluation.txt", tokenizer, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if device == "cpu":
        install_fast_indexers(model)
    losses = pattern_losses(model, blocks.input_ids, standard_patterns(model.config.num_hidden_layers), batch_size)
    losses["unigram"] = unigram_loss(stream, blocks.input_ids, len(tokenizer))
    return {"data": blocks.describe(), "losses": {k: round(v, 4) for k, v in losses.items()}}
