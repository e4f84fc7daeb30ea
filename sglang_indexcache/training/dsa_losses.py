"""The DSA indexer-training losses over a transformers ``GlmMoeDsaForCausalLM`` (PAPER.md).

Each layer's indexer is wrapped in a :class:`TrainIndexer` (``models.swap.wrap_indexers(model,
TrainIndexer, require_all=True, mode=...)``; ``swap.unwrap_indexers`` puts the originals back) that
has three modes:

- ``"dense"``: the indexer is bypassed and every causal position is selected (dense attention);
- ``"warmup"``: index scores ``I [B, S, T]`` are computed WITH gradients (``models.indexer``) and kept,
  attention stays dense;
- ``"sparse"``: the same scores, computed from DETACHED inputs (so the indexer loss never reaches
  the main model), select the top-k for the attention (non-differentiable, as in DSA).

An :class:`AttentionProbe` hooks every attention module (eager attention) and keeps
``p [B, S, T]``: the attention probabilities summed over heads and L1-normalised per query,
detached. The indexer loss per layer is ``KL(p_t || softmax(I_t))`` averaged over queries, over
the causal positions (warm-up) or over the selected set only (sparse stage).
"""

from __future__ import annotations

import torch

from sglang_indexcache.models import swap
from sglang_indexcache.models.indexer import apply_mask, causal_topk, indexer_logits

MODES = ("dense", "warmup", "sparse")


class TrainIndexer(swap.IndexerWrapper):
    """Drop-in for ``GlmMoeDsaIndexer`` during training; ``inner`` keeps the checkpoint's weights.

    After a forward, ``scores`` holds the masked index scores ``[B, S, T]`` (float32, ``-inf`` at
    invisible keys; ``None`` in dense mode) and ``topk`` the selected indices ``[B, S, k]`` (int32;
    ``None`` in dense and warm-up modes).
    """

    def __init__(self, inner, mode: str = "dense"):
        super().__init__(inner)
        self.mode = mode
        self.scores = None
        self.topk = None

    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        batch, seq, _ = hidden_states.shape
        self.scores = self.topk = None
        if self.mode not in MODES:
            raise ValueError(f"unknown indexer mode {self.mode!r}")
        if self.mode != "dense":
            hs, qr = hidden_states, q_resid
            if self.mode == "sparse":  # the indexer's input is detached in the sparse stage
                hs, qr = hs.detach(), qr.detach()
            with torch.autocast(hidden_states.device.type, enabled=False):
                pe = tuple(t.float() for t in position_embeddings)
                logits = indexer_logits(self.inner, hs.float(), qr.float(), pe)  # [B, S, T]
            self.scores = apply_mask(logits, attention_mask)
        if self.mode == "sparse":
            self.topk = causal_topk(self.scores.detach(), self.inner.index_topk)  # [B, S, k]
            return self.topk
        # every key position: the index mask is empty and the causal mask alone applies
        all_keys = torch.arange(seq, device=hidden_states.device, dtype=torch.int32)
        return all_keys.expand(batch, seq, seq)


class AttentionProbe:
    """Forward hooks on every ``self_attn`` that keep ``probs[l] = p [B, S, T]`` (float32, detached,
    head-summed, L1-normalised per query). Needs eager attention (SDPA returns no weights)."""

    def __init__(self, model):
        self.probs: dict[int, torch.Tensor] = {}
        self.handles = [layer.self_attn.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, args, output):
        weights = output[1]
        if weights is None:
            raise RuntimeError("attention weights unavailable: set the eager attention implementation")
        p = weights.detach().float().sum(dim=1)  # [B, S, T]
        self.probs[module.layer_idx] = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.probs.clear()


def kl_to_scores(p: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``KL(p_t || softmax(scores_t))``.

    ``p [..., T]`` float32 target, rows sum to 1 over visible keys (0 elsewhere); ``scores [..., T]``
    float32 with ``-inf`` at invisible keys. Returns a scalar (nats per query).
    """
    visible = torch.isfinite(scores)
    logq = torch.log_softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    p = p.masked_fill(~visible, 0.0)
    return (torch.xlogy(p, p) - p * logq).sum(dim=-1).mean()


def dense_indexer_loss(p: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Warm-up loss of one layer: KL over all causal positions. ``p, scores [B, S, T]``."""
    return kl_to_scores(p, scores)


def sparse_indexer_loss(p: torch.Tensor, scores: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """Sparse-stage loss of one layer: KL restricted to the selected set.

    ``p [B, S, T]`` attention over the selected keys, ``scores [B, S, T]`` masked index scores,
    ``topk [B, S, k]`` int32 selection (may name invisible keys for early queries: those carry
    ``-inf`` scores and are excluded). Both distributions are renormalised over the selection.
    """
    idx = topk.long()
    p_sel = p.gather(-1, idx)  # [B, S, k]
    s_sel = scores.gather(-1, idx)  # [B, S, k]
    p_sel = p_sel.masked_fill(~torch.isfinite(s_sel), 0.0)
    p_sel = p_sel / p_sel.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return kl_to_scores(p_sel, s_sel)


def indexer_losses(wrappers: list[TrainIndexer], probe: AttentionProbe) -> list[torch.Tensor]:
    """Per-layer indexer loss after a forward in ``warmup`` or ``sparse`` mode (scalars, with grad)."""
    losses = []
    for w in wrappers:
        p = probe.probs[w.layer_idx]
        if w.mode == "sparse":
            losses.append(sparse_indexer_loss(p, w.scores, w.topk))
        else:
            losses.append(dense_indexer_loss(p, w.scores))
    return losses


def heldout_topk_recall(wrappers: list[TrainIndexer], probe: AttentionProbe, k: int) -> float:
    """Mean share of the attention mass ``p`` that the indexer's top-k captures (diagnostic)."""
    shares = []
    for w in wrappers:
        sel = causal_topk(w.scores.detach(), k).long()
        shares.append(probe.probs[w.layer_idx].gather(-1, sel).sum(-1).mean())
    return float(torch.stack(shares).mean()) if shares else float("nan")
