"""The live runner's plumbing on the CPU: queue, deadline, state across calls, detached servers, packing.

Everything scripts/gpu_live.py imports on the GPU host is imported here. The device time runs on a
fake clock (each phase and server start takes its estimate; tests/live_harness.py); the servers are
real processes of tests/live_stub_server.py, which speaks SGLang's HTTP and log formats with made-up
numbers. So the phases' own code (bench serve parts, memory, saturation, chunked-prefill comparison,
report) runs end to end at toy sizes; what they measure on the GPU is not tested here. The issue-23
plan's run: tests/test_live_calibration.py; the pure parts: tests/test_live_memory_chunked.py.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_live  # noqa: E402
from live import (calsearch, capacity, checks, chunked, host, measure, memory, plans, report,  # noqa: E402,F401
                  runner, servers)
from live_harness import BUDGET, RESERVE, Harness  # noqa: E402

from sglang_indexcache.bench import serve_run  # noqa: E402


@pytest.fixture
def toy(monkeypatch):
    """The issue-21 plan at toy sizes (prompts of hundreds of tokens, 24 decode steps)."""
    monkeypatch.setitem(measure.PARTS, "prefill", ([256, 512], [2, 1], []))
    monkeypatch.setitem(measure.PARTS, "decode-8x200k", ([], [], [(8, 1024)]))
    monkeypatch.setitem(measure.PARTS, "decode-32x32k", ([], [], [(32, 256)]))
    monkeypatch.setitem(measure.PARTS, "prefill-deep", ([256], [1], []))
    monkeypatch.setattr(measure, "DECODE_TOKENS", 24)
    monkeypatch.setattr(serve_run, "LOG_SETTLE_S", 0.1)
    monkeypatch.setattr(chunked, "PROMPT_TOKENS", 3000)
    # saturation at its real prompt lengths (the stub's requests cost little): a pool of toy size would
    # make the freed indexer weights, a fixed ~0.4 GiB, dwarf it
    monkeypatch.setitem(measure.SATURATION, "new_tokens", 16)
    chunk = measure.BENCH_ARGS.index("--chunked-prefill-size") + 1  # the bench servers chunk the toy prompt
    monkeypatch.setattr(measure, "BENCH_ARGS", [*measure.BENCH_ARGS[:chunk], "1024", *measure.BENCH_ARGS[chunk + 1:]])


def test_issue21_plan_end_to_end(tmp_path, monkeypatch, toy):
    calibrated = tmp_path / "calibrated-l32.json"  # as a calibration phase on the host would leave it
    calibrated.write_text(json.dumps({"pattern": "F" + "S" * 5 + "F" + "S" * 25}))
    monkeypatch.setattr(host, "CALIBRATED_L32", calibrated)
    harness = Harness(tmp_path, monkeypatch)
    try:
        results = [harness.call() for _ in range(8)]
        rcs = [rc for rc, _ in results]
        while rcs[-1] == 3 and len(rcs) < 12:
            results.append(harness.call())
            rcs.append(results[-1][0])
    finally:
        harness.stop()
    assert rcs[-1] == 0 and set(rcs[:-1]) <= {3, 0} and 3 in rcs, rcs
    state = harness.state()
    phases = state["phases"]
    assert all(entry["status"] == "done" for entry in phases.values()), {n: e.get("error") for n, e in phases.items()}
    failed = [c["name"] for e in phases.values() for c in e.get("checks", []) if not c["ok"]]
    assert failed == []
    # the deadline: no call ran phases (and their server starts) beyond its budget
    for index in range(1, len(state["calls"]) + 1):
        spent = sum(e["seconds"] + e.get("server_start_s", 0) for e in phases.values() if e.get("call") == index)
        assert spent <= BUDGET - RESERVE
    # what the phases measured on the stub, read back from the results
    assert phases["stock-e4:decode-32x32k"]["result"]["serve"]["decode"][0]["server_log"]["running_reached"] == 31
    bf16 = phases["memory-bf16"]["result"]
    assert bf16["gain"] == pytest.approx(memory.expected_gain(32, 8, "bf16", bf16["stock_tokens"]), abs=0.001)
    assert bf16["gain"] > memory.expected_gain(32, 8, "bf16") + 0.002  # the freed indexer weights count
    stock, patched = (phases[f"{k}-e4-fp8:saturation"]["result"] for k in ("stock", "patched"))
    assert (stock["max_running"], patched["max_running"], stock["lost"], patched["lost"]) == (3, 4, 0, 0)
    assert stock["length"] == patched["length"] and stock["plan"]["stock_holds"] == 3
    assert phases["chunk-compare"]["result"]["control"]["mean_abs"] > 0.01
    calibrated_doc = phases["patched-calibrated:decode-8x200k"]["result"]["serve"]
    assert calibrated_doc["server"]["index_cache"]["pattern"].count("F") == 2
    # what comes back: four files, the last call's summary covering every call
    rc, out = results[-1]
    assert sorted(p.name for p in out.iterdir()) == ["arrays.json", "live.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["phases"]) == set(phases) and "_logprobs" not in json.dumps(summary)
    assert "_logprobs" in (out / "arrays.json").read_text()
    with tarfile.open(out / "live.tar.gz") as archive:
        names = archive.getnames()
    assert "live/servers/server_stock-e4.log" in names and "live/serve/serve_stock-e4.json" in names
    text = (out / "summary.md").read_text()
    assert text == report.markdown(report.load(out))
    assert bf16["gain_equal_bytes"] == pytest.approx(memory.expected_gain(32, 8, "bf16"), abs=0.001)
    for expected in ("## 32 layers, live server", "31 (of 32 sent)", "each indexer costs", "| fp8 | 32 (8) |",
                     "| stock-e4-fp8 |", "## Chunked prefill", "| stock-e4 | stock | 1024 | every-4 |",
                     "| 0 / 0.0001 / 0 | pass: mean abs diff 3.", "## 78 layers (SGLang dummy weights: every layer alike), live server",
                     "| patched-calibrated | 2/32 |"):
        assert expected in text, expected


def _plan(names_servers, estimate=50.0):
    """Phases named NAME on the given server specs (None: no server), each taking ``estimate`` s."""
    phases = []
    for name, spec, needs in names_servers:
        def run(ctx, name=name):
            if name.startswith("boom"):
                raise RuntimeError("boom")
            server = ctx.state.data["server"]
            return {"headline": f"ran {name}", "server_pid": server and server["pid"]}
        phases.append(runner.Phase(name, run, estimate, server=spec, needs=needs))
    return phases


def _spec(key):
    return measure.bench_server(key, "stock", "F" * 4, checkpoint="plain", batch=8)


def test_queue_deadline_detached_server_and_failures(tmp_path, monkeypatch):
    a, b, broken = _spec("a"), _spec("b"), _spec("broken")
    plan = _plan([("a1", a, ()), ("a2", a, ()), ("a3", a, ()), ("boom", None, ()), ("after-boom", None, ("boom",)),
                  ("never-starts", broken, ()), ("b1", b, ()), ("b2", b, ())], estimate=150.0)
    harness = Harness(tmp_path, monkeypatch, extra_phases=plan)
    harness.fail_start.add("broken")
    try:
        rc1, _ = harness.call()  # setup 38 + start 240 + a1 150 = 428; a2 (150) does not fit in 545
        state = harness.state()
        assert rc1 == 3 and [p for p, e in state["phases"].items() if e["status"] == "done"] == ["setup", "a1"]
        kept = state["server"]
        assert kept["key"] == "a" and os.path.exists(f"/proc/{kept['pid']}")  # left up for a2
        assert "a2 needs ~" in state["calls"][0]["note"]
        rc2, _ = harness.call()
        state = harness.state()
        assert state["phases"]["a2"]["server_start_s"] == 0.0  # adopted, not restarted
        assert state["phases"]["a2"]["result"]["server_pid"] == kept["pid"]
        assert harness.launches.count("a") == 1
        assert state["phases"]["boom"]["status"] == "failed" and "boom" in state["phases"]["boom"]["error"]
        assert state["phases"]["after-boom"]["status"] == "blocked"
        assert state["phases"]["never-starts"]["status"] == "failed"
        assert "exited before /health" in state["phases"]["never-starts"]["error"]
        assert not os.path.exists(f"/proc/{kept['pid']}/cmdline") or _zombie(kept["pid"])  # a stopped for boom
        # b1: 70 s start + 150 s; the call then launches b for b2 if its start still fits
        calls = [harness.call() for _ in range(3)]
        state = harness.state()
        assert [rc for rc, _ in calls][-1] == 1  # queue empty, with failures
        assert state["phases"]["b2"]["status"] == "done"
        assert harness.launches.count("b") == 1  # launched once: kept across calls or prewarmed
        # --retry runs a failed phase again; --resume-from seeds a fresh machine's state
        harness.fail_start.clear()
        rc, out = harness.call("--retry", "never-starts")
        assert harness.state()["phases"]["never-starts"]["status"] == "done"
        (tmp_path / "fresh").mkdir()
        fresh = Harness(tmp_path / "fresh", monkeypatch, extra_phases=plan)
        rc, _ = fresh.call("--resume-from", str(out))
        seeded = fresh.state()["phases"]
        assert seeded["a1"].get("seeded") and seeded["setup"]["status"] == "done" and not seeded["setup"].get("seeded")
        fresh.stop()
    finally:
        harness.stop()


def test_interrupted_phase_runs_again_with_a_longer_estimate(tmp_path, monkeypatch):
    plan = _plan([("x1", None, ()), ("x2", None, ())], estimate=100.0)
    harness = Harness(tmp_path, monkeypatch, extra_phases=plan)
    harness.call(budget=300)  # setup 38 + x1 100 + x2 100 fit in 285
    data = harness.state()
    data["phases"]["x2"]["status"] = "running"  # as if the call had been killed while x2 ran
    harness.state_path.write_text(json.dumps(data))
    rc, _ = harness.call(budget=200)  # x2 now estimated 2 x 100: does not fit in 185
    state = harness.state()
    assert rc == 3 and state["phases"]["x2"]["interrupted"] == 1 and state["durations"]["x2"][-1] == 200
    assert "x2 needs ~220 s" in state["calls"][-1]["note"]
    rc, _ = harness.call(budget=300)
    assert rc == 0 and harness.state()["phases"]["x2"]["status"] == "done"
    data = harness.state()
    data["phases"]["x2"].update(status="running", interrupted=1)
    harness.state_path.write_text(json.dumps(data))
    rc, _ = harness.call(budget=300)
    assert rc == 1 and harness.state()["phases"]["x2"]["status"] == "failed"  # interrupted twice


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_list_and_bad_input(tmp_path, capsys):
    assert gpu_live.main(["--plan", "issue21", "--list", "--state", str(tmp_path / "s.json")]) == 0
    listing = capsys.readouterr().out
    assert "stock-e4:prefill" in listing and "chunk-compare" in listing and " 240 " in listing
    with pytest.raises(SystemExit) as exc:
        gpu_live.main(["--plan", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip() == "gpu_live: error: unknown plan 'nope'; choose from" \
        f" {', '.join(plans.PLANS)}"
    with pytest.raises(SystemExit) as exc:
        gpu_live.main(["--plan", "issue21"])
    assert exc.value.code == 2 and "--out is required" in capsys.readouterr().err


def test_every_plan_builds():
    for name in plans.PLANS:
        phases = plans.build([name])
        assert phases[0].name == "setup" and len({p.name for p in phases}) == len(phases)
        for phase in phases:
            if phase.server is not None:
                assert phase.server.checkpoint in phases[0].checkpoints


def test_runner_imports_no_torch():
    """The runner runs on the GPU host with plain python3: no torch, numpy or SGLang in its process."""
    import subprocess

    code = ("import runpy, sys; runpy.run_path(sys.argv[1]);"
            " import live.calsearch, live.capacity, live.checks, live.chunked, live.host, live.measure, live.memory,"
            " live.plans, live.report, live.runner, live.servers;"
            " print([m for m in ('torch', 'numpy', 'sglang', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "gpu_live.py")], capture_output=True,
                         text=True, check=True, cwd="/")
    assert out.stdout.strip().splitlines()[-1] == "[]"
