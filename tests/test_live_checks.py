"""The live script's checks of "S layers hold nothing" (pure functions; the GPU run calls them)."""

from __future__ import annotations

import pytest

from sglang_indexcache import pattern as pat
from sglang_indexcache.configs import GLM_5
from sglang_indexcache.sglang_overlay import live_checks as lc
from sglang_indexcache.sglang_overlay import shared_layers as sl

STACK = {**GLM_5, "hidden_size": 2048, "num_hidden_layers": 32}  # the live 32-layer stack
EVERY4 = pat.uniform(32, 4)


def test_indexer_weight_bytes_at_the_live_stack():
    # wq_b 2048 x (32 x 128), wk 2048 x 128 and weights_proj 2048 x 32, k_norm 2 x 128, in bf16
    assert lc.indexer_weight_bytes(STACK) == (2048 * 4096 + 2048 * 160 + 256) * 2


@pytest.mark.parametrize("dtype", ["auto", "fp8_e4m3"])
def test_token_gain_accepts_what_the_freed_bytes_predict(dtype):
    arithmetic = sl.pool_bytes(EVERY4, sl.latent_kv_bytes(kv_cache_dtype=dtype))
    budget = 100 * 2**30
    weights = 24 * lc.indexer_weight_bytes(STACK)
    stock, patched = budget // arithmetic.stock_cell, (budget + weights) // arithmetic.cell
    result = lc.token_gain(STACK, EVERY4, dtype, stock, patched)
    assert result["ok"] and result["freed_index_k_bytes_per_token"] == 24 * 132
    assert result["expected_ratio"] > result["index_k_ratio"] == arithmetic.ratio
    assert abs(result["measured_ratio"] - result["expected_ratio"]) < 1e-5
    # only the index keys freed, not the weights (SGLang 0.5.23's stock already frees both)
    only_keys = lc.token_gain(STACK, EVERY4, dtype, stock, budget // arithmetic.cell, weights_freed=False)
    assert only_keys["ok"]


@pytest.mark.parametrize("patched_over_stock", [1.0, 1.04, 1.2])
def test_token_gain_rejects_what_the_bytes_do_not_explain(patched_over_stock):
    stock = 3_000_000
    assert not lc.token_gain(STACK, EVERY4, "auto", stock, int(stock * patched_over_stock))["ok"]


def test_input_logprobs_skip_the_first_token():
    reply = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.5, 7, None], [-0.25, 9, None]]}}
    assert lc.input_logprobs(reply) == [-1.5, -0.25]


def test_logprob_agreement_and_chunking_verdict():
    reference = [-1.0, -2.0, -3.0, -4.0]
    noise = lc.logprob_agreement(reference, [-1.001, -2.0, -3.002, -4.0])
    assert noise["max_abs"] == pytest.approx(0.002) and noise["mean_abs"] == pytest.approx(0.00075)
    assert lc.chunking_verdict(noise, noise)["ok"]
    broken = lc.logprob_agreement(reference, [-1.0, -2.9, -3.0, -5.5])
    assert not lc.chunking_verdict(noise, broken)["ok"]
    with pytest.raises(ValueError, match="differ in length"):
        lc.logprob_agreement(reference, reference[:2])
