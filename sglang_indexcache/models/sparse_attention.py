"""A GlmMoeDsa decoder layer with gather-based sparse MLA attention over the top-k (CPU-friendly).

transformers' eager/SDPA path computes dense ``[B, H, S, T]`` attention and masks everything but
the top-k; this computes the same softmax over the ``k`` selected keys only, in the absorbed MLA
form (FlashMLA's sparse prefill maths): per head ``q_lat = W_kb^T q_nope`` ``[B, S, H, r]``,
scores against the gathered latents ``c [B, S, k, r]`` and rope keys ``[B, S, k, d_rope]`` shared by
all heads, output ``W_vb (p @ c)``. Selected indices after the query (queries with fewer than k
visible keys) are masked to ``-inf``, as transformers' causal mask does. The softmax over the
gathered rows is :func:`sglang_indexcache.kernels.reference.gathered_attention`.

Reference (the specification): ``GlmMoeDsaDecoderLayer.forward`` / ``GlmMoeDsaAttention.forward``
of transformers 5.19; equality of the LM loss is tested in tests/test_backend.py.
"""

from __future__ import annotations

import torch
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from ..kernels.reference import gathered_attention


def sparse_mla(attn, q_nope, q_rot, latent, k_rot, topk):
    """Attention output ``[B, S, H * d_v]`` over the top-k keys, one sequence at a time.

    Per sequence the gathered keys stay below glibc's mmap threshold (32 MiB), so their memory is
    reused instead of page-faulted in afresh on every call (3x faster on the CPU).
    """
    parts = [_sparse_mla(attn, q_nope[b:b + 1], q_rot[b:b + 1], latent[b:b + 1], k_rot[b:b + 1], topk[b:b + 1])
             for b in range(q_nope.shape[0])]
    return torch.cat(parts, dim=0)


def _sparse_mla(attn, q_nope, q_rot, latent, k_rot, topk):
    """Attention output ``[B, S, H * d_v]`` over the top-k keys.

    ``q_nope [B, S, H, d_nope]``, ``q_rot [B, S, H, d_rope]`` (RoPE applied), ``latent [B, T, r]``
    (normalised compressed KV), ``k_rot [B, T, d_rope]`` (RoPE applied), ``topk [B, S, k]`` int32
    token indices.
    """
    batch, seq, heads, _ = q_nope.shape
    d_nope, d_v = attn.qk_nope_head_dim, attn.v_head_dim
    w = attn.kv_b_proj.weight.view(heads, d_nope + d_v, -1)  # [H, d_nope + d_v, r]
    w_k, w_v = w[:, :d_nope], w[:, d_nope:]  # [H, d_nope, r], [H, d_v, r]
    q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_k)  # [B, S, H, r]
    idx = topk.long()  # [B, S, k]
    keys = latent.shape[1]
    rank = latent.shape[-1]
    # one row gather of [latent | k_rot] for all heads: rows of the flattened [B*T, r + d_rope]
    rows = torch.cat([latent, k_rot], dim=-1).reshape(batch * keys, -1)  # [B*T, r + d_rope]
    offsets = (torch.arange(batch, device=idx.device) * keys)[:, None, None]  # [B, 1, 1]
    picked = rows.index_select(0, (idx + offsets).reshape(-1)).view(batch, seq, -1, rows.shape[-1])  # [B, S, k, r+dr]
    q_all = torch.cat([q_lat, q_rot], dim=-1)  # [B, S, H, r + d_rope]
    positions = torch.arange(seq, device=idx.device)[None, :, None]  # [1, S, 1]
    valid = (idx <= positions).reshape(batch * seq, -1)  # [B*S, k]
    kv = picked.reshape(batch * seq, -1, picked.shape[-1])  # [B*S, k, r + d_rope]
    out_lat = gathered_attention(q_all.reshape(batch * seq, heads, -1), kv, valid, attn.scaling, rank)
    out_lat = out_lat.view(batch, seq, heads, rank)  # [B, S, H, r]
    out = torch.einsum("bshr,hvr->bshv", out_lat, w_v)  # [B, S, H, d_v]
    return out.reshape(batch, seq, heads * d_v)


def attention(attn, hidden, position_embeddings, mask, position_ids, prev_topk):
    """``GlmMoeDsaAttention.forward`` with sparse attention; returns (output ``[B, S, hidden]``, topk)."""
    batch, seq, _ = hidden.shape
    q_resid = attn.q_a_layernorm(attn.q_a_proj(hidden))  # [B, S, q_lora]
    q = attn.q_b_proj(q_resid).view(batch, seq, -1, attn.qk_head_dim)  # [B, S, H, d_qk]
    q_nope, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    compressed = attn.kv_a_proj_with_mqa(hidden)
    kv_pass, k_rot = torch.split(compressed, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    latent = attn.kv_a_layernorm(kv_pass)  # [B, T, r]
    cos, sin = position_embeddings
    # same rotation as transformers (heads on dim 1 there, on dim 2 here)
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot[:, :, None], cos, sin, unsqueeze_dim=2)
    if attn.indexer is not None:
        topk = attn.indexer(hidden, q_resid, position_embeddings, mask[:, 0], position_ids)  # [B, S, k]
    elif prev_topk is None:
        raise ValueError("Shared DSA layers require top-k indices from a previous full indexer layer.")
    else:
        topk = prev_topk
    out = sparse_mla(attn, q_nope, q_rot, latent, k_rot[:, :, 0], topk)
    return attn.o_proj(out), topk


def decoder_layer(layer, hidden, position_embeddings, mask, position_ids, prev_topk):
    """``GlmMoeDsaDecoderLayer.forward`` with :func:`attention`; returns (hidden, topk)."""
    residual = hidden
    attn_out, topk = attention(layer.self_attn, layer.input_layernorm(hidden), position_embeddings, mask,
                               position_ids, prev_topk)
    hidden = residual + attn_out
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, topk
