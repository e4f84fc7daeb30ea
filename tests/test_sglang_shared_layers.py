"""S layers hold nothing: the KV pool, its sizing and the MTP side, on each release's real wheel (CPU).

With a pattern flag the DSA pool holds index-K buffers for F layers only, SGLang's own pool sizing
(``create_memory_pool_configurator``: the cell size that turns ``--mem-fraction-static`` into
``max_total_num_tokens``) counts only theirs, an S layer's buffer cannot be read or written, and
MTP/NextN keep their indexer and index-K. The checkpoint has GLM-5's latent KV sizes at 32 layers
(the live stack's; cell sizes do not depend on the hidden size). The model side (no indexer module
on S layers, both checkpoint flavours load) is in test_sglang_model.py.
"""

from __future__ import annotations

import json

import pytest
from sglang_support import checkpoints as ck
from sglang_support import trees as sgl

from sglang_indexcache import pattern as pat
from sglang_indexcache.configs import GLM_5
from sglang_indexcache.errors import UsageError
from sglang_indexcache.sglang_overlay import shared_layers as sl

N = 32
EVERY4 = pat.uniform(N, 4)
BUDGET = 10 * 2**30  # bytes SGLang would have after --mem-fraction-static
TOKENS = 4096  # pool built at this size; index-K rows are pages: (4096 + 64 + 1) // 64
PAGE = 64
STAGE = (6, 22)  # a pipeline stage's layer range
KV = {"bf16": sl.latent_kv_bytes(512, 64, "auto"), "fp8": sl.latent_kv_bytes(512, 64, "fp8_e4m3")}


# ---------------------------------------------------------------- arithmetic (no SGLang) ---------

@pytest.mark.parametrize("dtype, kv, stock_cell, cell", [
    ("auto", 1152, 32 * 1284, 32 * 1152 + 8 * 132),  # GLM-5 latent in bf16: (512 + 64) x 2
    ("fp8_e4m3", 656, 32 * 788, 32 * 656 + 8 * 132),  # 512 fp8 + 4 fp32 scales + 64 bf16 rope
])
def test_pool_bytes_at_every_4_on_32_layers(dtype, kv, stock_cell, cell):
    assert sl.latent_kv_bytes(512, 64, dtype) == kv and sl.index_k_bytes(128) == 132
    arithmetic = sl.pool_bytes(EVERY4, kv)
    assert (arithmetic.stock_cell, arithmetic.cell, arithmetic.freed) == (stock_cell, cell, 24 * 132)
    assert sl.expected_token_ratio(EVERY4, kv) == stock_cell / cell


def test_expected_gains_meet_the_issue_targets():
    assert 1.08 < sl.expected_token_ratio(EVERY4, KV["bf16"]) < 1.09  # target >= +7%
    assert 1.14 < sl.expected_token_ratio(EVERY4, KV["fp8"]) < 1.15  # target >= +12%
    assert sl.expected_token_ratio("F" * N, KV["bf16"]) == 1.0


def test_draft_layers_keep_their_index_key():
    arithmetic = sl.pool_bytes(EVERY4, 1152, draft_layers=1)
    assert arithmetic.stock_cell == 33 * 1284 and arithmetic.cell == 33 * 1152 + 9 * 132
    assert arithmetic.ratio < sl.expected_token_ratio(EVERY4, 1152)


def test_indexer_weight_bytes_at_the_live_stack():
    # wq_b 2048 x (32 x 128), wk 2048 x 128 and weights_proj 2048 x 32, k_norm 2 x 128, in bf16
    assert sl.indexer_weight_bytes({**GLM_5, "hidden_size": 2048}) == (2048 * 4096 + 2048 * 160 + 256) * 2


def test_freed_indexer_weights_explain_the_measured_gain():
    """The H200 run of 2026-12-04 (32 layers, hidden 2048, every-4, bf16 KV, 0.8 of the memory):
    2,676,032 stock tokens, 2,910,784 patched (+8.77%); the index keys alone give +8.35%."""
    arithmetic = sl.pool_bytes(EVERY4, KV["bf16"])
    weights = 24 * sl.indexer_weight_bytes({**GLM_5, "hidden_size": 2048})
    ratio = arithmetic.ratio_with_weights(weights, 2_676_032)
    assert abs(2_910_784 / 2_676_032 / ratio - 1) < 1e-4 < abs(2_910_784 / 2_676_032 / arithmetic.ratio - 1)
    assert arithmetic.ratio_with_weights(0, 2_676_032) == arithmetic.ratio


def test_unknown_kv_dtype_is_refused():
    with pytest.raises(UsageError, match="fp8_e5m2"):
        sl.latent_kv_bytes(kv_cache_dtype="fp8_e5m2")


# ---------------------------------------------------------------- SGLang's pool, both releases -----

def _case(model, flags=(), **pool) -> dict:
    return {"argv": ["--model-path", str(model), "--device", "cpu", "--random-seed", "0", *flags],
            "pool": {"budget": BUDGET, "tokens": TOKENS, **pool}}


CONFIG_EVERY4 = ("--json-model-override-args",  # stock's way: 0.5.17 reads the first key, 0.5.23 the second
                 json.dumps({"index_topk_pattern": EVERY4, "indexer_types": pat.to_indexer_types(EVERY4)}))
PATCHED = {  # name -> (flags, pool spec)
    "none": ((), {}),
    "none-fp8": (("--kv-cache-dtype", "fp8_e4m3"), {}),
    "every4": (("--index-cache-every", "4"), {}),
    "every4-fp8": (("--index-cache-every", "4", "--kv-cache-dtype", "fp8_e4m3"), {}),
    "calibration": (("--index-cache-calibration", "--index-cache-every", "4"), {}),
    "none-mtp": ((), {"draft_layers": 1}),
    "every4-mtp": (("--index-cache-every", "4"), {"draft_layers": 1}),
    "none-stage": ((), {"layers": list(STAGE)}),
    "every4-stage": (("--index-cache-every", "4"), {"layers": list(STAGE)}),
    "config-every4": (CONFIG_EVERY4, {}),  # no flag: a pattern in the config, as stock takes it
    "every4-draft-pool": (("--index-cache-every", "4"), {"draft_worker": True, "layers": [1, 2]}),
}
STOCK = {
    "none": ((), {}),
    "none-fp8": (("--kv-cache-dtype", "fp8_e4m3"), {}),
    "every4": (CONFIG_EVERY4, {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sglang_release):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    model = ck.glm5_attention_checkpoint(tmp_path_factory, N)
    work = tmp_path_factory.mktemp("shared-layers")
    patched = [_case(model, flags, **spec) for flags, spec in PATCHED.values()]
    patched[-1]["draft"] = True
    stock = [_case(model, flags, **spec) for flags, spec in STOCK.values()]
    out = {"release": sglang_release,
           "patched": dict(zip(PATCHED, sgl.run_driver(trees.patched, patched, work / "patched", sglang_release))),
           "stock": dict(zip(STOCK, sgl.run_driver(trees.stock, stock, work / "stock", sglang_release)))}
    for side in ("patched", "stock"):
        for name, result in out[side].items():
            assert "error" not in result, f"{side} {name}: {result.get('error')}"
    return out


def _index_k_rows(tokens: int = TOKENS) -> int:
    return (tokens + PAGE + 1) // PAGE  # DSATokenToKVPool: pages of 64 tokens, one spare


@pytest.mark.sglang
@pytest.mark.parametrize("name, pattern", [
    ("none", "F" * N), ("every4", EVERY4), ("every4-fp8", EVERY4), ("calibration", "F" * N),
    ("every4-stage", EVERY4[STAGE[0]:STAGE[1]]), ("none-stage", "F" * (STAGE[1] - STAGE[0])),
])
def test_pool_holds_index_k_for_f_layers_only(runs, name, pattern):
    pool = runs["patched"][name]["pool"]
    assert pool["skips"] == [c == pat.SHARED for c in pattern]
    assert pool["index_k_bytes"] == [0 if c == pat.SHARED else _index_k_rows() * PAGE * 132 for c in pattern]
    kv = KV["fp8" if "fp8" in name else "bf16"]
    assert pool["kv_bytes"] == [(TOKENS + PAGE) * kv] * len(pattern)  # every layer keeps its latent KV


@pytest.mark.sglang
@pytest.mark.parametrize("name, pattern, kv, draft", [
    ("none", "F" * N, "bf16", 0), ("every4", EVERY4, "bf16", 0), ("none-fp8", "F" * N, "fp8", 0),
    ("every4-fp8", EVERY4, "fp8", 0), ("calibration", "F" * N, "bf16", 0), ("every4-mtp", EVERY4, "bf16", 1),
    ("none-mtp", "F" * N, "bf16", 1), ("every4-stage", EVERY4[STAGE[0]:STAGE[1]], "bf16", 0),
])
def test_sglang_sizing_counts_only_the_index_keys_held(runs, name, pattern, kv, draft):
    """The release's own cell size equals the arithmetic, and matches what its pool allocates."""
    pool = runs["patched"][name]["pool"]
    arithmetic = sl.pool_bytes(pattern, KV[kv], draft_layers=draft)
    assert pool["cell"] == arithmetic.cell
    if not draft:  # the pool built holds the target's layers only
        allocated = (sum(pool["kv_bytes"]) + sum(pool["index_k_bytes"])) / TOKENS
        assert arithmetic.cell <= allocated <= arithmetic.cell * (1 + 2 * PAGE / TOKENS)


@pytest.mark.sglang
@pytest.mark.parametrize("name, base, kv, draft, floor", [
    ("every4", "none", "bf16", 0, 1.07), ("every4-fp8", "none-fp8", "fp8", 0, 1.12),
    ("every4-mtp", "none-mtp", "bf16", 1, 1.07),
])
def test_freed_bytes_become_kv_tokens(runs, name, base, kv, draft, floor):
    tokens = runs["patched"][name]["pool"]["max_total_num_tokens"]
    stock_tokens = runs["patched"][base]["pool"]["max_total_num_tokens"]
    expected = sl.expected_token_ratio(EVERY4, KV[kv], draft_layers=draft)
    assert abs(tokens / stock_tokens - expected) <= 2 * PAGE / stock_tokens  # page rounding only
    assert tokens / stock_tokens >= floor


@pytest.mark.sglang
@pytest.mark.parametrize("name", ["every4", "every4-stage"])
def test_an_s_layer_buffer_cannot_be_read_or_written(runs, name):
    pool = runs["patched"][name]["pool"]
    start = STAGE[0] if name.endswith("stage") else 0
    for offset, skip in enumerate(pool["skips"]):
        layer, got, put = start + offset, pool["get_errors"][offset], pool["set_errors"][offset]
        if skip:
            for error in (got, put):
                assert error[0] == "SharedLayerError" and f"layer {layer} is an S layer" in error[1]
        else:
            assert got is None  # an F layer reads its buffer
            assert put is None or put[0] != "SharedLayerError"  # the store itself needs a GPU here


@pytest.mark.sglang
def test_start_up_line_states_bytes_freed_and_gain(runs):
    def lines(name):
        return [line for line in runs["patched"][name]["logs"] if "hold nothing" in line]

    assert lines("none") == [] and lines("calibration") == []
    [bf16] = lines("every4")
    [fp8] = lines("every4-fp8")
    assert "3168 B per token" in bf16 and "(+8.4%)" in bf16
    assert "3168 B per token" in fp8 and "(+14.4%)" in fp8


@pytest.mark.sglang
@pytest.mark.parametrize("name", ["none", "none-fp8"])
def test_without_flags_the_pool_equals_stock(runs, name):
    patched, stock = dict(runs["patched"][name]["pool"]), dict(runs["stock"][name]["pool"])
    assert patched.pop("skips") == [False] * N  # stock 0.5.17's pool has no such field
    stock.pop("skips")
    assert patched == stock


@pytest.mark.sglang
def test_without_a_flag_a_config_pattern_is_stock_and_nothing_raises(runs):
    """0.5.23 stock frees S layers' index-K from the config alone; the patched server then behaves
    as stock: its placeholders are handed out as stock does (the guard is armed by the flag only)."""
    result = runs["patched"]["config-every4"]
    patched, stock = dict(result["pool"]), dict(runs["stock"]["every4"]["pool"])
    skips = patched.pop("skips")
    assert skips == ([False] * N if runs["release"] == "0.5.17" else [c == pat.SHARED for c in EVERY4])
    stock.pop("skips")
    assert patched == stock and patched["get_errors"] == [None] * N
    assert result["logs"] == []


@pytest.mark.sglang
def test_stock_every4_frees_nothing_on_0517_and_the_same_on_0523(runs):
    """Stock 0.5.17 keeps every index-K under a config pattern; 0.5.23 frees them itself."""
    stock = runs["stock"]["every4"]["pool"]
    same_as = "none" if runs["release"] == "0.5.17" else "every4"
    assert stock["cell"] == runs["patched"][same_as]["pool"]["cell"]
    assert stock["index_k_bytes"] == runs["patched"][same_as]["pool"]["index_k_bytes"]


@pytest.mark.sglang
def test_mtp_draft_keeps_its_indexer_and_index_k(runs):
    result = runs["patched"]["every4-draft-pool"]
    assert result["draft"] == {"target_key": EVERY4, "draft_key": None, "indexer": True, "skip_topk": True}
    # the draft worker's one-layer pool, built from the target's config at an S layer's id
    assert result["pool"]["skips"] == [False] and result["pool"]["get_errors"] == [None]
    assert result["pool"]["index_k_bytes"] == [_index_k_rows() * PAGE * 132]


def _feature_argv(field: str, flag: str) -> list[str]:
    return [flag, "prefill"] if field == "disaggregation_mode" else [flag]


@pytest.mark.sglang
def test_features_copying_every_index_k_are_refused_only_when_s_layers_free_it(tmp_path_factory, sglang_release):
    """Each entry of shared_layers.UNSUPPORTED stops resolution with a pattern that has S layers,
    not with an all-F pattern (nothing freed) nor without a flag."""
    trees = sgl.trees(tmp_path_factory, sglang_release)
    model = ck.glm5_attention_checkpoint(tmp_path_factory, N)
    features = sl.UNSUPPORTED[sglang_release]
    base = ["--model-path", str(model), "--device", "cpu"]
    cases = [{"argv": base + ["--index-cache-every", "4", *_feature_argv(field, flag)]} for field, flag, *_ in features]
    field, flag, *_ = features[0]
    cases += [{"argv": base + ["--index-cache-pattern", "F" * N, *_feature_argv(field, flag)]},
              {"argv": base + _feature_argv(field, flag)}]
    results = sgl.run_driver(trees.patched, cases, tmp_path_factory.mktemp("refused"), sglang_release)
    for (_, flag, *_), result in zip(features, results):
        assert f"{flag} cannot run with --index-cache-every 4 on SGLang {sglang_release}" in result["error"]["message"]
    for result in results[len(features):]:
        assert "cannot run with" not in (result.get("error") or {}).get("message", "")
