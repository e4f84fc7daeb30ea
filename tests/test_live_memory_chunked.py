"""The live phases' pure parts: what the KV pool should gain (scripts/live/memory.py, on
shared_layers' arithmetic) and the chunked-prefill comparison (scripts/live/chunked.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from live import chunked, memory  # noqa: E402

from sglang_indexcache import pattern as pat  # noqa: E402
from sglang_indexcache.configs import GLM_5  # noqa: E402
from sglang_indexcache.sglang_overlay import shared_layers as sl  # noqa: E402

STACK = {**GLM_5, "hidden_size": 2048, "num_hidden_layers": 32}  # the live 32-layer stack


def test_memory_delegates_to_the_pool_arithmetic():
    for kv, dtype in (("bf16", "auto"), ("fp8", "fp8_e4m3")):
        arithmetic = sl.pool_bytes(pat.uniform(32, 4), sl.latent_kv_bytes(kv_cache_dtype=dtype))
        assert memory.cell_bytes(32, 8, kv, False) == arithmetic.stock_cell
        assert memory.cell_bytes(32, 8, kv, True) == arithmetic.cell
    assert memory.freed_weight_bytes(32, 8) == 24 * sl.indexer_weight_bytes(STACK)


def test_memory_formula_and_saturation_plan():
    assert memory.expected_gain(32, 8, "bf16") == pytest.approx(41088 / 37920 - 1)  # +8.4%
    assert memory.expected_gain(32, 8, "fp8") == pytest.approx(25216 / 22048 - 1)  # +14.4%
    # with the freed indexer weights, at the 2026-12-04 stock pool (measured: 2,910,784 patched, +8.77%)
    assert memory.expected_gain(32, 8, "bf16", 2_676_032) == pytest.approx(2_910_784 / 2_676_032 - 1, abs=2e-4)
    # the 2026-12-02 8-layer start-up: 0.8 of 139.09 GiB with 136.77 GiB left after the weights
    cell = memory.cell_bytes(8, 8, "bf16", False)
    assert memory.mem_fraction_for(11386816, cell, 139.09, 136.77) == pytest.approx(0.8, abs=0.001)
    gain = memory.expected_gain(32, 8, "fp8")
    pool = memory.pool_for_saturation(180_000, 256, 4, gain)
    plan = memory.saturation_plan(pool, gain, 4, 256)
    assert 170_000 < plan["length"] <= 180_000 and plan["stock_holds"] == 3 and plan["patched_holds_predicted"] == 4
    heavier = memory.expected_gain(32, 8, "fp8", pool)  # the weights weigh more in a smaller (fp8) pool
    assert heavier > gain + 0.02
    plan = memory.saturation_plan(pool, heavier, 4, 256)
    assert plan["stock_holds"] == 3 and plan["patched_holds_predicted"] == 4


@pytest.mark.parametrize("kv, dtype", [("bf16", "auto"), ("fp8", "fp8_e4m3")])
def test_token_gain_accepts_what_the_freed_bytes_predict(kv, dtype):
    arithmetic = sl.pool_bytes(pat.uniform(32, 4), sl.latent_kv_bytes(kv_cache_dtype=dtype))
    budget = 100 * 2**30
    weights = 24 * sl.indexer_weight_bytes(STACK)
    stock, patched = budget // arithmetic.stock_cell, (budget + weights) // arithmetic.cell
    result = memory.token_gain(32, 8, kv, stock, patched)
    assert result["ok"] and result["freed_weight_bytes"] == weights
    assert result["expected_gain"] > result["expected_gain_index_k"] == pytest.approx(arithmetic.ratio - 1)
    assert abs(result["gain"] - result["expected_gain"]) < 1e-5


@pytest.mark.parametrize("patched_over_stock", [1.0, 1.04, 1.2])
def test_token_gain_rejects_what_the_bytes_do_not_explain(patched_over_stock):
    stock = 3_000_000
    assert not memory.token_gain(32, 8, "bf16", stock, int(stock * patched_over_stock))["ok"]


class _Client:
    def __init__(self, reply):
        self.reply, self.bodies = reply, []

    def post_json(self, path, body):
        self.bodies.append((path, body))
        return self.reply


def test_prompt_logprobs_keep_the_first_token_as_none():
    client = _Client([{"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.5, 7, None], [-0.25, 9, None]]}}])
    assert chunked.prompt_logprobs(client, [1, 7, 9]) == [None, -1.5, -0.25]
    path, body = client.bodies[0]
    assert path == "/generate" and body["return_logprob"] and body["logprob_start_len"] == 0
    with pytest.raises(ValueError, match="expected 4 input_token_logprobs, got 3"):
        chunked.prompt_logprobs(client, [1, 7, 9, 2])
    with pytest.raises(ValueError, match=r"input_token_logprobs\[2\] is for token 9, the prompt has 8"):
        chunked.prompt_logprobs(client, [1, 7, 8])


def test_difference_and_verdict():
    reference = [None, -1.0, -2.0, -3.0, -4.0]
    noise = chunked.difference(reference, [None, -1.001, -2.0, -3.002, -4.0])
    assert noise["max_abs"] == pytest.approx(0.002) and noise["mean_abs"] == pytest.approx(0.00075)
    assert noise["positions"] == 4 and noise["p99_abs"] == pytest.approx(0.002)
    control = chunked.difference(reference, [None, -1.2, -2.3, -2.8, -4.4])  # a pattern change
    assert chunked.verdict(noise, control)[0] == "pass"
    broken = chunked.difference(reference, [None, -1.0, -2.9, -3.0, -5.5])
    assert chunked.verdict(broken, control)[0] == "fail"
    with pytest.raises(ValueError, match="5 against 3 positions"):
        chunked.difference(reference, reference[:3])


def test_chunked_verdicts():
    reference = [None] + [-8.0 + 0.01 * (i % 7) for i in range(1, 100)]
    control_side = [None] + [v + 0.05 for v in reference[1:]]
    control = chunked.difference(reference, control_side, chunk=40)
    close = chunked.difference(reference, [None] + [v + 1e-4 for v in reference[1:]], chunk=40)
    far = chunked.difference(reference, [None] + [v + 0.03 for v in reference[1:]], chunk=40)
    assert close["segment_mean_abs"] == [pytest.approx(1e-4)] * 3
    assert chunked.verdict(close, control)[0] == "pass"
    assert chunked.verdict(far, control)[0] == "fail"  # within bf16 but as large as a pattern change
    assert chunked.verdict(close, chunked.difference(reference, reference))[0] == "inconclusive"
    assert chunked.verdict(close, None)[0] == "inconclusive"
