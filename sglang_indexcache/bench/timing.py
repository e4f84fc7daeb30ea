"""The benchmarks' one measuring module: host clock on the CPU, CUDA events on a GPU.

- :func:`time_call` / :func:`median_seconds`: one call, or the median of ``repeats`` after warm-up;
- :class:`Bench`: per-op kernel timing (every call's milliseconds, their median, L2 flushed before
  every call, inputs rotating, optional CUDA-graph replay), used by ``bench kernels`` and the
  research scripts, and :func:`spread` (median, p10, p90) of its times;
- :func:`measure_ceilings`: the device's matmul and copy rates, the denominators of every floor;
- :class:`Timer` / :func:`median_result`: per-component timing of one stack forward and medians
  (with their spread) over repeats, used by ``bench prefill`` / ``bench decode``. Sections never
  synchronise the device (events are recorded on the stream and read once at the end), so timing a
  component does not change the time of the whole.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
L2_FLUSH_BYTES = 256 << 20


def time_call(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events around it on a GPU (then a sync), else the host clock."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def measure_ceilings(device: torch.device, dtype: torch.dtype, fp8: bool = False) -> dict:
    """``{"matmul_flops": FLOP/s, "copy_bytes": B/s, "matmul_n": n, "copy_mib": m}`` on ``device``.

    ``fp8``: also ``"fp8_matmul_flops"`` (e4m3 ``torch._scaled_mm``, the same n), or ``"fp8_error"``
    where the device has no fp8 matrix product."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm = median_seconds(lambda: a @ b, device, 10 if cuda else 3)
    out = {"matmul_n": n, "dtype": str(dtype).replace("torch.", "")}
    if fp8:
        try:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()      # b column-major
            one = torch.ones((), device=device)
            fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
            out["fp8_matmul_flops"] = 2 * n ** 3 / median_seconds(fn, device, 10 if cuda else 3)
        except Exception as exc:                                # noqa: BLE001 - no fp8 product here
            out["fp8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    del a, b
    numel = (1 << 28) if cuda else (1 << 25)                 # 1 GiB / 128 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    cp = median_seconds(lambda: dst.copy_(src), device, 10 if cuda else 3)
    return {"matmul_flops": 2 * n ** 3 / mm, "copy_bytes": 2 * numel * 4 / cp, "copy_mib": numel * 4 >> 20, **out}


class Bench:
    """Per-op timing with the L2 flushed between calls; ``fns`` rotate so inputs differ call to call.

    ``times`` keeps every timed call (milliseconds), ``ms`` / ``ms_graph`` give their median, and
    ``spread`` summarises them. Calls per measurement: as many as fit in ``budget_s`` after one
    warm-up call and one probe call, between ``min_reps`` and ``max_reps``; ``warmup=False`` (CPU smoke
    runs only) times ``min_reps`` calls straight away."""

    def __init__(self, device, budget_s: float, min_reps: int = 3, max_reps: int = 50, warmup: bool = True):
        self.device, self.budget = device, budget_s
        self.min_reps, self.max_reps, self.warmup = min_reps, max_reps, warmup
        flush = L2_FLUSH_BYTES if device.type == "cuda" else 1 << 20
        self.flush = torch.empty(flush // 4, dtype=torch.float32, device=device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def empty_cache(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def times(self, fns) -> list[float]:
        """Milliseconds of each timed call, cycling through ``fns``."""
        fns = fns if isinstance(fns, (list, tuple)) else [fns]
        reps = self.min_reps
        if self.warmup:
            fns[0]()                                               # warm-up (and compile)
            self.sync()
            t0 = time.perf_counter()
            fns[-1]()
            self.sync()
            reps = int(min(self.max_reps, max(self.min_reps, self.budget / max(time.perf_counter() - t0, 1e-6))))
        times = []
        for r in range(reps):
            self.flush.zero_()
            times.append(1e3 * time_call(fns[r % len(fns)], self.device))
        return times

    def ms(self, fns) -> float:
        """Median milliseconds of calls cycling through ``fns``."""
        return statistics.median(self.times(fns))

    def timed(self, fns, graph: bool = False) -> tuple[list[float], str]:
        """``(times, mode)``: with ``graph`` on a GPU each call is captured once in a CUDA graph and
        replayed, so the time is the GPU's alone (no host launch overhead, as in a CUDA-graph decode
        step): mode ``"graph"``; ``"eager (graph capture failed: ...)"`` when a call cannot be
        captured; ``"eager"`` otherwise."""
        fns = fns if isinstance(fns, (list, tuple)) else [fns]
        if not graph or self.device.type != "cuda":
            return self.times(fns), "eager"
        try:
            graphs = []
            for fn in fns:
                fn()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                graphs.append(g)
        except Exception as exc:                                   # noqa: BLE001 - not capturable
            log.info("graph capture failed (%s); timing eagerly", exc)
            torch.cuda.synchronize()
            return self.times(fns), f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
        return self.times([g.replay for g in graphs]), "graph"

    def ms_graph(self, fns):
        """``(median ms, "graph" | "eager")``: ``timed(fns, graph=True)``'s median."""
        times, mode = self.timed(fns, graph=True)
        return statistics.median(times), mode if mode == "graph" else "eager"


def spread(times_ms) -> dict:
    """``{"ms": median, "p10", "p90", "n"}`` of timings in milliseconds."""
    ts = sorted(times_ms)
    if len(ts) >= 2:
        q = statistics.quantiles(ts, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    else:
        p10 = p90 = ts[0]
    return {"ms": round(statistics.median(ts), 4), "p10": round(p10, 4), "p90": round(p90, 4), "n": len(ts)}


class Timer:
    """Collects ``(component, layer) -> seconds`` and the whole run's seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks = []                                   # (component, layer, start, end)
        self._whole = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    @contextmanager
    def section(self, component: str, layer: int):
        start = self._now()
        yield
        self._marks.append((component, layer, start, self._now()))

    @contextmanager
    def whole(self):
        if self.cuda:
            torch.cuda.synchronize()
        start = self._now()
        yield
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize()
        self._whole = (start, end)

    def result(self) -> dict:
        """``{"seconds": whole, "components": {name: s}, "layers": {name: {layer: s}}}``."""
        layers: dict = defaultdict(lambda: defaultdict(float))
        for component, layer, start, end in self._marks:
            layers[component][layer] += self._elapsed(start, end)
        return {
            "seconds": self._elapsed(*self._whole),
            "components": {c: sum(v.values()) for c, v in layers.items()},
            "layers": {c: dict(v) for c, v in layers.items()},
        }


class NullTimer:
    """A Timer that records nothing (for CUDA-graph capture, where events cannot be read back)."""

    @contextmanager
    def section(self, component: str, layer: int):
        yield

    @contextmanager
    def whole(self):
        yield

    def result(self) -> None:
        return None


def median_result(results: list[dict]) -> dict:
    """Median over repeats of the whole time, of each component and of each layer's component time."""
    out = {"seconds": statistics.median(r["seconds"] for r in results), "components": {}, "layers": {}}
    names = {c for r in results for c in r["components"]}
    for c in sorted(names):
        out["components"][c] = statistics.median(r["components"].get(c, 0.0) for r in results)
        layer_ids = {layer for r in results for layer in r["layers"].get(c, {})}
        out["layers"][c] = {layer: statistics.median(r["layers"].get(c, {}).get(layer, 0.0) for r in results)
                            for layer in sorted(layer_ids)}
    seconds = [r["seconds"] for r in results]
    out["spread"] = (max(seconds) - min(seconds)) / out["seconds"] if out["seconds"] > 0 else 0.0
    out["repeats"] = len(results)
    return out
