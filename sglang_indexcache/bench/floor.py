"""Device ceilings (measured) and the FLOP/byte floor model of a stack under a pattern.

Ceilings (``timing.measure_ceilings``): a large matrix product in the benchmark's dtype (FLOP/s) and
a large device copy (bytes read + written per second), measured once per run on the machine itself. A component's floor is
``max(FLOPs / matmul rate, bytes / copy rate)`` with the counts of ``shapes.py``; top-k selection
is not counted (a fused kernel never writes the scores). The pattern's floor is the sum over layers,
with the indexer counted only in F layers.
"""

from __future__ import annotations

from .shapes import floor_seconds


def pattern_floor(per_layer: dict[str, float], pattern: str) -> float:
    """Floor seconds of the stack: every layer's attention + dense, the indexer of the F layers."""
    full = pattern.count("F")
    return len(pattern) * (per_layer["attention"] + per_layer["dense"]) + full * per_layer["indexer"]


def layer_floor(counts: dict, ceilings: dict) -> dict[str, float]:
    return floor_seconds(counts, ceilings["matmul_flops"], ceilings["copy_bytes"])
