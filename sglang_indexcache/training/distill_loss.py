"""Multi-layer distillation loss of training-aware IndexCache (PAPER.md, "Training-aware").

For an F layer ``l`` whose top-k serves the layers ``l, l+1, .., l+m`` (itself and its S layers,
``pattern.served_layers``), with ``q_t = softmax(I_t^(l))`` the indexer's distribution over the
visible keys of query ``t`` and ``p_t^(l+j)`` the head-averaged attention distribution of layer
``l+j`` (a detached target)::

    L_l = sum_{j=0..m} 1/(m+1) * sum_t KL(p_t^(l+j) || q_t)

Its gradient in the indexer logits is that of ``KL(mean_j p^(l+j) || q)`` (the centroid of the
served layers), since ``d/dI KL(p || softmax(I)) = q - p`` is linear in ``p``. With ``m = 0`` it is
the DSA warm-up loss ``sum_t KL(p_t || softmax(I_t))``.

Two forms differ only in the visible set of each query (``mask``):

- warm-up: every causal key ``s <= t``; ``p`` from a dense forward;
- sparse: only the top-k set the F layer selected (and causal); both ``p`` and ``q`` renormalised
  over it (the DeepSeek-V3.2 sparse-stage indexer loss).

:func:`multi_layer_kl_ref` (stacks every distribution) is the specification;
:class:`ServedTarget` computes the same loss while holding one running centroid and one
``[B, S]`` entropy term, whatever ``m`` is. Losses are totals in nats over the query tokens; divide
by the token count ``B * S`` for a per-token value.
"""

from __future__ import annotations

import torch

__all__ = [
    "causal_mask", "selected_mask", "indexer_log_probs", "attention_distribution",
    "ServedTarget", "multi_layer_kl_ref",
]


def causal_mask(seq: int, device=None) -> torch.Tensor:
    """bool ``[S, S]``: True where key ``s <= t`` is visible to query ``t``."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril()


def selected_mask(topk: torch.Tensor, seq: int) -> torch.Tensor:
    """bool ``[B, S, T=S]``: True at the selected keys that are also causal.

    ``topk``: int ``[B, S, k]`` token indices as transformers/:mod:`models.indexer` return them (a query
    with fewer than ``k`` visible keys also names masked positions; the causal mask drops them).
    """
    batch = topk.shape[0]
    chosen = torch.zeros(batch, seq, seq, dtype=torch.bool, device=topk.device)
    chosen.scatter_(-1, topk.long(), True)  # [B, S, T]
    return chosen & causal_mask(seq, topk.device)


def indexer_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log softmax(I_t)`` over the visible keys; 0 (not -inf) at masked keys.

    logits: float32 ``[B, S, T]`` index scores (unmasked); mask: bool broadcastable to it.
    Masked entries are exactly 0 so that ``p * log q`` is 0 there (p is 0 there too), and their
    gradient is 0.
    """
    masked = logits.float().masked_fill(~mask, float("-inf"))
    return torch.log_softmax(masked, dim=-1).masked_fill(~mask, 0.0)  # [B, S, T]


def attention_distribution(attn_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention ``p [B, S, T]`` (float32, rows sum to 1 over ``mask``), detached.

    attn_weights: ``[B, H, S, T]`` softmax probabilities of the main attention (eager attention's
    second output); mask: bool broadcastable to ``[B, S, T]``. Mass outside ``mask`` (none in a
    causal forward; the renormalisation matters only for the sparse form's set) is dropped.
    """
    p = attn_weights.detach().float().mean(dim=1).masked_fill(~mask, 0.0)  # [B, S, T]
    return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _neg_entropy(p: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(p, p).sum(dim=-1)  # [B, S], 0 log 0 = 0


class ServedTarget:
    """Running target of one F layer: ``sum_j w * p^(l+j)`` and ``sum_j w * sum_s p log p``.

    ``add`` each served layer's distribution as the forward reaches it (``w = 1 / n_served``), then
    ``loss(log_q)`` gives ``sum_j w * sum_t KL(p_t^(l+j) || q_t)`` in total nats, with gradients
    only through ``log_q``. Memory: one ``[B, S, T]`` centroid and one ``[B, S]`` term.
    """

    def __init__(self, n_served: int):
        if n_served <= 0:
            raise ValueError(f"an F layer serves at least itself, got n_served={n_served}")
        self.n_served = n_served
        self.added = 0
        self.centroid: torch.Tensor | None = None      # [B, S, T]
        self.neg_entropy: torch.Tensor | None = None   # [B, S]

    def add(self, p: torch.Tensor) -> None:
        """Fold in one served layer's distribution ``p [B, S, T]`` (float32, detached)."""
        if self.added >= self.n_served:
            raise ValueError(f"ServedTarget got more than its {self.n_served} served layers")
        weight = 1.0 / self.n_served
        if self.centroid is None:
            self.centroid = p * weight
            self.neg_entropy = _neg_entropy(p) * weight
        else:
            self.centroid.add_(p, alpha=weight)
            self.neg_entropy.add_(_neg_entropy(p), alpha=weight)
        self.added += 1

    @property
    def complete(self) -> bool:
        return self.added == self.n_served

    def loss(self, log_q: torch.Tensor) -> torch.Tensor:
        """Total nats (0-dim) of ``sum_j w * sum_t KL(p_t^(l+j) || q_t)``.

        log_q: ``[B, S, T]`` from :func:`indexer_log_probs` (0 at masked keys).
        """
        if not self.complete:
            raise ValueError(f"ServedTarget has {self.added} of its {self.n_served} served layers")
        cross = (self.centroid * log_q).sum(dim=-1)  # [B, S]
        return (self.neg_entropy - cross).sum()


def multi_layer_kl_ref(ps: list[torch.Tensor], logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference (the specification): ``sum_j 1/(m+1) sum_t KL(p_t^(j) || softmax(I_t))``, nats.

    ps: ``m+1`` tensors ``[B, S, T]`` (rows sum to 1 over ``mask``); logits ``[B, S, T]``; mask bool.
    Stacks all distributions: for tests, not for training.
    """
    p = torch.stack([x.float() for x in ps])  # [m+1, B, S, T]
    log_q = torch.log_softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1)
    log_p = torch.where(p > 0, p.log(), torch.zeros_like(p))
    per_entry = torch.where(mask & (p > 0), p * (log_p - log_q), torch.zeros_like(p))
    return per_entry.sum() / len(ps)
