"""S layers hold nothing: no index-K buffer in the KV pool, no indexer module or weights.

With a pattern flag (``--index-cache-pattern``/``-every``/``-pattern-file``, not
``--index-cache-calibration``, which switches patterns and so keeps every layer's),
:func:`settings.model_override_args` writes the pattern into the main model's config as
:data:`CONFIG_KEY`. Every hook here keys on it, so each process decides alike, and the MTP/NextN
draft model, whose config never gets the key, keeps its indexer and its whole pool.

The memory arithmetic (per token and DSA layer; ``python -m`` free, no SGLang import):

- latent KV: bf16 ``(kv_lora_rank + qk_rope_head_dim) x 2`` = 1152 B at 512 + 64; fp8_e4m3
  ``kv_lora_rank`` fp8 + one fp32 scale per 128 + the rope part in bf16 = 656 B;
- index key: ``index_head_dim`` fp8 + one fp32 scale per 128 = 132 B at head dim 128.

SGLang turns ``--mem-fraction-static`` into ``max_total_num_tokens = bytes // cell`` with ``cell``
the bytes per token over the pool's layers, so freeing the index keys of the S layers multiplies the
tokens by :func:`expected_token_ratio`: at every-4 on 32 layers x1.084 with bf16 KV, x1.144 with
fp8 KV. Draft (MTP) layers keep their index key and count fully on both sides. On SGLang 0.5.17 the
stock server also builds every S layer's indexer module (:func:`indexer_weight_bytes`, ~17 MB each at
hidden 2048) and this one does not; those bytes join the pool (:meth:`PoolBytes.ratio_with_weights`;
measured on the H200: +8.8% bf16 KV tokens at every-4 on 32 layers, of which +8.4% from the keys).

Hooks (``0006-index-cache-shared-layers-hold-nothing.patch``): the model class asks
:func:`builds_indexer` (SGLang 0.5.17; 0.5.23 builds none on S layers itself), the pool sizing asks
:func:`index_k_layer_count` and :func:`draft_index_k_bytes` and the pool builder
:func:`index_k_skips` (0.5.17; 0.5.23 has the same gate, ``dsa_layer_skips_topk``), and both
releases' pools call :func:`no_index_k` when an S layer asks for its buffer (0.5.23: once
:func:`on_pool_built` armed the pool, so that without a flag nothing changes), and
:func:`on_pool_built` for the start-up line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import pattern as pat
from ..errors import UsageError

logger = logging.getLogger("sglang_indexcache.sglang")

CONFIG_KEY = "index_cache_pattern"  # model-config key: the flag's pattern; its S layers hold nothing
INDEX_QUANT_BLOCK = 128  # SGLang's DSATokenToKVPool.quant_block_size: one fp32 scale per 128 values


class SharedLayerError(RuntimeError):
    """An S layer asked for an index-K buffer it does not hold (a bug: nothing may read or write it)."""


# ------------------------------------------------------------------ arithmetic (no SGLang) ---------

def index_k_bytes(index_head_dim: int = 128) -> int:
    """Bytes of one token's index key in one layer: fp8 values plus an fp32 scale per 128 (132 at 128)."""
    return index_head_dim + index_head_dim // INDEX_QUANT_BLOCK * 4


def latent_kv_bytes(kv_lora_rank: int = 512, qk_rope_head_dim: int = 64, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one token's latent KV in one DSA layer, as SGLang's CUDA DSA pool stores it.

    ``auto``/``bf16``: ``(kv_lora_rank + qk_rope_head_dim) x 2``; ``fp8_e4m3``: the latent in fp8
    with an fp32 scale per 128 values and the rope part kept in bf16 (656 B at 512 + 64).
    """
    if kv_cache_dtype in ("auto", "bf16", "bfloat16"):
        return (kv_lora_rank + qk_rope_head_dim) * 2
    if kv_cache_dtype == "fp8_e4m3":
        return kv_lora_rank + kv_lora_rank // INDEX_QUANT_BLOCK * 4 + qk_rope_head_dim * 2
    raise UsageError(f"kv cache dtype {kv_cache_dtype!r}: expected auto, bf16 or fp8_e4m3")


@dataclass(frozen=True)
class PoolBytes:
    """Bytes per token of a DSA KV pool, with every layer's index key (stock) and with F layers' only."""

    layers: int  # DSA layers in the pool
    index_k_layers: int  # layers that hold an index key (F layers)
    kv_bytes: int  # latent KV per token and layer
    index_k_bytes: int  # index key per token and layer
    draft_layers: int = 0  # MTP/NextN layers sized with the target (they keep their index key)

    @property
    def stock_cell(self) -> int:
        return (self.layers + self.draft_layers) * (self.kv_bytes + self.index_k_bytes)

    @property
    def cell(self) -> int:
        return ((self.layers + self.draft_layers) * self.kv_bytes
                + (self.index_k_layers + self.draft_layers) * self.index_k_bytes)

    @property
    def freed(self) -> int:
        """Index-K bytes per token no S layer holds any more."""
        return self.stock_cell - self.cell

    @property
    def ratio(self) -> float:
        """KV tokens in the same memory, over stock's (the expected ``max_total_num_tokens`` ratio)."""
        return self.stock_cell / self.cell

    def ratio_with_weights(self, freed_weight_bytes: int, stock_tokens: int) -> float:
        """The token ratio when ``freed_weight_bytes`` of weights that the stock server builds and this
        one does not (the S layers' indexers, SGLang 0.5.17) join the pool of a stock server holding
        ``stock_tokens``: ``ratio x (1 + freed_weight_bytes / stock pool bytes)``."""
        return self.ratio * (1 + freed_weight_bytes / (stock_tokens * self.stock_cell))

    def describe(self) -> str:
        shared = self.layers - self.index_k_layers
        return (f"index-K of {shared} S layers freed: {shared} x {self.index_k_bytes} B = {self.freed} B per token"
                f" of {self.stock_cell} B ({self.layers} layers x ({self.kv_bytes} + {self.index_k_bytes}) B"
                + (f" + {self.draft_layers} draft" if self.draft_layers else "")
                + f"); expected KV tokens x{self.ratio:.4f} ({(self.ratio - 1) * 100:+.1f}%) over stock at the"
                " same --mem-fraction-static")


def indexer_weight_bytes(config: dict, param_bytes: int = 2) -> int:
    """Bytes of one layer's indexer module in SGLang (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``).

    ``q_lora_rank x index_n_heads x index_head_dim + hidden_size x (index_head_dim + index_n_heads)
    + 2 x index_head_dim`` parameters of ``param_bytes`` each (bf16: 2; ~17.4 MB at hidden 2048 and
    GLM-5's indexer).
    """
    heads, dim, hidden = config["index_n_heads"], config["index_head_dim"], config["hidden_size"]
    params = config["q_lora_rank"] * heads * dim + hidden * (dim + heads) + 2 * dim
    return params * param_bytes


def pool_bytes(pattern: str, kv_bytes: int, index_k: int = 132, draft_layers: int = 0) -> PoolBytes:
    """:class:`PoolBytes` of a pool holding the layers of ``pattern`` (its F layers keep the index key)."""
    pattern = pat.parse(pattern)
    return PoolBytes(len(pattern), pattern.count(pat.FULL), kv_bytes, index_k, draft_layers)


def expected_token_ratio(pattern: str, kv_bytes: int, index_k: int = 132, draft_layers: int = 0) -> float:
    """``max_total_num_tokens`` with S layers holding nothing over stock's, at the same memory.

    >>> round(expected_token_ratio(pat.uniform(32, 4), latent_kv_bytes()), 4)
    1.0835
    >>> round(expected_token_ratio(pat.uniform(32, 4), latent_kv_bytes(kv_cache_dtype="fp8_e4m3")), 4)
    1.1437
    """
    return pool_bytes(pattern, kv_bytes, index_k, draft_layers).ratio


# ------------------------------------------------------------------ config: who holds what ---------

def config_pattern(hf_config) -> str | None:
    """The flag's pattern carried by a model config (None: stock, calibration mode, or a draft model)."""
    value = getattr(hf_config, CONFIG_KEY, None)
    return value if isinstance(value, str) and value else None


def holds_index_k(hf_config, layer_id: int) -> bool:
    """Whether main-model DSA layer ``layer_id`` holds an index key and an indexer.

    False only for a layer that is S in the flag's pattern *and* that SGLang's own reading of the
    config (``dsa_layer_skips_topk``) skips: a layer SGLang would run its indexer on always keeps both.
    """
    pattern = config_pattern(hf_config)
    if pattern is None or layer_id >= len(pattern) or pattern[layer_id] != pat.SHARED:
        return True
    from sglang.srt.configs.model_config import dsa_layer_skips_topk

    return not dsa_layer_skips_topk(hf_config, layer_id)


def builds_indexer(hf_config, layer_id: int, is_nextn: bool) -> bool:
    """Model-class hook (SGLang 0.5.17): build layer ``layer_id``'s indexer? MTP/NextN layers keep theirs."""
    return is_nextn or holds_index_k(hf_config, layer_id)


def unbuilt_indexer_weight(hf_config, params: dict):
    """Weight-loader hook (0.5.17): a test ``name -> bool`` for checkpoint weights of indexers the model
    did not build (S layers), skipped without a warning; None without a pattern flag (stock loading)."""
    if config_pattern(hf_config) is None:
        return None
    owners = {name.rsplit(".indexer.", 1)[0] for name in params if ".indexer." in name}
    return lambda name: ".indexer." in name and name.rsplit(".indexer.", 1)[0] not in owners


def _pool_layers(kvc) -> range:
    return range(kvc.layer_info.start_layer, kvc.layer_info.end_layer)


def index_k_skips(kvc) -> list[bool] | None:
    """Per layer of the pool ``kvc`` builds (its layer range): True where it holds no index key.

    None (every layer holds one) for a draft worker, without the config key, or for a pool other
    than the CUDA DSA pool (out-of-tree platforms, Ascend).
    """
    hf_config = kvc.model_config.hf_config
    if kvc.is_draft_worker or config_pattern(hf_config) is None:
        return None
    if getattr(kvc.server_args, "attention_backend", None) == "ascend":
        return None
    from sglang.srt.platforms import current_platform

    if current_platform.is_out_of_tree():
        return None
    return [not holds_index_k(hf_config, layer_id) for layer_id in _pool_layers(kvc)]


def index_k_layer_count(kvc, num_layers: int) -> int:
    """Pool-sizing hook (0.5.17): how many of the pool's ``num_layers`` layers hold an index key."""
    skips = index_k_skips(kvc)
    if skips is None or len(skips) != num_layers:
        return num_layers
    return num_layers - sum(skips)


def draft_index_k_bytes(kvc, num_layers: int, draft_layers: int) -> int:
    """Pool-sizing hook (0.5.17): bytes per token to add after SGLang scaled the cell by the draft layers.

    SGLang sizes an EAGLE/MTP draft as ``draft_layers`` times the target's mean layer; with S layers
    holding nothing that mean lacks ``S / num_layers`` of an index key, which each draft layer holds.
    """
    skips = index_k_skips(kvc)
    if skips is None or len(skips) != num_layers or not num_layers:
        return 0
    per_layer = index_k_bytes(kvc.model_config.hf_config.index_head_dim)
    return -(-draft_layers * per_layer * sum(skips) // num_layers)  # ceil: never under-count


# ------------------------------------------------------------------ the pool ----------------------

def no_index_k(pool, layer_id: int):
    """Raise :class:`SharedLayerError`: S layer ``layer_id`` asked ``pool`` for its index-K buffer."""
    raise SharedLayerError(
        f"IndexCache: layer {layer_id} is an S layer and holds no index-K buffer in {type(pool).__name__}"
        " (it reuses the top-k of the F layer before it); nothing may read or write one")


def pool_summary(pool, draft_layers: int = 0) -> PoolBytes:
    """:class:`PoolBytes` of a built DSA pool, from its own fields (``skip_topk_layers``, dims, dtype)."""
    import torch

    skips = list(getattr(pool, "skip_topk_layers", None) or [False] * pool.layer_num)
    kv = pool.kv_cache_dim * torch._utils._element_size(pool.store_dtype)
    per_index = index_k_bytes(pool.index_head_dim) // getattr(pool, "index_kpool", 1)
    return PoolBytes(len(skips), len(skips) - sum(skips), kv, per_index, draft_layers)


GUARD_ATTR = "index_cache_guard"  # set on a pool whose S layers' buffers must raise when asked (0.5.23)


def on_pool_built(pool, kvc) -> None:
    """Pool-builder hook: arm the S-layer guard and log the start-up line (only with a pattern flag)."""
    pattern = config_pattern(kvc.model_config.hf_config)
    if pattern is None or kvc.is_draft_worker:
        return
    setattr(pool, GUARD_ATTR, True)
    layers = _pool_layers(kvc)
    where = f"layers {layers.start}-{layers.stop - 1}" if len(layers) != len(pattern) else "all layers"
    if getattr(pool, "skip_topk_layers", None) is None or not any(pool.skip_topk_layers):
        if pattern[layers.start:layers.stop].count(pat.SHARED):
            logger.warning("IndexCache: S layers keep their index-K buffers in %s (%s): this pool type does"
                           " not free them", type(pool).__name__, where)
        return
    spec = getattr(kvc, "spec_aux_config", None)
    draft = int(getattr(spec, "eagle_draft_num_layers", None) or 0) if not kvc.spec_algorithm.is_none() else 0
    logger.info("IndexCache: S layers hold nothing (%s): %s", where, pool_summary(pool, draft).describe())


# ------------------------------------------------------------------ start-up refusals --------------

# Server features whose code copies, registers or splits every layer's index-K buffer as if each
# held one, per release: field, flag, why, and where it runs instead. SGLang 0.5.23 sizes its HiCache
# mirror, PD transfer and layer split for S layers' 0-row buffers itself (HiSparse keeps every
# layer's), but its FlexKV connector takes the first layer's shape for all.
_ON_0523 = "SGLang 0.5.23 runs it"
UNSUPPORTED = {
    "0.5.17": (
        ("enable_hierarchical_cache", "--enable-hierarchical-cache", "its host mirror copies every layer's", _ON_0523),
        ("enable_hisparse", "--enable-hisparse", "its pool and host mirror size every layer's", _ON_0523),
        ("enable_dsa_cache_layer_split", "--enable-dsa-cache-layer-split", "it shards every layer's", _ON_0523),
        ("enable_flexkv", "--enable-flexkv", "it registers every layer's", "no release runs it"),
        ("disaggregation_mode", "--disaggregation-mode", "its KV transfer registers every layer's", _ON_0523),
    ),
    "0.5.23": (
        ("enable_flexkv", "--enable-flexkv", "it registers every layer's with the first one's shape",
         "no release runs it"),
    ),
}


def feature_on(cfg, field: str) -> bool:
    value = getattr(cfg, field, None)
    return value not in (None, False, "null", "")


def check_server_args(cfg, settings, release: str) -> None:
    """Refuse a server feature this release cannot run with S layers that hold no index key."""
    from .settings import IndexCacheError

    if settings.calibration or pat.SHARED not in settings.pattern:
        return
    for field, flag, why, instead in UNSUPPORTED.get(release, ()):
        if feature_on(cfg, field):
            raise IndexCacheError(
                f"{flag} cannot run with {settings.source} on SGLang {release}: S layers hold no index-K buffer"
                f" and {why} ({instead}; or drop {flag})")
