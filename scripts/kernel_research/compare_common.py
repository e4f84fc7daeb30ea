"""Checks and records shared by the cases of ``scripts/gpu_kernel_compare.py``. Timing is
``bench.timing`` (``Bench.timed``: every call's CUDA-event time, L2 flushed, eager or replayed from
a CUDA graph; ``spread``: median, p10, p90), floors ``bench.floor.roofline_seconds``, set overlap
``kernels.reference.set_overlap``.

- ``overlap_summary``: mean / min per-row overlap of two top-k index sets (-1 padding ignored).
- ``exact_recall``: selected sets against the exact top-k of fp32 reference scores, plainly and with a
  tolerance at the k-th score (near-ties swapped by rounding are not errors).
- ``Case``: one comparison's record (implementations, floors, checks) in the JSON document.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sglang_indexcache.bench.floor import roofline_seconds
from sglang_indexcache.bench.timing import Bench, spread
from sglang_indexcache.kernels.reference import set_overlap

log = logging.getLogger(__name__)


def overlap_summary(a, b) -> dict:
    """Mean / min overlap of two index sets over all rows, and the share of rows with identical sets."""
    ov = set_overlap(a, b)
    return {"mean": round(float(ov.mean()), 5), "min": round(float(ov.min()), 5),
            "rows_identical": round(float((ov == 1).float().mean()), 5), "rows": int(ov.numel())}


def exact_recall(selected: torch.Tensor, scores: torch.Tensor, topk: int, rel_tol: float = 1e-3) -> dict:
    """``selected [r, topk]`` int32 against fp32 reference ``scores [r, n]`` (-inf = not a candidate).

    ``recall``: share of the exact top-k set selected; ``within_tol``: share of selected indices whose
    reference score is at least the k-th largest minus ``rel_tol`` x its magnitude (a swap between
    near-equal scores is rounding, not an error); ``invalid``: selected indices that are no candidate."""
    k = min(topk, scores.shape[1])
    vals, exact = scores.topk(k, dim=1)                             # [r, k]
    exact = torch.where(vals == float("-inf"), -1, exact).int()
    sel = selected.long()
    valid = sel >= 0
    got = torch.where(valid, scores.gather(1, sel.clamp(min=0)), float("-inf"))
    kth = vals[:, -1:]
    ok = valid & (got >= kth - rel_tol * kth.abs())
    invalid = valid & ~torch.isfinite(got)
    n_sel = valid.sum().clamp(min=1)
    return {"recall": round(float(set_overlap(exact, selected.int()).mean()), 5),
            "within_tol": round(float(ok.sum() / n_sel), 5), "invalid": int(invalid.sum()),
            "rows": int(scores.shape[0]), "rel_tol": rel_tol}


def floor_ms(flops: float, nbytes: float, peak_tflops: float, copy_gbps: float) -> float:
    """``floor.roofline_seconds`` in ms, on this run's ceilings in TFLOP/s and GB/s."""
    return 1e3 * roofline_seconds(flops, nbytes, peak_tflops * 1e12, copy_gbps * 1e9)


@dataclasses.dataclass
class Case:
    """One comparison: ``impls`` name -> timing summary (or error), ``checks`` name -> result."""

    id: str
    kind: str
    params: dict
    floors_ms: dict = dataclasses.field(default_factory=dict)
    impls: dict = dataclasses.field(default_factory=dict)
    checks: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    status: str = "running"
    error: str | None = None
    seconds: float = 0.0

    def measure(self, bench: Bench, name: str, fn, graph: bool = False, floor: str | None = None):
        """Time ``fn`` under ``name``; a failure is recorded, not raised (the other impls still run)."""
        try:
            times, mode = bench.timed(fn, graph)
        except Exception as exc:                                    # noqa: BLE001 - one impl may not run
            self.impls[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log.warning("%s / %s failed: %s", self.id, name, exc)
            return None
        row = {**spread(times), "timing": mode}
        if floor and floor in self.floors_ms:
            row["of_floor"] = round(self.floors_ms[floor] / row["ms"], 3)
            row["floor"] = floor
        self.impls[name] = row
        log.info("%s | %s: %s", self.id, name, row)
        return row

    def check(self, name: str, fn):
        """Record ``fn()`` (a dict) under ``name``, or the error it raised."""
        try:
            self.checks[name] = fn()
        except Exception as exc:                                    # noqa: BLE001 - keep the other checks
            self.checks[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return self.checks[name]

    def ratio(self, ours: str, anchor: str):
        a, b = self.impls.get(ours, {}), self.impls.get(anchor, {})
        if "ms" in a and "ms" in b:
            self.checks.setdefault("time_ratio_ours_over_sglang", {})[ours] = round(a["ms"] / b["ms"], 3)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
