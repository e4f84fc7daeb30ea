"""IndexCache endpoints of the patched SGLang (real app, auth middleware, IPC codec; see the driver),
and the overlay's pure parts: overlap recall, what a config.json selects."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sglang_support import checkpoints as ck
from sglang_support import trees as sgl

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import PatternError
from sglang_indexcache.sglang_overlay import overlap, settings

DRIVER = sgl.DRIVER.with_name("endpoints_driver.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory, sglang_release):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    checkpoint = ck.session_checkpoints(tmp_path_factory)["types"]
    results = tmp_path_factory.mktemp("endpoints") / "results.json"
    proc = subprocess.run([sys.executable, str(DRIVER), str(checkpoint), str(results)],
                          env=sgl.env(trees.patched, sglang_release), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.mark.sglang
def test_endpoints_need_the_admin_key(run):
    assert run["get_no_key"][0] == 401 and run["set_no_key"][0] == 401
    assert run["communicator"] == ["index_cache"]


@pytest.mark.sglang
def test_get_state_and_gauge(run):
    status, body = run["get"]
    assert status == 200 and body["pattern"] == "FSSFSSSF" and body["kept_indexers"] == 3 and body["calibration"]
    assert run["gauge_start"] == 3


@pytest.mark.sglang
def test_switch_under_load_retracts_switches_and_continues(run):
    status, body = run["set_in_flight"]
    assert status == 200 and body["pattern"] == "FSFSFSFS"
    after = run["after_in_flight"]
    # pause in retract mode under the old pattern, switch, continue under the new one; no flush
    assert after["events"] == [["pause", "retract", "FSSFSSSF"], ["continue", "FSFSFSFS"]]
    assert after["model"] == "FSFSFSFS" and after["flushes"] == 0 and after["idle_checks"] == 1


@pytest.mark.sglang
def test_switch_waits_while_paused_by_another_then_flushes_and_updates_gauge(run):
    status, body = run["set"]
    assert status == 200 and body["pattern"] == "FSSSFSSS"
    after = run["after_set"]
    assert after["model"] == "FSSSFSSS" and after["next"] == [True, True, True, False, True, True, True, False]
    assert after["idle_checks"] == 4  # 1 under load, then busy twice (HTTP side retried), switched on the third
    assert len(after["events"]) == 2  # the paused scheduler was not paused or continued again
    assert after["flushes"] == 1 and after["gauge"] == 2
    assert run["server_info"]["pattern"] == "FSSSFSSS"


@pytest.mark.sglang
def test_invalid_switch_changes_nothing(run):
    assert run["set_invalid"] == [400, {"error": "layer 0 must be F: a shared layer 0 has no earlier layer to"
                                                 " reuse top-k from"}]
    assert run["set_bad_body"][0] == 400 and run["overlap_bad_body"][0] == 400
    assert run["after_invalid"] == {"model": "FSSSFSSS", "flushes": 1}


@pytest.mark.sglang
def test_decode_stride_switches_between_batches(run):
    assert run["stride_no_key"][0] == 401
    status, body = run["stride"]
    assert status == 200 and body["pattern"] == "FSSSFSSS", body
    assert body["decode_stride"] == "4" and body["effective_stride"] == 4.0 and body["stride_switchable"]
    assert run["stride_gauge"] == 4.0
    status, body = run["stride_layers"]  # per layer; S layers' entries are ignored, F layers 0 and 4
    assert status == 200 and body["decode_stride"] == "2/8" and body["effective_stride"] == 3.2, body
    errors = [(s, b["error"]) for s, b in run["stride_bad"]]
    assert errors[0][0] == 400 and "decode_stride[0] is 0" in errors[0][1]
    assert errors[1][0] == 400 and "decode_stride has 2 entries but the model has 8" in errors[1][1]
    assert errors[2][0] == 400 and "body must be" in errors[2][1]
    assert errors[3][0] == 400 and "body must be" in errors[3][1]
    assert run["stride_server_info"]["decode_stride"] == "2/8"
    assert run["stride_get"][1]["decode_strides"] == [2, 1, 1, 1, 8, 1, 1, 1]
    assert run["stride_five"][0] == 200 and run["stride_five"][1]["decode_stride"] == "2/32"
    status, body = run["all_f_refused"]  # all F would regroup these strides into 5 groups
    assert status == 400 and "at most 4 distinct strides" in body["error"] and run["after_refused"] == "FSSSFSSS"
    assert run["stride_flags_off"][0] == 404


@pytest.mark.sglang
def test_overlap_needs_the_topk_capture_that_calibration_leaves_off(run):
    status, body = run["overlap_no_capture"]
    assert status == 400 and "--enable-return-indexer-topk" in body["error"]
    assert run["get"][1]["topk_capture"] is False


@pytest.mark.sglang
def test_overlap_runs_all_f_and_restores(run):
    status, body = run["overlap"]
    assert status == 200
    assert run["after_overlap"]["generate_patterns"] == ["FFFFFFFF"] and run["after_overlap"]["return_indexer_topk"]
    assert run["after_overlap"]["model"] == "FSSSFSSS"
    assert body["tokens"] == 10
    assert [(r["layer"], r["source"], r["shared"], r["recall"]) for r in body["layers"]] == [
        (0, 0, False, 1.0), (1, 0, True, 0.75), (2, 0, True, 0.5), (3, 0, True, 0.25),
        (4, 4, False, 1.0), (5, 4, True, 0.75), (6, 4, True, 0.5), (7, 4, True, 0.25)]
    assert body["mean_recall"] == pytest.approx(0.5)  # S layers only


@pytest.mark.sglang
def test_flags_off_means_no_endpoint_state_and_no_server_info_entry(run):
    assert run["get_flags_off"][0] == 404
    assert run["server_info_flags_off"] is None


def test_recall_handles_padding_and_empty_rows():
    own = np.array([[3, 5, 7, -1], [-1, -1, -1, -1], [1, 2, 3, 4]])  # [t=3, topk=4]
    reused = np.array([[5, 9, -1, -1], [1, 2, 3, 4], [4, 3, 2, 1]])
    got = overlap.recall(own, reused)
    assert got[0] == pytest.approx(1 / 3) and np.isnan(got[1]) and got[2] == 1.0


def test_recall_does_not_match_across_tokens():
    own = np.array([[0, 1], [2, 3]])
    reused = np.array([[2, 3], [0, 1]])  # the same indices, but another token's
    assert overlap.recall(own, reused).tolist() == [0.0, 0.0]


def test_shared_layer_recall_validates_the_pattern():
    topk = np.zeros((2, 3, 4), dtype=np.int32)
    with pytest.raises(PatternError, match="layer 0 must be F"):
        overlap.shared_layer_recall(topk, "SFF")
    with pytest.raises(PatternError, match="pattern has 2 layers but the model has 3"):
        overlap.shared_layer_recall(topk, "FS")


@pytest.mark.parametrize("config, expected", [
    ({"indexer_types": ["full", "shared", "shared", "full"]}, ("FSSF", "indexer_types")),
    ({"indexer_types": ["full", "shared"]}, ("FSFF", "indexer_types")),  # short list: rest F, as SGLang
    ({"index_topk_pattern": "FSS"}, ("FSSF", "index_topk_pattern")),
    ({"index_topk_freq": 2}, ("FFSF", "index_topk_freq")),  # SGLang's default offset 2
    ({"index_topk_freq": 2, "index_skip_topk_offset": 1}, ("FSFS", "index_topk_freq")),
    ({}, (None, None)),
])
def test_checkpoint_pattern_reads_config_like_sglang(config, expected):
    assert pat.sglang_config_pattern({"num_hidden_layers": 4, **config}) == expected


@pytest.mark.parametrize("config, expected", [
    # SGLang 0.5.17 has no indexer_types: the pattern (or the frequency) is what it reads
    ({"indexer_types": ["full", "shared", "shared", "full"]}, (None, None)),
    ({"indexer_types": ["full", "shared", "full", "full"], "index_topk_pattern": "FFSS"}, ("FFSS", "index_topk_pattern")),
    ({"indexer_types": ["full", "shared", "full", "full"], "index_topk_freq": 2}, ("FFSF", "index_topk_freq")),
    ({"cli_factor": 2, "index_topk_pattern": "FFFF"}, ("FSFS", "cli_factor")),  # the model class reads it first
    ({"cli_factor": 1, "index_topk_pattern": "FFSS"}, ("FFSS", "index_topk_pattern")),
])
def test_checkpoint_pattern_of_sglang_0_5_17(config, expected):
    assert pat.sglang_config_pattern({"num_hidden_layers": 4, **config}, reads_indexer_types=False,
                                     reads_cli_factor=True) == expected
