"""Device ceilings (measured) and the FLOP/byte floor model of a stack under a pattern.

Ceilings: a large matrix product in the benchmark's dtype (FLOP/s) and a large device copy (bytes
read + written per second), measured once per run on the machine itself. A component's floor is
``max(FLOPs / matmul rate, bytes / copy rate)`` with the counts of ``shapes.py``; top-k selection
is not counted (a fused kernel never writes the scores). The pattern's floor is the sum over layers,
with the indexer counted only in F layers.
"""

from __future__ import annotations

import statistics
import time

import torch

from .shapes import floor_seconds


def _time(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """``{"matmul_flops": FLOP/s, "copy_bytes": B/s, "matmul_n": n, "copy_mib": m}`` on ``device``."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm = _time(lambda: a @ b, device, 10 if cuda else 3)
    numel = (1 << 28) if cuda else (1 << 25)                 # 1 GiB / 128 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    cp = _time(lambda: dst.copy_(src), device, 10 if cuda else 3)
    return {"matmul_flops": 2 * n ** 3 / mm, "copy_bytes": 2 * numel * 4 / cp,
            "matmul_n": n, "copy_mib": numel * 4 >> 20, "dtype": str(dtype).replace("torch.", "")}


def pattern_floor(per_layer: dict[str, float], pattern: str) -> float:
    """Floor seconds of the stack: every layer's attention + dense, the indexer of the F layers."""
    full = pattern.count("F")
    return len(pattern) * (per_layer["attention"] + per_layer["dense"]) + full * per_layer["indexer"]


def layer_floor(counts: dict, ceilings: dict) -> dict[str, float]:
    return floor_seconds(counts, ceilings["matmul_flops"], ceilings["copy_bytes"])
