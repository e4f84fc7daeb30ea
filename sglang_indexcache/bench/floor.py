"""Device ceilings (measured) and the FLOP/byte floor model of a stack under a pattern.

Ceilings (``timing.measure_ceilings``): a large matrix product in the benchmark's dtype (FLOP/s) and
a large device copy (bytes read + written per second), measured once per run on the machine itself. A component's floor is
``max(FLOPs / matmul rate, bytes / copy rate)`` with the counts of ``shapes.py``; top-k selection
is not counted (a fused kernel never writes the scores). The pattern's floor is the sum over layers,
with the indexer counted only in F layers.
"""

from __future__ import annotations

from .. import pattern as pat


def roofline_seconds(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> float:
    """The floor of one piece of work: ``max(FLOPs / matmul rate, bytes / copy rate)`` (the one
    definition; every benchmark's floor and ``of_floor`` share come from it)."""
    return max(flops / flops_per_s, nbytes / bytes_per_s)


def roofline_bound(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> str:
    """Which side of :func:`roofline_seconds` sets the floor: ``"memory"`` or ``"compute"`` (a tie
    counts as compute)."""
    return "memory" if nbytes / bytes_per_s > flops / flops_per_s else "compute"


def pattern_floor(per_layer: dict[str, float], pattern: str) -> float:
    """Floor seconds of the stack: every layer's attention + dense, the indexer of the F layers."""
    full = pat.kept(pattern)
    return len(pattern) * (per_layer["attention"] + per_layer["dense"]) + full * per_layer["indexer"]


def layer_floor(counts: dict, ceilings: dict) -> dict[str, float]:
    return floor_seconds(counts, ceilings["matmul_flops"], ceilings["copy_bytes"])


def floor_seconds(counts: dict, flops_per_s: float, bytes_per_s: float) -> dict[str, float]:
    """Per component: max(FLOPs / matmul rate, bytes / copy rate), the time no version beats much.

    A component with ``gather_bytes`` (prefill attention) also gets ``<name>_gather``: the same with
    the bytes a kernel reads when every query gathers its own top-k rows (no row shared between
    queries: FlashMLA's and SGLang's sparse kernels, and ours). With few heads that traffic, not the
    FLOPs, bounds such kernels, and no kernel shares rows between random top-k sets."""
    out = {name: roofline_seconds(c["flops"], c["bytes"], flops_per_s, bytes_per_s) for name, c in counts.items()}
    for name, c in counts.items():
        if "gather_bytes" in c:
            out[f"{name}_gather"] = roofline_seconds(c["flops"], c["gather_bytes"], flops_per_s, bytes_per_s)
    return out
