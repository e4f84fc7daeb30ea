"""The live runner's ``issue23`` plan (scripts/live/calsearch.py: calibration through the server) on the
CPU, and the cost model that turns its JSON into docs/perf.md (scripts/calibration_timing_model.py).

The runner walks the plan as on the GPU host, on a fake clock (tests/live_harness.py). Its servers
are tests/live_stub_server.py with ``--stub-model``: a micro GlmMoeDsa model answers ``/generate``
with real prompt log-probabilities under the switched pattern, so ``indexcache calibrate --url`` runs
its real search through the runner's server, client and host commands (on this checkout instead of
the laid-out package). SGLang itself cannot run a forward on a CPU: what the phases measure on the
GPU is not tested here, only that every phase runs end to end and writes what the report reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import GlmMoeDsaForCausalLM

from dsa_models import micro_config, save_micro_checkpoint
from live_harness import Harness
from sglang_indexcache.model_info import load_model_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import calibration_timing_model as cost  # noqa: E402
import gpu_live  # noqa: E402
import topk_capture_bench  # noqa: E402
from live import calsearch, host, plans  # noqa: E402

CHECKPOINTS = {  # the plan's checkpoints at micro sizes (same names: the plan's phases and servers)
    "l78-indexers": ["--hidden", "256", "--layers", "4", "--flavour", "plain", "--weights", "indexer"],
    "plain": ["--hidden", "64", "--layers", "5", "--flavour", "plain"],
}


def _local_run(cmd, tree="patched", timeout=900, **kw):
    """host.run on this checkout: no bundle, no laid-out package."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def micro(monkeypatch, tmp_path):
    """The issue-23 plan at micro sizes, its checkpoints written, stub servers with models behind them."""
    for name, args in CHECKPOINTS.items():
        monkeypatch.setitem(host.CHECKPOINTS, name, args)
    # 0.5 s per request: an evaluation (8 requests; 2 deep with 4 in flight) takes >= 1 s, and each
    # timing search (8 evaluations) outlasts the 3 s it is given
    monkeypatch.setattr(calsearch, "TIMING", dict(calsearch.TIMING, seq_len=32, tokens=16 * 32, batch_size=2,
                                                  search_s=3))
    monkeypatch.setattr(calsearch, "COMPARE", dict(calsearch.COMPARE, checkpoints=("plain",), seq_len=24,
                                                   tokens=4 * 24, batch_size=1, in_flight=3))
    monkeypatch.setattr(host, "run", _local_run)
    monkeypatch.setattr(host, "DEVICE", "cpu")
    harness = Harness(tmp_path, monkeypatch)
    checks = []
    ctx = SimpleNamespace(work=tmp_path, log=print, check=lambda name, ok, detail="": checks.append((name, ok)) or ok)
    shutil.rmtree(host.CK / "l78-indexers")
    assert host.checkpoint(ctx, "l78-indexers")["bytes"] > 0 and all(ok for _, ok in checks), checks
    shutil.rmtree(host.CK / "plain")
    save_micro_checkpoint(host.CK / "plain", layers=5, topk=4, seed=3)
    vocab = json.loads((host.CK / "l78-indexers" / "config.json").read_text())["vocab_size"]  # the tokenizer's
    GlmMoeDsaForCausalLM(micro_config(4, 4, vocab=vocab)).save_pretrained(tmp_path / "stub-l78")
    harness.stub_args = {"l78-indexers": ["--stub-model", tmp_path / "stub-l78", "--stub-delay", "0.5"],
                         "plain": ["--stub-model", host.CK / "plain"]}
    yield harness
    harness.stop()


def test_issue23_plan_end_to_end(micro):
    # 400 s: the first call (the fresh machine's server start: 240 s) ends after the plain search, its
    # server left up; the second adopts it for the in-flight search, stops it for the capture, and
    # starts the comparison's
    results = [micro.call(plan="issue23", budget=400)]
    while results[-1][0] == 3 and len(results) < 4:
        results.append(micro.call(plan="issue23", budget=400))
    rcs = [rc for rc, _ in results]
    phases = micro.state()["phases"]
    assert rcs == [3, 0], (rcs, {n: e.get("error") for n, e in phases.items()})
    assert [phases[n]["call"] for n in ("cal-l4:plain", "cal-l4:in-flight", "cal-5:compare")] == [1, 2, 2]
    assert phases["cal-l4:in-flight"]["server_start_s"] == 0.0 and micro.launches == ["cal-l4", "cal-5"]
    assert list(phases) == ["setup", "cal-l4:probes", "cal-l4:plain", "cal-l4:in-flight", "topk-capture",
                            "calibration-timing", "cal-5:compare", "calibration-compare"]
    failed = [c for e in phases.values() for c in e.get("checks", []) if not c["ok"]]
    assert not failed, failed
    out = results[-1][1]
    assert sorted(p.name for p in out.iterdir()) == ["arrays.json", "calibration_compare.json",
                                                     "calibration_timing.json", "live.tar.gz", "summary.json",
                                                     "summary.md"]
    timing = json.loads((out / "calibration_timing.json").read_text())
    setup = timing["setup"]
    assert (setup["layers"], setup["hidden"], setup["tokens"], setup["batch_size"]) == (4, 256, 512, 2)
    assert sorted(load_model_info(setup["path"]).layers_with_indexer) == [0, 1, 2, 3]  # what calibrate --url reads
    probes = timing["probes"]
    assert probes["tokens"] == 64 and len(probes["switch"]) == 6 and probes["forward_only_s"] >= 0.5
    for name in ("plain", "in_flight"):  # stopped by --max-seconds, with the candidates scored so far
        run = timing["runs"][name]
        assert not run["finished"] and run["baseline_loss"] > 0 and run["server_timings"]["requests"] >= 8
    assert timing["agree"]["same"] and timing["agree"]["common"] >= 1
    assert timing["capture"]["layers"] == 4 and timing["capture"]["seconds"] >= 0 and timing["device"] == "cpu"
    assert timing["command"] == calsearch.COMMAND and timing["phase_s"] > 0
    text = cost.report(timing)
    assert "| plain (`--in-flight 1`) |" in text and "GLM-5, TP 8" in text and calsearch.COMMAND in text
    assert cost.main([str(out / "calibration_timing.json")]) == 0
    compare = json.loads((out / "calibration_compare.json").read_text())
    five = compare["models"]["5"]
    assert five["same_flips"] and five["patterns"][0] == five["patterns"][1]
    # 4 + 3 + 2 + 1 candidates and the baseline, scored the same bit for bit by both runs
    assert five["candidates_compared"] == 11 and five["max_abs_loss_diff"] == 0.0
    assert five["smallest_margin"] > 0 and len(five["removed"][0]) == 4
    assert compare["setup"]["hidden"] == 64 and phases["calibration-compare"]["result"]["same_flips"] == ["5"]


def test_plan_lists_its_phases(tmp_path, capsys):
    assert "issue23" in plans.PLANS
    assert gpu_live.main(["--plan", "issue23", "--list", "--state", str(tmp_path / "s.json")]) == 0
    rows = capsys.readouterr().out.splitlines()
    names = [row.split()[0] for row in rows[1:]]
    assert names == ["setup", "cal-l78:probes", "cal-l78:plain", "cal-l78:in-flight", "topk-capture",
                     "calibration-timing", "cal-8:compare", "cal-16:compare", "calibration-compare"]
    setup = plans.build(["issue23"])[0]
    assert set(setup.checkpoints) == {"l78-indexers", "plain", "l16"}
    assert "--load-format" in next(p for p in plans.build(["issue23"]) if p.name == "cal-l78:plain").server.args


def test_search_shape_and_prefix_reuse():
    shape = cost.search_shape(78, 0.25)
    assert (shape["steps"], shape["candidates"], shape["evaluations"]) == (58, 2813, 2815)
    reuse = cost.prefix_reuse(12, 0.25)  # the embedded model's measured search: 0.44 (docs/quality.md)
    assert 0.3 < reuse["min"] <= reuse["mean"] <= reuse["max"] < 0.6
    assert cost.prefix_reuse(78, 0.25, seeds=(0,))["mean"] < reuse["mean"]  # deeper: more to reuse


def test_model_cli_refuses_a_missing_file(tmp_path, capsys):
    assert cost.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_capture_bench_refuses_bad_sizes(capsys):
    assert topk_capture_bench.main(["64", "zero"]) == 2 and topk_capture_bench.main(["64"]) == 2
    assert topk_capture_bench.main(["64", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("topk_capture_bench: error: expected TOKENS LAYERS") for line in err)
