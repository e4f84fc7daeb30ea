"""SGLang's log at the running count it reached, start-up memory lines, Amdahl bound, host-bound warnings.

Real SGLang 0.5.17 logs and `bench serve` documents recorded on the H200 (docs/results/live-h200-2026-12-02/)
where they exist; the stub of test_bench_serve for a server that runs fewer requests than were sent.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
from test_bench_serve import Stub

from sglang_indexcache.bench import serve_analysis, serve_log, serve_report, serve_run
from sglang_indexcache.cli import main

LIVE = Path(__file__).resolve().parents[1] / "docs" / "results" / "live-h200-2026-12-02"


def _log(name: str) -> str:
    return gzip.open(LIVE / f"server_{name}.log.gz", "rt").read()


def test_startup_lines_of_real_logs():
    stock = serve_log.startup(_log("stock-all-F"))
    assert stock["max_total_num_tokens"] == stock["kv_tokens"] == 11386816
    assert stock["kv_size_gb"] == 108.93 and stock["kv_dtype"] == "torch.bfloat16"
    assert (stock["avail_before_load_gb"], stock["avail_after_load_gb"], stock["weights_gb"]) == (139.09, 136.77, 2.32)
    assert stock["mem_fraction_static"] == 0.8 and stock["chunked_prefill_size"] == 16384
    assert stock["max_running_requests"] == 16 and stock["index_cache"] is None
    # 8 layers x (576 bf16 + 132 index-K bytes) per token: the KV size SGLang logs, in GiB
    assert stock["kv_size_gb"] == pytest.approx(11386816 * 8 * (1152 + 132) / 2**30, abs=0.01)
    calibration = serve_log.startup(_log("calibration"))
    assert calibration["max_total_num_tokens"] == 65536 and calibration["mem_fraction_static"] == 0.6
    assert calibration["index_cache"].startswith("FFFFFFFF (8/8 indexers kept")
    assert serve_log.startup("no sglang here")["max_total_num_tokens"] is None


def test_running_count_reached_real_log():
    text = _log("stock-all-F")
    asked8 = serve_log.summarize(text, 8)
    assert asked8["running_reached"] == 8 and asked8["steady_lines"] == 31 and "note" not in asked8
    assert asked8["step_ms_median"] == pytest.approx(1e3 * 8 / asked8["tok_s_median"])
    # SGLang 0.5.17 ran 31 of 32 (--max-running-requests 32): the same lines at #running-req 31
    text31 = text.replace("Decode batch, #running-req: 8,", "Decode batch, #running-req: 31,")
    capped = serve_log.summarize(text31, 32)
    assert capped["running_reached"] == 31 and capped["running_asked"] == 32
    assert capped["tok_s_median"] == asked8["tok_s_median"] and capped["steady_lines"] == 31
    assert capped["note"] == "SGLang ran at most 31 of the 32 requests at once"
    assert 0 < capped["spread"] < 0.1
    crowd = serve_log.concurrency(text)
    assert crowd["max_running"] == 8 and crowd["max_queue"] == 7 and crowd["retractions"] == 0


def test_retractions_counted():
    line = ("[2026-12-04 10:00:00] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained:"
            " 4096, #new_token_ratio: 0.7000 -> 1.0000")
    crowd = serve_log.concurrency("\n".join([line, line.replace("#retracted_reqs: 2", "#retracted_reqs: 1")]))
    assert crowd["retractions"] == 2 and crowd["retracted_requests"] == 3 and crowd["max_running"] is None


def test_capped_batch_is_reported_not_dashed(tmp_path, capsys):
    """The server runs 3 of the 4 requests sent at once: the table gives its tok/s at 3, never '–'."""
    log_path = tmp_path / "server.log"
    log_path.write_text("")
    with Stub(itl_s=0.01, log_path=log_path, max_running=3) as stub:
        rc = main(["--quiet", "bench", "serve", "--url", stub.url, "--tag", "capped", "--lengths", "256",
                   "--prefill-repeats", "1", "--decode-batch", "4,2", "--decode-length", "128", "--decode-tokens", "40",
                   "--warmup-length", "32", "--pattern", "FSSS", "--server-log", str(log_path), "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "serve_capped.json").read_text())
    assert doc["format"] == serve_run.FORMAT and doc["settings"]["pattern"] == "FSSS"
    assert [(d["batch"], d["length"]) for d in doc["decode"]] == [(4, 128), (2, 128)]
    first = doc["decode"][0]["server_log"]
    assert first["running_reached"] == 3 and first["note"] == "SGLang ran at most 3 of the 4 requests at once"
    assert first["tok_s_median"] == pytest.approx(3 / 0.01)
    assert doc["decode"][1]["server_log"]["running_reached"] == 2
    assert main(["bench", "serve-report", str(tmp_path), "--baseline", "capped"]) == 0
    text = capsys.readouterr().out
    assert "| requests running at once (server log) | 3 (of 4 sent) |" in text
    assert "### Decode: 2 concurrent requests of 128 tokens" in text
    row = next(line for line in text.splitlines() if line.startswith("| server log tok/s"))
    assert "–" not in row and float(row.split("|")[2]) == pytest.approx(300.0, rel=0.01)


def test_recorded_v1_documents_warn_host_bound():
    docs = serve_report.load([LIVE])
    assert all(d["format"] == serve_run.FORMAT for d in docs.values())
    assert docs["stock-all-F"]["decode"][0]["server_log"]["step_ms_median"] == pytest.approx(1e3 * 8 / 3780.43)
    assert serve_analysis.pattern_of(docs["stock-FSSSFSSS"]) == "FSSSFSSS"  # the stock override
    assert serve_analysis.pattern_of(docs["patched-every-4"]) == "FSSSFSSS"  # /server_info
    assert serve_analysis.pattern_of(docs["stock-all-F"]) is None  # nothing said it
    text = serve_report.markdown(docs, "stock-all-F")
    for tag in ("stock-all-F", "patched-every-4", "stock-FSSSFSSS", "patched-calibrated-FSSSSSSS"):
        assert f"- {tag}, decode 8 x 200,000: " in text and "below 3.0 ms" in text
    assert "the step does not shrink as indexers are removed" in text


def _doc(tag, pattern, step_ms, batch=8, length=200_000, spread=0.01, lost=0):
    tok_s = 1e3 * batch / step_ms
    return {"format": serve_run.FORMAT, "tag": tag, "date": "2026-12-04", "device": "test", "server": {},
            "settings": {"pattern": pattern, "lengths": [], "prefill_repeats": []}, "prefill": [],
            "lost": {"requests": batch, "lost": lost, "cached_hits": 0},
            "decode": [{"batch": batch, "length": length, "lost": lost, "client": {"tok_s": None, "itl_median_s": None},
                        "server_log": {"running_reached": batch, "tok_s_median": tok_s, "step_ms_median": step_ms,
                                       "spread": spread}}]}


def test_indexer_cost_and_amdahl_bound():
    f32, e4, e8 = "F" * 32, "FSSS" * 8, "FSSSSSSS" * 4
    docs = {"all-F": _doc("all-F", f32, 8.23), "every-4": _doc("every-4", e4, 5.94),
            "patched-every-4": _doc("patched-every-4", e4, 5.93), "every-8": _doc("every-8", e8, 5.60)}
    fit = serve_analysis.indexer_cost(docs, (8, 200_000))
    assert fit["all_f_measured"] and fit["layers"] == 32 and fit["all_f_step_ms"] == 8.23
    assert 0.090 < fit["cost_ms"] < 0.100  # ~95 µs per indexer, the 2026-12-04 figure
    rows = {r["tag"]: r for r in serve_analysis.bounds(docs, (8, 200_000))}
    assert rows["every-4"]["speedup"] == pytest.approx(8.23 / 5.94)
    assert rows["every-8"]["bound"] == pytest.approx(8.23 / (8.23 - 28 * fit["cost_ms"]))
    assert rows["all-F"]["bound"] == pytest.approx(1.0)
    assert serve_analysis.warnings(docs, "all-F") == []
    # without all-F: extrapolated from the fit of every-4 and every-8
    partial = {k: docs[k] for k in ("every-4", "every-8")}
    fit2 = serve_analysis.indexer_cost(partial, (8, 200_000))
    assert not fit2["all_f_measured"]
    assert fit2["all_f_step_ms"] == pytest.approx(5.60 + 28 * fit2["cost_ms"])
    assert serve_analysis.indexer_cost({"every-4": docs["every-4"]}, (8, 200_000)) is None
    text = serve_report.markdown(docs, "all-F")
    assert "each indexer costs **" in text and "| every-8 | 4/32 | 5.60 | 1.47x |" in text


def test_spread_larger_than_effect_warns():
    docs = {"all-F": _doc("all-F", "F" * 8, 4.0, spread=0.05), "every-4": _doc("every-4", "FSSSFSSS", 3.9, spread=0.08)}
    (warning,) = serve_analysis.warnings(docs, "all-F")
    assert "every-4, decode 8 x 200,000: the spread of the steps (8.0%)" in warning and "(2.6%)" in warning
    quiet = copy.deepcopy(docs)
    for doc in quiet.values():
        doc["decode"][0]["server_log"]["spread"] = 0.01
    assert serve_analysis.warnings(quiet, "all-F") == []


def test_merge_parts_of_one_server(tmp_path):
    with Stub(itl_s=0.005) as stub:
        client = serve_run.Client(stub.url, timeout_s=10)
        a = serve_run.run(serve_run.ServeSpec(tag="s", lengths=[128, 256], prefill_repeats=[2, 1], decodes=[],
                                              warmup_length=16), client)
        b = serve_run.run(serve_run.ServeSpec(tag="s", lengths=[], decodes=[(2, 64)], decode_tokens=4,
                                              warmup_length=16, first_offset=4, pattern="FS"), client)
        clash = serve_run.run(serve_run.ServeSpec(tag="s", lengths=[128], prefill_repeats=1, decodes=[],
                                                  warmup_length=16, first_offset=3), client)
    merged = serve_run.merge([a, b])
    assert merged["settings"]["lengths"] == [128, 256] and merged["settings"]["prefill_repeats"] == [2, 1]
    assert merged["settings"]["decodes"] == [[2, 64]] and merged["settings"]["pattern"] == "FS"
    assert merged["lost"]["requests"] == 4 + 3 and merged["lost"]["lost"] == 0
    with pytest.raises(AssertionError, match="same token"):
        serve_run.merge([a, clash])  # offset 3 reuses the first token of a's fourth prompt
