"""The decode stride on each release's real SGLang classes (CPU; the merge kernel in Triton's interpreter).

The driver (``sglang_support/stride_driver.py``) decodes requests over SGLang's own ReqToTokenPool
through the hooks of patch 0007 and records every top-k each F layer was served. Here each one is
checked against a rule written out independently: a refresh serves the top-k of that step's logits
sorted by score (mapped to the request's KV slots when the top-k is fused, as SGLang's default); a
reuse step serves the best ``k - d`` entries of the same request's last refresh (same life: never an
entry of a finished, aborted or retracted request, nor of an earlier life of the same one) followed
by the ``d`` newest positions, with ``1 <= d < stride``; every request refreshes at its first decode
step after a prefill and at least every ``stride`` steps. Stride 1 leaves everything stock, and the
decode CUDA-graph runner's own label methods pick one graph per step kind.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sglang_support import trees as sgl

pytestmark = pytest.mark.sglang
DRIVER = sgl.DRIVER.with_name("stride_driver.py")
K, STRIDE = 8, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, sglang_release):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    results = tmp_path_factory.mktemp("stride") / "results.json"
    proc = subprocess.run([sys.executable, str(DRIVER), str(results), sglang_release],
                          env=sgl.env(trees.patched, sglang_release, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


def _expected_refresh(record, fused: bool) -> list[int]:
    logits = record["logits"]
    best = sorted(range(len(logits)), key=lambda p: -logits[p])[:K]
    if fused:
        best = [record["slots"][p] for p in best]
    return best + [-1] * (K - len(best))


def _expected_reuse(record, last, fused: bool) -> list[int]:
    d = record["t"] - last["t"]
    stored = [e for e in last["served"] if e >= 0]
    kept = stored[: min(len(stored), K - d)]
    new = list(range(record["t"] - d + 1, record["t"] + 1))
    if fused:
        new = [record["slots"][p] for p in new]
    return kept + new + [-1] * (K - len(kept) - len(new))


@pytest.mark.parametrize("mode", ["fused", "positions"])
def test_every_served_topk_follows_the_rule(run, mode):
    fused = mode == "fused"
    records = run[mode]["records"]
    last, refreshes, reuses = {}, 0, 0
    for record in records:
        key = (record["rid"], record["life"], record["layer"])
        if record["how"] == "refresh":
            assert record["served"] == _expected_refresh(record, fused), record["step"]
            if key in last:
                assert record["t"] - last[key]["t"] <= STRIDE, f"{key}: more than {STRIDE} steps without a refresh"
            last[key] = record
            refreshes += 1
        else:
            assert key in last, f"{key} reused at step {record['step']} without a refresh in this life"
            d = record["t"] - last[key]["t"]
            assert 1 <= d < STRIDE, (key, d)
            assert record["served"] == _expected_reuse(record, last[key], fused), (key, record["step"])
            reuses += 1
    assert reuses > refreshes > 0, (reuses, refreshes)
    layers_per_step = {(r["step"], r["layer"]) for r in records if r["how"] == "reuse"}
    assert len(run[mode]["key_stores"]) == len(layers_per_step), "a reuse step stores its index keys once per layer"


def test_a_steady_batch_refreshes_every_stride_steps(run):
    assert run["fused"]["kinds"][:9] == ["refresh", "reuse", "reuse", "reuse"] * 2 + ["refresh"]


@pytest.mark.parametrize("mode", ["fused", "positions"])
def test_each_life_starts_with_a_refresh(run, mode):
    """A new request, one taking over a finished/aborted request's row (even without a prefill: the
    slot's generation changed), a retracted request back with a new row, and (0.5.17) a request after
    the pool was cleared, which zeroes the generations: each refreshes first."""
    firsts = {}
    for record in run[mode]["records"]:
        firsts.setdefault((record["rid"], record["life"]), record["how"])
    assert set(firsts.values()) == {"refresh"}, firsts
    assert ("a", 1) in firsts and ("e", 0) in firsts and ("d", 0) in firsts
    kinds = run[mode]["kinds"]
    for event, rid, step in run[mode]["events"]:
        assert rid and step <= len(kinds)


def test_store_is_one_row_per_request_slot(run):
    # 2 F layers x (POOL_ROWS 4 + 1 padding row) x (k 8 + 1 refresh position) x 4 B
    assert run["fused"]["store_bytes"] == 2 * 5 * (K + 1) * 4


@pytest.mark.parametrize("name", ["no-flags", "pattern-only"])
def test_stride_one_is_stock(run, name):
    stock = run["stock"][name]
    assert stock["attr"] is False and stock["reuse"] is None
    assert stock["stock_calls"] == 1 and stock["stock_value"] == [[-2] * K]  # SGLang's own topk_transform
    assert stock["store"] is None and stock["mirror"] is None
    assert stock["capture_labels"] == [None] and stock["graph_variants"] is None
    assert stock["labels"] == [None, "lora", "nolora"]


def test_one_graph_per_step_kind(run, sglang_release):
    graphs = run["graphs"]
    if sglang_release == "0.5.17":  # its own capture loop: per batch size, lora/nolora x reuse/refresh
        assert [c[:2] for c in graphs["captured"]] == [
            [bs, f"{lora}+{kind}"] for bs in (2, 1) for lora in ("lora", "nolora") for kind in ("reuse", "refresh")]
        assert [c[3] for c in graphs["captured"]][:4] == ["lora", "lora", "nolora", "nolora"]
        expected_replay = [f"nolora+{k}" for k in ("refresh", "reuse", "reuse", "reuse", "refresh", "reuse")]
        assert graphs["replay_without_step"] == "nolora+refresh"
    else:
        assert [c[1] for c in graphs["captured"]] == ["reuse", "refresh"]
        expected_replay = ["refresh", "reuse", "reuse", "reuse", "refresh", "reuse"]
        assert graphs["replay_without_step"] == "refresh"
    assert [c[2] for c in graphs["captured"]] == [c[1].split("+")[-1] for c in graphs["captured"]], \
        "the indexer hooks see the kind being captured"
    assert graphs["after_capture"] is None
    assert graphs["replay"] == expected_replay
