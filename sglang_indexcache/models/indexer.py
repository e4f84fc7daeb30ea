"""Lightning-indexer maths over transformers' GlmMoeDsa modules, fast and gradient-capable.

transformers' ``GlmMoeDsaIndexer.forward`` is ``@torch.no_grad`` and computes
``q [B,S,H,D] @ k^T [B,1,D,T]``, which materialises ``k`` for every query position (half the CPU
forward time, FACTS.md). Here the same scores come from the indexer's own submodules with an einsum
over query chunks, with gradients when needed, and :class:`FastIndexer` is a drop-in replacement
that returns the same top-k (tested equal to transformers' own); :class:`CausalIndexer` also skips
the causally masked keys of a prefill.

Score of query token t for key token s (the DeepSeek-V3.2 / GLM-5 indexer):
``I[t, s] = softmax_scale * sum_h w[t, h] * relu(q[t, h] . k[s])``, ``w = weights_proj(x) * H^-0.5``;
the formula itself is :func:`sglang_indexcache.kernels.reference.index_scores` (the specification).
"""

from __future__ import annotations

import torch
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from ..kernels.reference import index_scores as reference_scores
from .decode_reuse import drop_order, refresh_rows, reuse_topk
from .swap import IndexerWrapper, unwrap_indexers, wrap_indexers

MAX_CHUNK_ELEMENTS = 1 << 26  # bound on the [B, chunk, H, T] intermediate (256 MiB in fp32)
QUERY_CHUNK = 128             # query chunk of causal_index_scores


def indexer_qkw(indexer, hidden_states, q_resid, position_embeddings):
    """Index queries, keys and head weights, in float32.

    Returns ``q [B, S, H, D]``, ``k [B, S, D]`` (RoPE applied, interleaved as in GLM-5) and
    ``w [B, S, H]`` (already scaled by ``H^-0.5``); ``softmax_scale`` is not applied.
    """
    batch, seq, _ = hidden_states.shape
    rope = indexer.qk_rope_head_dim
    q = indexer.wq_b(q_resid).view(batch, seq, indexer.n_heads, indexer.head_dim)  # [B, S, H, D]
    q_rot, q_pass = torch.split(q, [rope, indexer.head_dim - rope], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)  # [B, S, 1, D]
    k_rot, k_pass = torch.split(k, [rope, indexer.head_dim - rope], dim=-1)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1).float()  # [B, S, H, D]
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2).float()  # [B, S, D]
    w = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float()
    return q, k, w * indexer.n_heads ** -0.5  # w: [B, S, H]


def chunked_index_scores(q, w, k, softmax_scale: float) -> torch.Tensor:
    """``I [B, S, T]`` from ``q [B, S, H, D]``, ``w [B, S, H]``, ``k [B, T, D]`` (no mask), float32.

    :func:`~sglang_indexcache.kernels.reference.index_scores` (same argument order) computed in query
    chunks so the ``[B, chunk, H, T]`` intermediate stays bounded.
    """
    batch, seq, heads, _ = q.shape
    keys = k.shape[1]
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, batch * heads * keys))
    parts = [reference_scores(q[:, start:start + chunk], w[:, start:start + chunk], k, softmax_scale)
             for start in range(0, seq, chunk)]                        # [B, c, T] each
    return torch.cat(parts, dim=1)


def causal_index_scores(q, w, k, softmax_scale: float, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """``I [B, S, T]`` (float32) with ``-inf`` on keys after each query chunk's last query.

    ``q [B, S, H, D]``, ``w [B, S, H]``, ``k [B, T, D]`` as in :func:`chunked_index_scores`; query s is
    position s (prefill without a cache, ``S == T``). Query chunk ``[s0, s1)`` needs keys ``[0, s1)``
    only: about half the FLOPs of a long sequence.
    """
    batch, seq, _, _ = q.shape
    out = q.new_full((batch, seq, k.shape[1]), float("-inf"))  # [B, S, T]
    for s0 in range(0, seq, chunk):
        s1 = min(seq, s0 + chunk)
        out[:, s0:s1, :s1] = reference_scores(q[:, s0:s1], w[:, s0:s1], k[:, :s1], softmax_scale)
    return out


def indexer_logits(indexer, hidden_states, q_resid, position_embeddings) -> torch.Tensor:
    """Unmasked index scores ``[B, S, S]`` (float32) of one layer's indexer; differentiable."""
    q, k, w = indexer_qkw(indexer, hidden_states, q_resid, position_embeddings)
    return chunked_index_scores(q, w, k, indexer.softmax_scale)


def apply_mask(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask scores ``[B, S, T]`` with a bool (True = visible) or additive ``[B, S, T]`` mask."""
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, float("-inf"))
    return scores + attention_mask


def causal_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k of already-masked scores ``[B, S, T]`` -> int32 ``[B, S, min(topk, T)]``.

    Like transformers, a query with fewer than ``topk`` visible keys also gets masked (``-inf``)
    positions; the attention mask excludes them again, so they are harmless there.
    """
    return scores.topk(min(topk, scores.shape[-1]), dim=-1).indices.to(torch.int32)


class FastIndexer(IndexerWrapper):
    """Drop-in for ``GlmMoeDsaIndexer`` (same forward signature, same top-k), faster.

    ``recorder``, when set, is called as ``recorder(layer_idx, topk)`` with each top-k it computes.
    ``decode_stride`` (default 1: every query its own top-k) > 1 simulates top-k reuse across decode
    steps on a block without KV cache (:mod:`.decode_reuse`: scores only at the refresh positions).
    Holds the original module as ``inner`` (``models.swap``), so its parameters stay where the
    checkpoint expects them once :func:`remove_fast_indexers` puts it back.
    """

    def __init__(self, inner):
        super().__init__(inner)
        self.recorder = None
        self.decode_stride = 1
        self.decode_drop = "lowest"  # which stored entries go first when over budget (decode_reuse.DROPS)

    def scores(self, q, w, k, attention_mask, prefill: bool) -> torch.Tensor:
        """Masked index scores ``[B, S, T]`` from the indexer's ``q``, ``w``, ``k``; ``prefill``: no
        KV cache (key s is token s)."""
        return apply_mask(chunked_index_scores(q, w, k, self.inner.softmax_scale), attention_mask)

    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        q, k, w = indexer_qkw(self.inner, hidden_states, q_resid, position_embeddings)
        if past_key_values is not None:  # decode / generate: keys of earlier tokens come from the cache
            k = past_key_values.update_indexer(k.to(hidden_states.dtype), self.layer_idx).float()
        if self.decode_stride > 1:
            if past_key_values is not None:
                raise ValueError("decode-stride reuse is simulated on whole blocks only (no KV cache)")
            topk = self.strided_topk(q, w, k, attention_mask)
        else:
            scores = self.scores(q, w, k, attention_mask, prefill=past_key_values is None)
            topk = causal_topk(scores, self.inner.index_topk)
        if self.recorder is not None:
            self.recorder(self.layer_idx, topk)
        return topk

    def strided_topk(self, q, w, k, attention_mask) -> torch.Tensor:
        """``[B, S, k]`` int32 under ``decode_stride``: scores and top-k at the refresh rows only."""
        seq, stride = q.shape[1], self.decode_stride
        rows = refresh_rows(seq, stride, q.device)                     # [R]
        scores = apply_mask(chunked_index_scores(q[:, rows], w[:, rows], k, self.inner.softmax_scale),
                            attention_mask[..., rows, :])              # [B, R, T]
        stored = scores.topk(min(self.inner.index_topk, scores.shape[-1]), dim=-1)  # sorted, best first
        indices, values = drop_order(stored.indices, stored.values, self.decode_drop)
        return reuse_topk(indices, values, stride, seq, scores.shape[-1])


class CausalIndexer(FastIndexer):
    """Same forward signature and top-k as ``FastIndexer``; skips the future keys of a prefill."""

    def scores(self, q, w, k, attention_mask, prefill: bool) -> torch.Tensor:
        if not prefill or q.shape[1] != attention_mask.shape[-1]:   # every key is scored
            return super().scores(q, w, k, attention_mask, prefill)
        return apply_mask(causal_index_scores(q, w, k, self.inner.softmax_scale), attention_mask)


def install_fast_indexers(model) -> list[FastIndexer | None]:
    """Replace every layer's indexer of a transformers GlmMoeDsa model by a :class:`FastIndexer`."""
    return wrap_indexers(model, FastIndexer)


def remove_fast_indexers(model) -> None:
    unwrap_indexers(model)
