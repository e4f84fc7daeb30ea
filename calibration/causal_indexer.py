"""A :class:`~sglang_indexcache.dsa_torch.FastIndexer` that skips the masked (future) keys.

Prefill with a causal mask: query chunk ``[s0, s1)`` only needs keys ``[0, s1)``, so index scores are
computed on that block and the rest is ``-inf`` (the causal mask would set it anyway). About half the
indexer FLOPs of a long sequence; the same top-k as ``FastIndexer`` (tested through the backend's
loss equality with transformers' own forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_indexcache import dsa_torch

QUERY_CHUNK = 128


def causal_index_scores(q, k, w, softmax_scale: float, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """``I [B, S, T]`` (float32) with ``-inf`` on keys after each query chunk's last query.

    ``q [B, S, H, D]``, ``k [B, T, D]``, ``w [B, S, H]`` as in :func:`dsa_torch.index_scores`;
    query s is position s (prefill without a cache, ``S == T``).
    """
    batch, seq, _, _ = q.shape
    out = q.new_full((batch, seq, k.shape[1]), float("-inf"))  # [B, S, T]
    for s0 in range(0, seq, chunk):
        s1 = min(seq, s0 + chunk)
        logits = torch.einsum("bshd,btd->bsht", q[:, s0:s1], k[:, :s1]) * softmax_scale  # [B, c, H, s1]
        out[:, s0:s1, :s1] = torch.einsum("bsht,bsh->bst", F.relu(logits), w[:, s0:s1])
    return out


class CausalIndexer(dsa_torch.FastIndexer):
    """Same forward signature and top-k as ``FastIndexer``; skips future keys in prefill."""

    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        if past_key_values is not None or hidden_states.shape[1] != attention_mask.shape[-1]:
            return super().forward(hidden_states, q_resid, position_embeddings, attention_mask, position_ids,
                                   past_key_values)
        q, k, w = dsa_torch.indexer_qkw(self.inner, hidden_states, q_resid, position_embeddings)
        scores = causal_index_scores(q, k, w, self.inner.softmax_scale)
        topk = dsa_torch.causal_topk(dsa_torch.apply_mask(scores, attention_mask), self.inner.index_topk)
        if self.recorder is not None:
            self.recorder(self.layer_idx, topk)
        return topk
