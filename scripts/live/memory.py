"""KV-pool arithmetic of SGLang 0.5.17's DSA pool, stock and with the S layers' index-K buffers freed.

Per token and layer the pool holds the MLA latent (kv_lora 512 + rope 64: 1,152 B in bf16; 656 B in
FlashMLA's fp8 layout: 512 fp8 + 16 B of scales + 64 bf16 rope) and the indexer's key (128 fp8 + one
fp32 scale = 132 B). Stock allocates the index key for every layer
(``pool_configurator._compute_cell_size``); the patched pool only for F layers. The ``serving``
branch carries the project's own version of this formula (with the S layers' indexer weights); this
one is what the live phases predict with until it lands.

Memory fraction: SGLang sizes the pool as ``avail_after_weights - avail_before_weights x (1 -
mem_fraction_static)`` GiB (kv_pool_runtime, 0.5.17; checked against the 2026-12-02 log: 136.77 -
139.09 x 0.2 = 108.95 GiB predicted, 108.93 GiB allocated).
"""

from __future__ import annotations

import math

KV_BYTES = {"bf16": 2 * (512 + 64), "fp8": 656}
INDEX_K_BYTES = 128 + 4
GIB = 2 ** 30


def cell_bytes(layers: int, kept: int, kv: str, patched: bool) -> int:
    """Pool bytes per token: every layer's latent, index keys on every layer (stock) or F layers only."""
    return layers * KV_BYTES[kv] + (kept if patched else layers) * INDEX_K_BYTES


def expected_gain(layers: int, kept: int, kv: str) -> float:
    """Relative KV-token gain of the patched pool at the same bytes (every-4, 32 layers: +8.4% bf16, +14.4% fp8)."""
    return cell_bytes(layers, kept, kv, False) / cell_bytes(layers, kept, kv, True) - 1


def mem_fraction_for(tokens: int, cell: int, avail_before_gb: float, avail_after_gb: float) -> float:
    """``--mem-fraction-static`` that gives a pool of ``tokens`` tokens of ``cell`` bytes (see the docstring)."""
    fraction = 1 - (avail_after_gb - tokens * cell / GIB) / avail_before_gb
    if not 0.05 < fraction < 0.95:
        raise ValueError(f"a pool of {tokens} tokens needs --mem-fraction-static {fraction:.3f}")
    return fraction


def footprint(length: int, new: int, page: int = 64) -> int:
    """Pool tokens SGLang reserves to admit one ignore_eos request (pages of the prompt, all new tokens, 1)."""
    return math.ceil(length / page) * page + new + 1


def saturation_plan(stock_pool: int, gain: float, n: int, new: int, page: int = 64,
                    context: int = 202752) -> dict:
    """A prompt length R for which the stock pool holds n - 1 requests of R + new tokens and the patched pool n.

    The n requests' footprint is put halfway between the stock pool and the patched one
    (``stock_pool x (1 + gain)``), so each side has a margin of about gain / 2.
    """
    patched_pool = int(stock_pool * (1 + gain))
    per_request = (stock_pool + patched_pool) / (2 * n)
    length = int((per_request - new - 1) // page * page)
    length = min(length, (context - new - page) // page * page)
    need = footprint(length, new, page)
    return {"n": n, "new_tokens": new, "length": length, "stock_pool": stock_pool,
            "patched_pool_predicted": patched_pool, "footprint": need, "stock_holds": stock_pool // need,
            "patched_holds_predicted": patched_pool // need}


def pool_for_saturation(length: int, new: int, n: int, gain: float, page: int = 64) -> int:
    """The stock pool (tokens) for which :func:`saturation_plan` picks about ``length``."""
    return int(2 * n * footprint(length, new, page) / (2 + gain))
