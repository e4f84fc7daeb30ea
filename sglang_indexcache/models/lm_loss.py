"""LM loss under a pattern: the one definition, whatever runs the forward.

Losses are total next-token nats over total predicted tokens (``S - 1`` per block of ``S``,
STYLE.md). A forward is given as ``batch_nll(ids [B, S]) -> (nll_sum, tokens)``: the calibration
backends' layer-wise forward (transformers or an SGLang server), or :func:`forward_nll` (transformers'
own ``model(input_ids, labels=...)``). A pattern is applied by a ``set_pattern(pattern)`` callable
(``TransformersBackend.set_pattern``, ``ServerBackend.set_pattern``, or :func:`.swap.apply_pattern`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossResult", "as_ids", "summed_loss", "next_token_nll", "forward_nll", "pattern_losses"]


@dataclass
class LossResult:
    """Summed next-token negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    nll_sum: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll_sum / max(self.tokens, 1)


def as_ids(blocks) -> torch.Tensor:
    """``input_ids [n, S]`` of TokenBlocks or of a LongTensor itself."""
    ids = getattr(blocks, "input_ids", blocks)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError(f"expected TokenBlocks or a LongTensor [n, seq], got {type(blocks).__name__}")
    return ids


def summed_loss(batch_nll, blocks, batch_size: int = 4, progress=None) -> LossResult:
    """Sum ``batch_nll(ids [B, S]) -> (nll, tokens)`` over ``blocks`` in batches of ``batch_size``."""
    ids = as_ids(blocks)
    nll_sum, tokens = 0.0, 0
    starts = range(0, ids.shape[0], batch_size)
    for start in (progress(starts) if progress else starts):
        nll, count = batch_nll(ids[start:start + batch_size])
        nll_sum, tokens = nll_sum + nll, tokens + count
    return LossResult(nll_sum, tokens)


def next_token_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Final norm + lm_head of a GlmMoeDsa model on the last hidden states ``[B, S, hidden]``:
    summed next-token NLL (float64 sum of float32 terms) and the count of predicted tokens."""
    hidden = model.model.norm(hidden)
    labels = input_ids[:, 1:].to(hidden.device)  # [B, S-1]
    nll = 0.0
    for b in range(hidden.shape[0]):  # per sequence: [S-1, V] logits stay below glibc's mmap threshold
        logits = model.lm_head(hidden[b, :-1]).float()  # [S-1, V]
        nll += float(F.cross_entropy(logits, labels[b], reduction="sum"))
    return nll, int(labels.numel())


def forward_nll(model, autocast: bool = False):
    """``batch_nll`` through transformers' own forward (``model(input_ids, labels=input_ids)``),
    bf16 autocast when asked; every block full length."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def batch_nll(ids: torch.Tensor) -> tuple[float, int]:
        batch = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=batch, labels=batch)
        n = batch.shape[0] * (batch.shape[1] - 1)
        return float(out.loss) * n, n
    return batch_nll


def pattern_losses(set_pattern, batch_nll, blocks, patterns: dict, batch_size: int = 4,
                   progress=None) -> dict:
    """``{label: LossResult}`` of ``blocks`` under each ``{label: pattern}``, the same blocks for all.

    ``progress(label, starts)``, when given, wraps each pattern's batch loop (a progress bar). The
    last pattern stays applied.
    """
    out = {}
    for label, pattern in patterns.items():
        set_pattern(pattern)
        bar = (lambda it, label=label: progress(label, it)) if progress else None
        out[label] = summed_loss(batch_nll, blocks, batch_size, bar)
    return out
