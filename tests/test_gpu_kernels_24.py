"""Issue 24's one GPU call on a CPU: ``scripts/gpu_kernels_24.sh`` in its smoke mode (the same steps,
Triton's interpreter, toy sizes, PyTorch stand-ins for SGLang's kernels), its time guard, and the
report generator (``scripts/kernel_compare_report.py``) that turns the run's JSON into docs/perf.md's
tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL = ROOT / "scripts" / "gpu_kernels_24.sh"
sys.path.insert(0, str(ROOT / "scripts"))

import kernel_compare_report as rep  # noqa: E402


def _run(out: Path, **env):
    full = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SHELL)], capture_output=True, text=True, env=full, timeout=900, cwd=ROOT)


@pytest.mark.interpreter
def test_smoke_writes_every_file_and_the_report_reads_them(tmp_path):
    result = _run(tmp_path, BUDGET_S="900", SMOKE_ONLY="mla_decode")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    large = json.loads((tmp_path / "large_checks.json").read_text())
    compare = json.loads((tmp_path / "kernel_compare.json").read_text())
    assert large["ok"] and [c["kind"] for c in large["cases"]] == ["topk", "prefill"]
    assert [c["kind"] for c in compare["cases"]] == ["mla_decode"] and compare["cases"][0]["status"] == "ok"
    report = (tmp_path / "report.md").read_text()
    ours = compare["cases"][0]["impls"]["ours"]
    assert f"{ours['ms']:.3f} ({ours['p10']:.3f}–{ours['p90']:.3f})" in report   # numbers from the JSON
    assert "| 40 x 600 | sampled | 1.0 / 1.0 |" in report
    assert "large checks exit 0" in (tmp_path / "log.txt").read_text()


def test_time_guard_skips_what_does_not_fit(tmp_path):
    """With no time left after the checks, the comparison is not started and the call fails."""
    result = _run(tmp_path, BUDGET_S="28")
    assert result.returncode != 0
    assert "no time left for the comparison" in result.stdout
    assert not (tmp_path / "kernel_compare.json").exists()


def _case(kind, params, ratio_name, ratio, extra_impls=()):
    impls = {"sglang": {"ms": 10.0, "p10": 9.5, "p90": 10.5, "n": 5, "of_floor": 0.5},
             ratio_name: {"ms": 10.0 * ratio, "p10": 9.0 * ratio, "p90": 11.0 * ratio, "n": 5, "of_floor": 0.4}}
    impls.update({name: {"ms": ms, "p10": ms, "p90": ms, "n": 5} for name, ms in extra_impls})
    checks = {"time_ratio_ours_over_sglang": {ratio_name: ratio},
              "overlap ours fp8 vs sglang": {"mean": 0.99991, "min": 0.998, "rows_identical": 0.9, "rows": 8},
              "sglang vs exact fp8": {"recall": 0.9995, "within_tol": 1.0}}
    return {"id": f"{kind} " + "-".join(map(str, params.values())), "kind": kind, "params": params, "impls": impls, "checks": checks,
            "status": "ok"}


def test_report_targets_met_and_missed_with_the_measured_split():
    stages = [("ours fp8 q+k: scores only", 7.25), ("sglang: logits only", 5.5),
              ("ours sampled top-k only (on sglang's logits)", 4.0), ("sglang: top-k only", 2.5)]
    doc = {"versions": {"device": "H200", "torch": "2.11", "triton": "3.6"}, "date": "d", "sglang_side": "real",
           "ceilings": {"bf16_tflops": 759, "fp8_tflops": 1394, "copy_gbps": 4200}, "skipped": [],
           "cases": [_case("indexer_prefill", {"keys": 200000, "heads": 64}, "ours fp8 q+k", 1.30, stages),
                     _case("indexer_prefill", {"keys": 65536, "heads": 32}, "ours fp8 q+k", 1.20),
                     _case("indexer_prefill", {"keys": 32768, "heads": 32}, "ours fp8 q+k", 3.0),   # no target
                     _case("mla_decode", {"rows": 64}, "ours", 1.5),
                     _case("mla_decode", {"rows": 16}, "ours", 0.8),
                     {"id": "x", "kind": "mla_decode", "status": "failed", "error": "boom"}]}
    text = rep.report(doc)
    assert "| 10.000 (9.500–10.500) | 13.000 (11.700–14.300) |" in text and "1.30x" in text and "50% / 40%" in text
    assert "0.9999 / 0.9980" in text
    lines = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert "**missed**" in lines["- indexer_prefill 200000-64"]
    assert "scores: ours fp8 7.250 ms vs DeepGEMM logits 5.500 ms" in lines["- indexer_prefill 200000-64"]
    assert "top-k" not in lines["- indexer_prefill 65536-32"] and \
        "— met" in lines["- indexer_prefill 65536-32"]
    assert "- indexer_prefill 32768-32" not in lines
    assert "**missed**" in lines["- mla_decode 64"] and "— met" in lines["- mla_decode 16"]
    assert "Failed cases: x: boom" in text


def test_report_of_an_unreadable_file_exits_2(tmp_path, capsys):
    assert rep.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
