"""Checks the live script runs on a GPU server for "S layers hold nothing" (pure functions, no SGLang).

- :func:`token_gain`: ``max_total_num_tokens`` of a patched server over a stock one at the same
  ``--mem-fraction-static`` (both from ``/server_info``), against what the freed bytes predict:
  the index keys of the S layers (:func:`shared_layers.expected_token_ratio`) and, on SGLang
  0.5.17, the S layers' indexer weights (:func:`indexer_weight_bytes`), which the stock server
  builds and this one does not.
- :func:`input_logprobs` / :func:`logprob_agreement` / :func:`chunking_verdict`: prompt
  log-probabilities of one long prompt under two ``--chunked-prefill-size`` settings; the pattern's
  chunked-vs-unchunked difference must stay within all-F's (the numerical noise of chunking itself).
"""

from __future__ import annotations

import math

from .. import pattern as pat
from . import shared_layers as sl


def indexer_weight_bytes(config: dict, param_bytes: int = 2) -> int:
    """Bytes of one layer's indexer module in SGLang (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``).

    ``q_lora_rank x index_n_heads x index_head_dim + hidden_size x (index_head_dim + index_n_heads)
    + 2 x index_head_dim`` parameters of ``param_bytes`` each (bf16: 2; ~17.4 MB at hidden 2048 and
    GLM-5's indexer).
    """
    heads, dim, hidden = config["index_n_heads"], config["index_head_dim"], config["hidden_size"]
    params = config["q_lora_rank"] * heads * dim + hidden * (dim + heads) + 2 * dim
    return params * param_bytes


def token_gain(config: dict, pattern: str, kv_cache_dtype: str, stock_tokens: int, patched_tokens: int,
               draft_layers: int = 0, weights_freed: bool = True, tolerance: float = 0.005) -> dict:
    """Measured ``patched_tokens / stock_tokens`` against the expected ratio; ``ok`` within ``tolerance``.

    ``config``: the checkpoint's config.json; ``pattern``: what both servers run (stock through
    ``--json-model-override-args``, patched through the flag); ``weights_freed``: the stock server
    builds the S layers' indexers (SGLang 0.5.17) and the patched one does not, so their bytes join
    the patched KV budget: expected = ``expected_token_ratio x (1 + freed weights / stock KV bytes)``.
    """
    pattern = pat.parse(pattern)
    kv = sl.latent_kv_bytes(config["kv_lora_rank"], config["qk_rope_head_dim"], kv_cache_dtype)
    arithmetic = sl.pool_bytes(pattern, kv, sl.index_k_bytes(config["index_head_dim"]), draft_layers)
    stock_kv_bytes = stock_tokens * arithmetic.stock_cell
    weights = pattern.count(pat.SHARED) * indexer_weight_bytes(config) if weights_freed else 0
    expected = arithmetic.ratio * (1 + weights / stock_kv_bytes)
    measured = patched_tokens / stock_tokens
    return {"pattern": pattern, "kv_cache_dtype": kv_cache_dtype, "stock_tokens": stock_tokens,
            "patched_tokens": patched_tokens, "measured_ratio": measured, "expected_ratio": expected,
            "index_k_ratio": arithmetic.ratio, "freed_index_k_bytes_per_token": arithmetic.freed,
            "freed_weight_bytes": weights, "stock_cell": arithmetic.stock_cell, "cell": arithmetic.cell,
            "ok": abs(measured / expected - 1) <= tolerance}


def input_logprobs(response: dict) -> list[float]:
    """Prompt log-probabilities from an SGLang ``/generate`` reply made with ``return_logprob: true,
    logprob_start_len: 0`` (``meta_info.input_token_logprobs``: ``[logprob, token_id, text]`` per
    token; the first token has none and is left out)."""
    rows = response["meta_info"]["input_token_logprobs"]
    return [float(row[0]) for row in rows if row[0] is not None]


def logprob_agreement(reference: list[float], other: list[float]) -> dict:
    """Absolute differences of two runs' prompt log-probabilities (same prompt, same tokens)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"log-probability lists differ in length or are empty: {len(reference)} vs {len(other)}")
    diffs = sorted(abs(a - b) for a, b in zip(reference, other))
    return {"tokens": len(diffs), "max_abs": diffs[-1], "mean_abs": sum(diffs) / len(diffs),
            "p99_abs": diffs[min(len(diffs) - 1, math.ceil(0.99 * len(diffs)) - 1)]}


def chunking_verdict(all_f: dict, pattern: dict, factor: float = 2.0, mean_floor: float = 0.01,
                     max_floor: float = 0.1) -> dict:
    """``pattern``'s chunked-vs-unchunked :func:`logprob_agreement` within ``factor`` times all-F's
    (or the floors, bf16 noise on log-probabilities in nats), for the mean and the maximum."""
    mean_limit = max(factor * all_f["mean_abs"], mean_floor)
    max_limit = max(factor * all_f["max_abs"], max_floor)
    return {"mean_limit": mean_limit, "max_limit": max_limit,
            "ok": pattern["mean_abs"] <= mean_limit and pattern["max_abs"] <= max_limit}
