"""Layer shapes of a DSA decoder layer from a model config, and its FLOP/byte counts per component.

One layer of the benchmark stack is an absorbed-MLA DSA layer: MLA projections (q latent
``kv_lora_rank`` + rope ``qk_rope_head_dim`` per head), the lightning indexer (``index_n_heads`` x
``index_head_dim``) with top-k ``index_topk``, sparse MLA attention over the selected tokens, and the
active FFN. For an MoE config the active FFN is modelled as ``num_experts_per_tok + n_shared_experts``
SwiGLU MLPs of ``moe_intermediate_size`` (one MLP of that total width: same FLOPs, same weight
bytes per token); in decode a batch of ``b`` requests touches the routed experts that uniform
routing would reach, ``E * (1 - (1 - k/E)^b)``, so the MLP is that many experts wide.

Components (the columns of every table): ``indexer`` = indexer projections + scores + top-k;
``attention`` = sparse MLA over the top-k latents; ``dense`` = everything else (norms, MLA
projections and absorption, output projection, router, FFN).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import UsageError

COMPONENTS = ("indexer", "attention", "dense")
# bench kernels: name -> (attention heads, index heads); d_qk 576, d_v 512, index d 128, top-k 2048
KERNEL_SHAPES = {"deepseek-v3.2": (128, 64), "glm-5": (64, 32)}
D_QK, D_V, D_IDX, TOPK = 576, 512, 128, 2048


@dataclass(frozen=True)
class LayerShapes:
    """Sizes of one DSA layer; names follow the HF config keys they come from."""

    hidden: int
    heads: int                  # MLA query heads
    q_lora: int
    kv_lora: int                # latent dim = d_v of the absorbed attention (512)
    rope: int                   # rope dim (64); d_qk = kv_lora + rope
    qk_nope: int
    v_head: int
    index_heads: int
    index_dim: int
    topk: int
    ffn_inter: int              # width of one MLP (intermediate_size or moe_intermediate_size)
    experts_active: int         # MLPs active per token (1 for a dense MLP)
    n_routed: int               # routed experts (0 for a dense MLP)
    n_shared: int
    moe: bool

    @property
    def d_qk(self) -> int:
        return self.kv_lora + self.rope

    def describe(self) -> str:
        ffn = (f"MoE {self.experts_active - self.n_shared}+{self.n_shared} of {self.n_routed} experts"
               f" x {self.ffn_inter}" if self.moe else f"dense MLP {self.ffn_inter}")
        return (f"hidden {self.hidden}, {self.heads} heads (d_qk {self.d_qk}, d_v {self.kv_lora}),"
                f" indexer {self.index_heads}x{self.index_dim} top-{self.topk}, {ffn}")

    def as_dict(self) -> dict:
        return asdict(self)


def _get(config: dict, key: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise UsageError(f"config lacks {key!r}: not a DSA model config")
    return value


def layer_shapes(config: dict, topk: int | None = None) -> LayerShapes:
    """Shapes of a representative DSA layer of ``config``: an MoE layer if the model has any (not
    every layer within ``first_k_dense_replace``), else a dense-MLP layer."""
    n_routed = int(config.get("n_routed_experts") or 0)
    layers = config.get("num_hidden_layers")
    dense_first = int(config.get("first_k_dense_replace") or 0)
    moe = n_routed > 0 and (layers is None or dense_first < int(layers))  # any MoE layer at all
    n_shared = int(config.get("n_shared_experts") or 0) if moe else 0
    shapes = LayerShapes(
        hidden=int(_get(config, "hidden_size")),
        heads=int(_get(config, "num_attention_heads")),
        q_lora=int(config.get("q_lora_rank") or _get(config, "hidden_size")),
        kv_lora=int(_get(config, "kv_lora_rank")),
        rope=int(_get(config, "qk_rope_head_dim")),
        qk_nope=int(_get(config, "qk_nope_head_dim")),
        v_head=int(_get(config, "v_head_dim")),
        index_heads=int(_get(config, "index_n_heads")),
        index_dim=int(_get(config, "index_head_dim")),
        topk=int(topk if topk is not None else _get(config, "index_topk")),
        ffn_inter=int(_get(config, "moe_intermediate_size") if moe else _get(config, "intermediate_size")),
        experts_active=(int(_get(config, "num_experts_per_tok")) + n_shared) if moe else 1,
        n_routed=n_routed, n_shared=n_shared, moe=moe,
    )
    if shapes.topk <= 0:
        raise UsageError(f"top-k must be positive, got {shapes.topk}")
    return shapes


def decode_experts(shapes: LayerShapes, batch: int) -> int:
    """MLP count a decode batch of ``batch`` tokens reads: touched routed experts + shared ones."""
    if not shapes.moe:
        return 1
    k = shapes.experts_active - shapes.n_shared
    touched = shapes.n_routed * (1.0 - (1.0 - k / shapes.n_routed) ** batch)
    return max(k, math.ceil(touched - 1e-9)) + shapes.n_shared


# ---------------------------------------------------------------- parameter counts -----------

def dense_matrices(s: LayerShapes, experts: int) -> dict[str, tuple[int, int]]:
    """(in, out) of every per-token matrix product of the dense component (absorbed MLA + FFN)."""
    return {
        "q_a": (s.hidden, s.q_lora),
        "q_b": (s.q_lora, s.heads * (s.qk_nope + s.rope)),
        "kv_a": (s.hidden, s.kv_lora + s.rope),
        "w_uk": (s.heads * s.qk_nope, s.kv_lora),        # per head [qk_nope, kv_lora]
        "w_uv": (s.heads * s.kv_lora, s.v_head),         # per head [kv_lora, v_head]
        "o_proj": (s.heads * s.v_head, s.hidden),
        "router": (s.hidden, s.n_routed) if s.moe else (s.hidden, 0),
        "gate_up": (s.hidden, 2 * s.ffn_inter * experts),
        "down": (s.ffn_inter * experts, s.hidden),
    }


def dense_params(s: LayerShapes, experts: int) -> int:
    """Multiply-adds per token of the dense matrices (= their parameter count)."""
    return sum(n_in * n_out for n_in, n_out in dense_matrices(s, experts).values())


def indexer_params(s: LayerShapes) -> int:
    """Indexer projections: q (q_lora -> heads x dim), k (hidden -> dim), weights (hidden -> heads)."""
    return s.q_lora * s.index_heads * s.index_dim + s.hidden * s.index_dim + s.hidden * s.index_heads


# ---------------------------------------------------------------- FLOP / byte counts ---------

def _attended(topk: int, positions_from: int, count: int) -> int:
    """Sum over positions p in [positions_from, positions_from+count) of min(topk, p+1)."""
    lo, hi = positions_from, positions_from + count        # p in [lo, hi)
    split = min(max(topk - 1, lo), hi)                      # p < split: p+1 < topk
    small = (split * (split + 1) - lo * (lo + 1)) // 2      # sum of (p+1) for p in [lo, split)
    return small + (hi - split) * topk


def prefill_counts(s: LayerShapes, tokens: int, elt: int = 2) -> dict[str, dict[str, float]]:
    """FLOPs and the fewest bytes (each input read once, each output written once) per component
    for a prefill of ``tokens`` tokens (one request, no prefix); ``elt`` bytes per activation."""
    t = tokens
    pairs = t * (t + 1) // 2                               # causal (query, key) pairs
    idx_flops = 2 * t * indexer_params(s) + pairs * s.index_heads * (2 * s.index_dim + 2)
    idx_bytes = (indexer_params(s) * elt + t * (s.q_lora + s.hidden) * elt
                 + t * (s.index_heads * s.index_dim + s.index_dim) * elt + t * s.index_heads * 4
                 + t * s.topk * 4)
    attended = _attended(s.topk, 0, t)
    att_flops = 2 * attended * s.heads * (s.d_qk + s.kv_lora)
    att_bytes = (t * s.heads * s.d_qk * elt + t * s.d_qk * elt + t * s.topk * 4
                 + t * s.heads * s.kv_lora * elt)
    params = dense_params(s, s.experts_active)
    weights = dense_params(s, (s.n_routed + s.n_shared) if s.moe else 1)  # prefill touches all experts
    io = sum(n_in + n_out for n_in, n_out in dense_matrices(s, s.experts_active).values())
    dense_flops = 2 * t * params
    dense_bytes = weights * elt + t * io * elt
    gather = att_bytes + attended * s.d_qk * elt           # every query reads its own top-k rows
    return {"indexer": {"flops": idx_flops, "bytes": idx_bytes},
            "attention": {"flops": att_flops, "bytes": att_bytes, "gather_bytes": gather},
            "dense": {"flops": dense_flops, "bytes": dense_bytes}}


def decode_counts(s: LayerShapes, batch: int, cached: int, elt: int = 2) -> dict[str, dict[str, float]]:
    """FLOPs and fewest bytes per component of one decode step: ``batch`` requests, each with
    ``cached`` tokens in bf16 paged caches (index keys and latents read from the caches)."""
    b, n = batch, cached
    k = min(s.topk, n)
    idx_flops = 2 * b * indexer_params(s) + b * n * s.index_heads * (2 * s.index_dim + 2)
    idx_bytes = indexer_params(s) * elt + b * n * s.index_dim * elt + b * s.topk * 4
    att_flops = 2 * b * k * s.heads * (s.d_qk + s.kv_lora)
    att_bytes = b * k * s.d_qk * elt + b * s.heads * (s.d_qk + s.kv_lora) * elt + b * s.topk * 4
    experts = decode_experts(s, b)
    dense_flops = 2 * b * dense_params(s, experts)
    dense_bytes = dense_params(s, experts) * elt
    return {"indexer": {"flops": idx_flops, "bytes": idx_bytes},
            "attention": {"flops": att_flops, "bytes": att_bytes},
            "dense": {"flops": dense_flops, "bytes": dense_bytes}}
