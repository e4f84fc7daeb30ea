"""The live runner's ``issue22`` plan (scripts/live/stride.py: the decode stride) on the CPU.

The runner walks the plan as on the GPU host, on a fake clock (tests/live_harness.py), against
tests/live_stub_server.py: it switches its decode stride through ``POST /index_cache/stride`` (its
step time falls with the stride), logs SGLang's decode lines, and answers ``return_indexer_topk``
with a captured top-k that follows the reuse rule. So every phase runs end to end at toy sizes and
writes what the report reads; what the phases measure on the GPU is not tested here. The checker of
the captured top-k (``stride.structure``) is also tested on hand-made arrays, right and wrong.
"""

from __future__ import annotations

import sys
from array import array
from pathlib import Path

from live_harness import Harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from live import measure, report, stride  # noqa: E402

from sglang_indexcache.bench import serve_run  # noqa: E402

TARGETS = {  # the issue's targets: on the stub's made-up numbers they may pass or fail
    "every-4 + stride 4 decodes >= 1.6x as fast as stock all-F (8 x 200K)",
    "stride 1 (run-time, refresh graphs) within 3% of the server without a stride"}


def test_issue22_plan_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(measure.PARTS, "decode-8x200k", ([], [], [(8, 1024)]))
    monkeypatch.setattr(measure, "DECODE_TOKENS", 24)
    monkeypatch.setattr(serve_run, "LOG_SETTLE_S", 0.1)
    monkeypatch.setitem(stride.SWEEPS, "decode-8x200k-strides", (8, 1024, 0))
    monkeypatch.setitem(stride.SWEEPS, "decode-31x32k-strides", (31, 256, 8))
    monkeypatch.setattr(stride, "SWITCH_SECONDS", 2.0)
    monkeypatch.setattr(stride, "TOPK_PROMPT", 40)
    monkeypatch.setattr(stride, "TOPK_NEW", 13)
    monkeypatch.setattr(stride, "TOPK_K", 16)
    monkeypatch.setenv("STUB_TOPK", "16")
    harness = Harness(tmp_path, monkeypatch)
    try:
        rcs = [harness.call(plan="issue22")[0]]
        while rcs[-1] == 3 and len(rcs) < 8:
            rcs.append(harness.call(plan="issue22")[0])
    finally:
        harness.stop()
    assert rcs[-1] == 0, rcs
    phases = harness.state()["phases"]
    assert all(e["status"] == "done" for e in phases.values()), {n: e.get("error") for n, e in phases.items()}
    failed = [(n, c["name"], c["detail"][:200]) for n, e in phases.items() for c in e.get("checks", []) if not c["ok"]]
    assert {name for _, name, _ in failed} <= TARGETS, failed
    sweep = phases["i22-e4-stride4:decode-8x200k-strides"]["result"]
    assert [r["stride"] for r in sweep["strides"]] == list(stride.STRIDES) and sweep["running"] == 8
    steps = {r["stride"]: r["step_ms_median"] for r in sweep["strides"]}
    assert steps[8] < steps[1], steps  # the stub's step time falls with the stride
    assert phases["i22-e4-stride4:decode-31x32k-strides"]["result"]["running"] == 31
    assert phases["i22-topk-8:structure"]["result"]["stride2"]["problems"] == 0
    assert phases["i22-calibration-8:switches"]["result"]["lost"] == 0
    compare = phases["i22-compare"]["result"]
    assert [r["stride"] for r in compare["rows"]] == [1, 2, 4, 8] and compare["all_f_ms"]
    text = report.markdown(harness.state())
    assert "## Decode stride (issue 22)" in text and "| stride | ms/step | vs stock all-F |" in text


def _captured(k, prompt, stride_, drop_best=False, own_s=False, break_tail=False):
    """``[tokens, 2 layers (F, S), k]`` flat: refreshes at the first decode step and every ``stride_``."""
    values, fresh = array("i"), None
    for t in range(prompt + 9):
        d = (t - prompt) % stride_ if t >= prompt else 0
        if d == 0:
            fresh = list(dict.fromkeys((t * 7 + i) % (t + 1) for i in range(k)))  # best first
            fresh = (fresh + [x for x in range(t + 1) if x not in fresh] + [-1] * k)[:k]
            row = fresh
        else:
            kept = fresh[d:k] if drop_best else fresh[:k - d]
            tail = list(range(t - d + 1, t + 1))
            row = kept + (tail[::-1] if break_tail and d == 2 else tail)
        values.extend(row)
        values.extend([x + 1 for x in row] if own_s else row)
    return values


def test_topk_structure_finds_what_the_rule_forbids():
    """Dropping the best stored entries first, a tail that does not carry over, an S layer with its own
    set, a wrong stride: each is reported; the rule itself passes."""
    k, prompt = 6, 8
    assert stride.structure(_captured(k, prompt, 3), 2, k, prompt, 3, "FS") == []
    problems = stride.structure(_captured(k, prompt, 3, drop_best=True), 2, k, prompt, 3, "FS")
    assert any("refresh's best" in p for p in problems)
    assert any("carry over" in p for p in stride.structure(_captured(k, prompt, 3, break_tail=True), 2, k, prompt, 3,
                                                           "FS"))
    assert any("S layer 1" in p for p in stride.structure(_captured(k, prompt, 3, own_s=True), 2, k, prompt, 3, "FS"))
    assert stride.structure(_captured(k, prompt, 3), 2, k, prompt, 2, "FS"), "the wrong stride is noticed"
