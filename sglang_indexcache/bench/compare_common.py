"""Measurement and checks shared by the cases of ``scripts/gpu_kernel_compare.py``.

- ``SpreadBench``: CUDA-event timings (L2 flushed before each call) as a list, eager or replayed
  from a CUDA graph, summarised by ``spread`` (median, p10, p90).
- ``set_overlap``: per-row share of one top-k index set found in another (-1 padding ignored).
- ``exact_recall``: selected sets against the exact top-k of fp32 reference scores, plainly and with a
  tolerance at the k-th score (near-ties swapped by rounding are not errors).
- ``Case``: one comparison's record (implementations, floors, checks) in the JSON document.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import torch

from ..kernels.testing import set_overlap
from .timing import Bench, time_call

log = logging.getLogger(__name__)


class SpreadBench(Bench):
    """``Bench`` that keeps every timed call: ``samples(fn, graph)`` -> ``(ms list, mode)``.

    ``warmup=False`` (the CPU smoke test only) times the first call, without the warm-up and the
    probe call that sizes the repeats."""

    def __init__(self, device, budget_s: float, min_reps: int = 5, max_reps: int = 30, warmup: bool = True):
        super().__init__(device, budget_s)
        self.min_reps, self.max_reps, self.warmup = min_reps, max_reps, warmup

    def _graph(self, fn):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    def samples(self, fn, graph: bool = False):
        mode, call = "eager", fn
        if graph and self.device.type == "cuda":
            try:
                call, mode = self._graph(fn), "graph"
            except Exception as exc:                                # noqa: BLE001 - not capturable
                torch.cuda.synchronize()
                mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
        reps = self.min_reps
        if self.warmup:
            call()                                                  # warm-up (and compile)
            self.sync()
            t0 = time.perf_counter()
            call()
            self.sync()
            one = time.perf_counter() - t0
            reps = int(min(self.max_reps, max(self.min_reps, self.budget / max(one, 1e-6))))
        times = []
        for _ in range(reps):
            self.flush.zero_()
            times.append(1e3 * time_call(call, self.device))
        return times, mode


def spread(times_ms) -> dict:
    """``{"ms": median, "p10", "p90", "n"}`` of timings in milliseconds."""
    ts = sorted(times_ms)
    if len(ts) >= 2:
        q = statistics.quantiles(ts, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    else:
        p10 = p90 = ts[0]
    return {"ms": round(statistics.median(ts), 4), "p10": round(p10, 4), "p90": round(p90, 4), "n": len(ts)}


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
    """``max(FLOPs / peak, bytes / copy rate)`` in ms (the measured ceilings of this run)."""
    return 1e3 * max(flops / (peak_tflops * 1e12), nbytes / (copy_gbps * 1e9))


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

    def measure(self, bench: SpreadBench, name: str, fn, graph: bool = False, floor: str | None = None):
        """Time ``fn`` under ``name``; a failure is recorded, not raised (the other impls still run)."""
        try:
            times, mode = bench.samples(fn, graph)
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
