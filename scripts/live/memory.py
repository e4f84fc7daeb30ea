"""What the live phases predict of SGLang 0.5.17's DSA KV pool, stock and patched.

The arithmetic is ``sglang_overlay/shared_layers.py``'s (the one home of it): per token and layer the
pool holds the latent KV (1,152 B in bf16; 656 B in FlashMLA's fp8 layout) and, stock, every layer's
index key (132 B), patched only the F layers'. On 0.5.17 the stock server also builds every S layer's
indexer module and the patched one does not: those weights join the patched pool, so the expected
token gain depends on the stock pool's size (:func:`token_gain`).

The stacks are ``indexcache make-checkpoint`` ones: GLM-5's attention and indexer at ``hidden``.

Memory fraction: SGLang sizes the pool as ``avail_after_weights - avail_before_weights x (1 -
mem_fraction_static)`` GiB (kv_pool_runtime, 0.5.17; checked against the 2026-12-02 log: 136.77 -
139.09 x 0.2 = 108.95 GiB predicted, 108.93 GiB allocated).
"""

from __future__ import annotations

import math

from sglang_indexcache.configs import GLM_5
from sglang_indexcache.sglang_overlay import shared_layers as sl

KV_DTYPES = {"bf16": "bf16", "fp8": "fp8_e4m3"}  # the runner's names -> SGLang's --kv-cache-dtype
GIB = 2 ** 30
TOLERANCE = 0.005  # measured / expected token ratio: pages of 64 tokens and rounding, nothing else


def pool(layers: int, kept: int, kv: str) -> sl.PoolBytes:
    """Bytes per token of a ``layers``-layer pool whose ``kept`` F layers hold an index key."""
    return sl.PoolBytes(layers, kept, sl.latent_kv_bytes(kv_cache_dtype=KV_DTYPES[kv]), sl.index_k_bytes())


def cell_bytes(layers: int, kept: int, kv: str, patched: bool) -> int:
    """Pool bytes per token: index keys on every layer (stock) or on F layers only (patched)."""
    arithmetic = pool(layers, kept, kv)
    return arithmetic.cell if patched else arithmetic.stock_cell


def freed_weight_bytes(layers: int, kept: int, hidden: int = 2048) -> int:
    """Bytes of the S layers' indexer modules: built by stock 0.5.17, not by the patched server."""
    return (layers - kept) * sl.indexer_weight_bytes(dict(GLM_5, hidden_size=hidden))


def expected_gain(layers: int, kept: int, kv: str, stock_tokens: int | None = None, hidden: int = 2048) -> float:
    """Relative KV-token gain of the patched pool over stock at the same ``--mem-fraction-static``.

    Without ``stock_tokens``: the index keys alone, i.e. the gain at equal pool bytes (every-4 on 32
    layers: +8.4% bf16, +14.4% fp8). With the stock pool's tokens: the freed indexer weights too
    (+8.8% bf16 at the 2026-12-04 stock pool of 2,676,032 tokens).
    """
    arithmetic = pool(layers, kept, kv)
    if stock_tokens is None:
        return arithmetic.ratio - 1
    return arithmetic.ratio_with_weights(freed_weight_bytes(layers, kept, hidden), stock_tokens) - 1


def token_gain(layers: int, kept: int, kv: str, stock_tokens: int, patched_tokens: int, hidden: int = 2048) -> dict:
    """Measured token gain against :func:`expected_gain`; ``ok`` when their ratios agree within TOLERANCE."""
    expected = expected_gain(layers, kept, kv, stock_tokens, hidden)
    measured = patched_tokens / stock_tokens - 1
    return {"gain": measured, "expected_gain": expected, "expected_gain_index_k": expected_gain(layers, kept, kv),
            "freed_weight_bytes": freed_weight_bytes(layers, kept, hidden),
            "ok": abs((1 + measured) / (1 + expected) - 1) <= TOLERANCE}


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
