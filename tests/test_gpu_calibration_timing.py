"""scripts/gpu_calibration_timing.py (the GPU phases of issue 23) and calibration_timing_model.py on
the CPU: each phase's whole plumbing against the stand-in server (SGLang cannot run a forward on a
CPU), and the cost model that turns the phase's JSON into docs/perf.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GlmMoeDsaForCausalLM

from dsa_models import micro_config, save_micro_checkpoint
from fake_sglang import StubServer
from sglang_indexcache.calibration.backend import TransformersBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import calibration_timing_model as cost  # noqa: E402
import gpu_calibration_timing as phase  # noqa: E402

live = phase.live


@pytest.fixture
def local_live(monkeypatch, tmp_path):
    """The live machinery runs our package from this checkout, servers are stand-ins."""
    def run(cmd, tree="patched", timeout=600, **kw):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)

    monkeypatch.setattr(live, "run", run)
    monkeypatch.setattr(live, "indexcache", lambda *args, tree="patched", timeout=900:
                        run([sys.executable, "-m", "sglang_indexcache", "--quiet", *args], timeout=timeout))
    monkeypatch.setattr(live, "CK", tmp_path / "ck")
    monkeypatch.setattr(live, "KEY", "secret")
    monkeypatch.setattr(live, "RESULTS", {"checks": [], "servers": {}})
    servers = []

    def starter(make_backend, delay_s=0.0):
        def start(work, tag, model, args):
            server = StubServer(make_backend(model), delay_s)
            monkeypatch.setattr(live, "URL", server.url)
            servers.append(server)
            return server
        return start

    yield starter
    for server in servers:
        server.stop()


def failed_checks():
    return [c for c in live.RESULTS["checks"] if not c["ok"]]


def test_timing_phase_plumbing(local_live, tmp_path):
    # 0.5 s per request: each evaluation (8 requests; 2 deep with 4 in flight) takes >= 1 s, and the
    # whole search (8 evaluations) outlasts the 3 s given to each run
    cfg = dict(phase.TIMING, layers=4, hidden=256, seq_len=32, tokens=16 * 32, batch_size=2, min_run_s=3)
    vocab = json.loads((phase.DATA.parent / "config.json").read_text())["vocab_size"]  # the tokenizer's

    def backend(model):
        return TransformersBackend(GlmMoeDsaForCausalLM(micro_config(cfg["layers"], 4, vocab=vocab)).eval())

    result = phase.timing(tmp_path / "work", budget_s=1, cfg=cfg, start=local_live(backend, delay_s=0.5))
    assert not failed_checks(), failed_checks()
    setup = result["setup"]
    assert setup["checkpoint"] in ("config-only", "indexer tensors only (this tree refused config-only)")
    ok = subprocess.run([sys.executable, "-m", "sglang_indexcache", "validate", "FFFF", "--model", setup["path"]])
    assert ok.returncode == 0  # what the server and calibrate --url read is usable either way
    probes = result["probes"]
    assert probes["tokens"] == 64 and len(probes["switch"]) == 6 and probes["forward_only_s"] >= 0.5
    for name in ("plain", "in_flight"):  # stopped by --max-seconds, with the candidates scored so far
        run = result["runs"][name]
        assert not run["finished"] and run["baseline_loss"] > 0 and run["server_timings"]["requests"] >= 8
    assert result["agree"]["same"] and result["agree"]["common"] >= 1
    assert result["capture"]["layers"] == 4 and result["capture"]["seconds"] >= 0
    assert json.loads((tmp_path / "work" / "timing" / "calibration_timing.json").read_text())["setup"] == setup
    assert result["device"] == "cpu"
    text = cost.report(result)
    assert "| plain (`--in-flight 1`) |" in text and "GLM-5, TP 8" in text


def test_compare_phase_plumbing(local_live, tmp_path):
    cfg = dict(phase.COMPARE, layers=(5,), seq_len=24, tokens=4 * 24, batch_size=1, in_flight=3)

    def make_model(work, name, layers, hidden):
        return save_micro_checkpoint(tmp_path / name, layers=layers, topk=4, seed=3)

    result = phase.compare(tmp_path / "work", budget_s=600, cfg=cfg,
                           start=local_live(TransformersBackend.from_pretrained), make_model=make_model)
    assert not failed_checks(), failed_checks()
    five = result["models"]["5"]
    assert five["same_flips"] and five["patterns"][0] == five["patterns"][1]
    # 4 + 3 + 2 + 1 candidates and the baseline, scored the same bit for bit by both runs
    assert five["candidates_compared"] == 11 and five["max_abs_loss_diff"] == 0.0
    assert five["smallest_margin"] > 0 and len(five["removed"][0]) == 4


def test_search_shape_and_prefix_reuse():
    shape = cost.search_shape(78, 0.25)
    assert (shape["steps"], shape["candidates"], shape["evaluations"]) == (58, 2813, 2815)
    reuse = cost.prefix_reuse(12, 0.25)  # the embedded model's measured search: 0.44 (docs/quality.md)
    assert 0.3 < reuse["min"] <= reuse["mean"] <= reuse["max"] < 0.6
    assert cost.prefix_reuse(78, 0.25, seeds=(0,))["mean"] < reuse["mean"]  # deeper: more to reuse


def test_model_cli_refuses_a_missing_file(tmp_path, capsys):
    assert cost.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_unknown_phase_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(phase.__file__)), "--phases", "bench", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--phases takes timing, compare" in proc.stderr
