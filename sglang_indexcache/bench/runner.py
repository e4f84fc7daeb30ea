"""Measure a stack under several patterns at several contexts: rows of seconds, speedup and bounds.

Per context (and decode batch) every pattern runs ``repeats`` times after ``warmup`` runs,
interleaved (all-F, every-2, ..., all-F, every-2, ...) so that a slow spell of a shared machine
hits every pattern alike; each row holds medians. For a pattern P:

- ``speedup`` = all-F seconds / P seconds (both medians of the same run);
- ``indexer_share`` = all-F's indexer seconds / all-F seconds;
- ``limit`` = all-F seconds / (all-F seconds - indexer seconds of the layers P makes S), the Amdahl
  bound of all-F's own measured profile, computed within each all-F run and then the median taken
  (a ratio of medians taken separately would mix runs of a noisy machine);
- ``floor_limit`` = the same ratio for the FLOP/byte floors (floor.py), on measured ceilings;
- ``components`` = per-component seconds (indexer, attention, dense) of P, ``floor`` their floors and
  ``efficiency`` = floor / measured per component.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import pattern as pat
from .. import progress
from . import floor as floor_model
from .ops import KernelSet
from .shapes import COMPONENTS, decode_counts, prefill_counts
from .stack import Stack
from .timing import measure_ceilings, median_result

log = logging.getLogger(__name__)

NOTE = "random weights: speed does not depend on trained weights"


@dataclass
class BenchSpec:
    """What to measure; ``patterns`` is a list of (label, canonical pattern string)."""

    mode: str                                  # "prefill" or "decode"
    config_name: str
    config: dict
    layers: int
    contexts: list[int]
    patterns: list[tuple[str, str]]
    device: torch.device
    dtype: torch.dtype
    kernels: str = "auto"
    batches: list[int] = field(default_factory=lambda: [1])
    repeats: int = 3
    warmup: int = 1
    chunk: int = 8192
    topk: int | None = None
    seed: int = 0
    deadline: float | None = None              # time.monotonic() after which no new context starts


def _past(spec: BenchSpec, what: str) -> bool:
    if spec.deadline is not None and time.monotonic() > spec.deadline:
        log.warning("time is up: skipping %s and the rest", what)
        return True
    return False


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _row(label, pattern, result, all_f, floors_layer, layers) -> dict:
    """One table row from P's and all-F's median results and the per-layer floors."""
    t_f = all_f["seconds"]
    limits = []                                    # per all-F run: its own Amdahl bound
    for run in all_f["runs"]:
        idx_layers = run["layers"].get("indexer", {})
        removed = sum(idx_layers.get(i, 0.0) for i, c in enumerate(pattern) if c == pat.SHARED)
        limits.append(run["seconds"] / (run["seconds"] - removed) if run["seconds"] > removed else float("inf"))
    floor_p = floor_model.pattern_floor(floors_layer, pattern)
    floor_f = floor_model.pattern_floor(floors_layer, pat.all_full(layers))
    comps = {c: result["components"].get(c, 0.0) for c in COMPONENTS}
    full = pat.kept(pattern)
    floors = {"indexer": full * floors_layer["indexer"], "attention": layers * floors_layer["attention"],
              "dense": layers * floors_layer["dense"]}
    return {
        "pattern": label, "pattern_string": pattern, "seconds": result["seconds"],
        "speedup": t_f / result["seconds"],
        "limit": statistics.median(limits),
        "floor_limit": floor_f / floor_p,
        "indexer_share": all_f["components"].get("indexer", 0.0) / t_f,
        "components": comps, "floor": floors,
        "efficiency": {c: (floors[c] / comps[c] if comps[c] > 0 else None) for c in COMPONENTS},
        **_gather_floor(floors_layer, layers, comps),
        "floor_seconds": floor_p, "spread": result["spread"], "repeats": result["repeats"],
    }


def _gather_floor(floors_layer: dict, layers: int, comps: dict) -> dict:
    """Attention's floor with per-query row gathers (``floor.floor_seconds``), when counted."""
    if "attention_gather" not in floors_layer:
        return {}
    floor = layers * floors_layer["attention_gather"]
    return {"attention_gather_floor": floor,
            "attention_gather_efficiency": floor / comps["attention"] if comps["attention"] > 0 else None}


def _measure(run_once, patterns, repeats, warmup, bar, desc) -> dict[str, dict]:
    """Median results per pattern string: warm-up runs of the cheapest pattern (fewest F layers: it
    still runs every kind of work once), then the patterns interleave."""
    cheapest = min((p for _, p in patterns), key=pat.kept)
    for _ in range(warmup):
        bar.set_description(f"{desc} warm-up")
        run_once(cheapest)
        bar.update(1)
    results = {p: [] for _, p in patterns}
    for r in range(repeats):
        order = patterns[r % len(patterns):] + patterns[:r % len(patterns)]
        for label, p in order:
            bar.set_description(f"{desc} {label}")
            results[p].append(run_once(p))
            bar.update(1)
    out = {p: median_result(rs) for p, rs in results.items()}
    for p, rs in results.items():
        out[p]["runs"] = rs                       # per-run results, for the limit (not saved)
    return out


def _header(spec: BenchSpec, stack: Stack, ceilings: dict) -> dict:
    return {
        "format": "indexcache-bench/v1", "mode": spec.mode, "note": NOTE,
        "config": spec.config_name, "layers": spec.layers, "shapes": stack.shapes.as_dict(),
        "device": (torch.cuda.get_device_name(spec.device) if spec.device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "dtype": str(spec.dtype).replace("torch.", ""), "kernels": stack.kernels.describe(),
        "ceilings": ceilings, "repeats": spec.repeats, "warmup": spec.warmup,
        "load_before": _load(), "rows": [],
    }


def _check_patterns(spec: BenchSpec):
    if not spec.patterns or not pat.is_all_full(spec.patterns[0][1]):
        raise ValueError("the first pattern must be all-F (the baseline of every row)")


def run_prefill(spec: BenchSpec, on_rows=None) -> dict:
    """Prefill rows for every context x pattern; ``on_rows(doc)`` after each context (to save)."""
    _check_patterns(spec)
    kernels = KernelSet(spec.kernels, spec.device)
    stack = Stack(spec.config, spec.layers, spec.device, spec.dtype, kernels, topk=spec.topk, seed=spec.seed)
    ceilings = measure_ceilings(spec.device, spec.dtype)
    doc = _header(spec, stack, ceilings)
    elt = torch.finfo(spec.dtype).bits // 8
    total = len(spec.contexts) * (spec.warmup + spec.repeats * len(spec.patterns))
    with progress.bar(total=total, desc="prefill") as bar:
        for context in spec.contexts:
            if _past(spec, f"prefill at {context}"):
                break
            inputs = stack.prefill_inputs(context)
            med = _measure(lambda p: stack.prefill(inputs, p, spec.chunk), spec.patterns,
                           spec.repeats, spec.warmup, bar, f"prefill {context}")
            floors = floor_model.layer_floor(prefill_counts(stack.shapes, context, elt), ceilings)
            for label, p in spec.patterns:
                doc["rows"].append({"context": context, **_row(label, p, med[p], med[spec.patterns[0][1]],
                                                               floors, spec.layers)})
            del inputs
            doc["load_after"] = _load()
            if on_rows:
                on_rows(doc)
    return doc


def _graph_seconds(stack: Stack, inputs, spec: BenchSpec) -> dict:
    """Per pattern, the median seconds of one decode step replayed from a CUDA graph (no launch
    overhead, as a serving engine runs decode); empty when the step cannot be captured."""
    try:
        return {p: stack.decode_graph_seconds(inputs, p, spec.repeats) for _, p in spec.patterns}
    except Exception as exc:                                        # noqa: BLE001 - report, keep eager rows
        log.warning("decode step not capturable in a CUDA graph (%s: %s); eager times only",
                    type(exc).__name__, exc)
        return {}


def run_decode(spec: BenchSpec, on_rows=None) -> dict:
    """Decode-step rows for every batch x context x pattern (seconds per step of the stack)."""
    _check_patterns(spec)
    kernels = KernelSet(spec.kernels, spec.device)
    doc = None
    total = len(spec.batches) * len(spec.contexts) * (spec.warmup + spec.repeats * len(spec.patterns))
    elt = torch.finfo(spec.dtype).bits // 8
    with progress.bar(total=total, desc="decode") as bar:
        for batch in spec.batches:
            if doc is not None and _past(spec, f"decode b={batch}"):
                break
            stack = Stack(spec.config, spec.layers, spec.device, spec.dtype, kernels,
                          decode_batch=batch, topk=spec.topk, seed=spec.seed)
            if doc is None:
                doc = _header(spec, stack, measure_ceilings(spec.device, spec.dtype))
            for context in spec.contexts:
                if _past(spec, f"decode b={batch} at {context}"):
                    break
                inputs = stack.decode_inputs(batch, context)
                med = _measure(lambda p: stack.decode(inputs, p), spec.patterns, spec.repeats,
                               spec.warmup, bar, f"decode b={batch} {context}")
                counts = decode_counts(stack.shapes, batch, context, elt)
                floors = floor_model.layer_floor(counts, doc["ceilings"])
                graph = _graph_seconds(stack, inputs, spec) if spec.device.type == "cuda" else {}
                for label, p in spec.patterns:
                    row = _row(label, p, med[p], med[spec.patterns[0][1]], floors, spec.layers)
                    row["tokens_per_s"] = batch / row["seconds"]
                    if graph.get(p) and graph.get(spec.patterns[0][1]):
                        row["graph_seconds"] = graph[p]
                        row["graph_speedup"] = graph[spec.patterns[0][1]] / graph[p]
                    doc["rows"].append({"context": context, "batch": batch, "moe_experts_read": stack.experts,
                                        **row})
                del inputs
                doc["load_after"] = _load()
                if on_rows:
                    on_rows(doc)
            del stack
    return doc
