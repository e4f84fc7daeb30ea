"""Per-component timing of one forward: host clock on the CPU, device events on a GPU.

Sections never synchronise the device (events are recorded on the stream and read once at the end),
so timing a component does not change the time of the whole.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


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
