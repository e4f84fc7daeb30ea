"""``indexcache bench kernels``: the DSA kernels alone, against the device's measured ceilings.

Rows: sparse MLA decode (ours, a plain-PyTorch gather+matmul, FlashMLA's SM90 sparse kernel and
SGLang's Triton decode when they load), indexer top-k for decode (ours bf16 and fp8, PyTorch) and
for a prefill of one request (ours, PyTorch up to 32K). Each row gives the median milliseconds
(CUDA events; the L2 is flushed before every timed call and inputs rotate so that one call's data
is not the next one's cache), achieved TFLOP/s and GB/s, and the share of the ceilings (a large
bf16 matrix product, a large device copy) measured in the same run. Timing is ``timing.Bench``;
inputs, baselines and rows are ``kernel_bench_ops``; the command line is ``commands/bench_kernels.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from .floor import roofline_bound, roofline_seconds
from .shapes import KERNEL_SHAPES as SHAPES

log = logging.getLogger(__name__)

OPS = ("mla", "indexer-decode", "indexer-prefill")


def _row(kind, shape, impl, ms, flops, nbytes, ceil, **extra):
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    pct_peak = 100 * flops / (ms * 1e-3) / ceil["matmul_flops"]
    pct_hbm = 100 * nbytes / (ms * 1e-3) / ceil["copy_bytes"]
    floor_ms = 1e3 * roofline_seconds(flops, nbytes, ceil["matmul_flops"], ceil["copy_bytes"])
    row = {"kernel": kind, "shape": shape, "impl": impl, "ms": round(ms, 4), "tflops": round(tflops, 1),
           "gbps": round(gbps, 1), "pct_peak": round(pct_peak, 1), "pct_hbm": round(pct_hbm, 1),
           "floor_ms": round(floor_ms, 4), "of_floor": round(floor_ms / ms, 3),
           "bound": roofline_bound(flops, nbytes, ceil["matmul_flops"], ceil["copy_bytes"])}
    row.update(extra)
    log.info("%s", row)
    return row


@dataclasses.dataclass
class KernelBenchSpec:
    """What ``bench kernels`` times: shapes and ops, sizes, the device and the timing budget."""

    shapes: list          # names in shapes.KERNEL_SHAPES
    ops: set              # among OPS
    batches: list         # decode batch sizes
    contexts: list        # indexer decode contexts
    prefill: list         # prefill lengths (one request)
    mla_contexts: list    # sparse MLA decode contexts
    device: object        # a torch.device or its name (checked by checks.torch_device)
    budget: float = 0.4   # seconds of timed calls per row
    mla_config: dict | None = None  # launch config of our MLA kernel, e.g. {"block_h": 32}
    anchors_dir: str | None = None  # folder with SGLang's triton_sparse_mla{,_decode}.py
    mla_sweep: bool = False         # first time our MLA kernel under several launch configs

    def __post_init__(self):
        from ..errors import UsageError

        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise UsageError(f"unknown shape(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}")
        unknown = sorted(set(self.ops) - set(OPS))
        if unknown:
            raise UsageError(f"unknown --ops value(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")


def run(spec: KernelBenchSpec, on_rows=None) -> dict:
    """Time every row of ``spec``; returns the result document (``on_rows(doc)`` after each shape)."""
    import torch

    from . import kernel_bench_ops as ops
    from .timing import Bench, measure_ceilings

    device = torch.device(spec.device)
    ceil = measure_ceilings(device, torch.bfloat16)
    bench = Bench(device, spec.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    doc = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "ceilings": {"bf16_matmul_tflops": round(ceil["matmul_flops"] / 1e12, 1),
                        "copy_gbps": round(ceil["copy_bytes"] / 1e9, 1)},
           "anchors": {}, "rows": []}
    ctx = ops.Context(bench, ceil, doc, _row, spec.anchors_dir, spec.mla_config, device.type)
    if spec.mla_sweep:
        ops.mla_sweep(ctx, 128, [1, 16, 64])
        ops.mla_sweep(ctx, 64, [16, 64])
    for shape in spec.shapes:
        heads, index_heads = SHAPES[shape]
        if "mla" in spec.ops:
            ops.mla_rows(ctx, shape, heads, spec.batches, spec.mla_contexts)
        if "indexer-decode" in spec.ops:
            ops.indexer_decode_rows(ctx, shape, index_heads, spec.batches, spec.contexts)
        if "indexer-prefill" in spec.ops:
            ops.indexer_prefill_rows(ctx, shape, index_heads, spec.prefill)
        if on_rows is not None:
            on_rows(doc)
    return doc


def table(doc: dict) -> str:
    """The result document as text: device line, ceilings, anchors, one row per timed kernel."""
    c = doc["ceilings"]
    lines = [f"{doc['device']}  {doc['date']}  torch {doc['torch']}  triton {doc['triton']}",
             f"ceilings: bf16 matmul {c['bf16_matmul_tflops']} TFLOP/s, device copy {c['copy_gbps']} GB/s"]
    lines += [f"anchor {name}: {status}" for name, status in doc["anchors"].items()]
    cols = ["kernel", "shape", "impl", "batch", "context", "ms", "tflops", "gbps", "pct_peak", "pct_hbm", "of_floor"]
    lines.append(" | ".join(cols))
    lines += [" | ".join(str(row.get(k, "")) for k in cols) for row in doc["rows"]]
    return "\n".join(lines)
