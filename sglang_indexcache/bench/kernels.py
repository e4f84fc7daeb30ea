"""``indexcache bench kernels``: the DSA kernels alone, against the device's measured ceilings.

Rows: sparse MLA decode (ours, a plain-PyTorch gather+matmul, FlashMLA's SM90 sparse kernel and
SGLang's Triton decode when they load), indexer top-k for decode (ours bf16 and fp8, PyTorch) and
for a prefill of one request (ours, PyTorch up to 32K). Each row gives the median milliseconds
(CUDA events; the L2 is flushed before every timed call and inputs rotate so that one call's data
is not the next one's cache), achieved TFLOP/s and GB/s, and the share of the ceilings (a large
bf16 matrix product, a large device copy) measured in the same run. Timing is ``timing.Bench``;
inputs, baselines and rows are ``kernel_bench_ops``.
"""

from __future__ import annotations

import json
import logging
import time

from .floor import roofline_seconds
from .shapes import KERNEL_SHAPES as SHAPES

log = logging.getLogger(__name__)

OPS = ("mla", "indexer-decode", "indexer-prefill")


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        out.append(int(part.rstrip("k")) * mult)
    return out


def add_kernel_arguments(parser):
    parser.add_argument("--shapes", default="deepseek-v3.2,glm-5", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--ops", default="mla,indexer-decode,indexer-prefill",
                        help="which kernels: mla, indexer-decode, indexer-prefill (comma-separated)")
    parser.add_argument("--batch", default="1,16,64", help="decode batch sizes (default 1,16,64)")
    parser.add_argument("--contexts", default="8k,32k,128k,200k",
                        help="indexer decode contexts (default 8k,32k,128k,200k)")
    parser.add_argument("--mla-contexts", default="8k,128k", help="sparse MLA decode contexts (default 8k,128k)")
    parser.add_argument("--prefill-contexts", default="8k,32k,64k,128k", help="prefill lengths (default up to 128k)")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds of timed calls per row (default 0.4)")
    parser.add_argument("--sglang-triton-dir", default=".cache/kernel-anchors",
                        help="folder with SGLang's triton_sparse_mla{,_decode}.py (scripts/fetch_kernel_anchors.sh)")
    parser.add_argument("--mla-config", default=None,
                        help='JSON launch config for our MLA kernel, e.g. \'{"block_h": 32}\'')
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only smoke-tests this benchmark (with TRITON_INTERPRET=1, tiny sizes)")
    parser.add_argument("--mla-sweep", action="store_true",
                        help="first time our MLA kernel under several launch configs (128 and 64 heads)")
    parser.add_argument("--json", action="store_true", help="print the result document as JSON")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON document here")


def _row(kind, shape, impl, ms, flops, nbytes, ceil, **extra):
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    pct_peak = 100 * flops / (ms * 1e-3) / ceil["matmul_flops"]
    pct_hbm = 100 * nbytes / (ms * 1e-3) / ceil["copy_bytes"]
    floor_ms = 1e3 * roofline_seconds(flops, nbytes, ceil["matmul_flops"], ceil["copy_bytes"])
    row = {"kernel": kind, "shape": shape, "impl": impl, "ms": round(ms, 4), "tflops": round(tflops, 1),
           "gbps": round(gbps, 1), "pct_peak": round(pct_peak, 1), "pct_hbm": round(pct_hbm, 1),
           "floor_ms": round(floor_ms, 4), "of_floor": round(floor_ms / ms, 3),
           "bound": "memory" if nbytes / ceil["copy_bytes"] > flops / ceil["matmul_flops"] else "compute"}
    row.update(extra)
    log.info("%s", row)
    return row


def _settings(args) -> dict:
    """Validated settings from the arguments; bad values raise UsageError (exit 2)."""
    from ..errors import UsageError

    shapes = [s.strip() for s in args.shapes.split(",")]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise UsageError(f"unknown shape(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}")
    wanted = {o.strip() for o in args.ops.split(",")}
    unknown = sorted(wanted - set(OPS))
    if unknown:
        raise UsageError(f"unknown --ops value(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    try:
        return {"shapes": shapes, "ops": wanted, "batches": _ints(args.batch), "contexts": _ints(args.contexts),
                "prefill": _ints(args.prefill_contexts), "mla_contexts": _ints(args.mla_contexts),
                "mla_config": json.loads(args.mla_config) if args.mla_config else None}
    except ValueError as exc:
        raise UsageError(f"bad number list or JSON: {exc}") from exc


def run_kernels(args) -> int:
    import torch

    from ..errors import UsageError
    from . import kernel_bench_ops as ops
    from .timing import Bench, measure_ceilings

    cfg = _settings(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("bench kernels needs a CUDA GPU (the Triton kernels are tested on the CPU by pytest)")
    device = torch.device(args.device)
    ceil = measure_ceilings(device, torch.bfloat16)
    bench = Bench(device, args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    doc = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "ceilings": {"bf16_matmul_tflops": round(ceil["matmul_flops"] / 1e12, 1),
                        "copy_gbps": round(ceil["copy_bytes"] / 1e9, 1)},
           "anchors": {}, "rows": []}
    ctx = ops.Context(bench, ceil, doc, _row, args.sglang_triton_dir, cfg["mla_config"], args.device)
    if args.mla_sweep:
        ops.mla_sweep(ctx, 128, [1, 16, 64])
        ops.mla_sweep(ctx, 64, [16, 64])
    for shape in cfg["shapes"]:
        heads, index_heads = SHAPES[shape]
        if "mla" in cfg["ops"]:
            ops.mla_rows(ctx, shape, heads, cfg["batches"], cfg["mla_contexts"])
        if "indexer-decode" in cfg["ops"]:
            ops.indexer_decode_rows(ctx, shape, index_heads, cfg["batches"], cfg["contexts"])
        if "indexer-prefill" in cfg["ops"]:
            ops.indexer_prefill_rows(ctx, shape, index_heads, cfg["prefill"])
        if args.save:
            _save(args.save, doc)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print_table(doc)
    return 0


def _save(path: str, doc: dict):
    from ..atomic import atomic_write_json

    atomic_write_json(path, doc)


def _print_table(doc: dict):
    print(f"{doc['device']}  {doc['date']}  torch {doc['torch']}  triton {doc['triton']}")
    c = doc["ceilings"]
    print(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']} TFLOP/s, device copy {c['copy_gbps']} GB/s")
    for name, status in doc["anchors"].items():
        print(f"anchor {name}: {status}")
    cols = ["kernel", "shape", "impl", "batch", "context", "ms", "tflops", "gbps", "pct_peak", "pct_hbm", "of_floor"]
    print(" | ".join(cols))
    for row in doc["rows"]:
        print(" | ".join(str(row.get(k, "")) for k in cols))


def main(argv=None) -> int:
    """``python -m sglang_indexcache.bench.kernels``: the same as ``indexcache bench kernels``."""
    import argparse

    from ..errors import UsageError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m sglang_indexcache.bench.kernels")
    add_kernel_arguments(parser)
    try:
        return run_kernels(parser.parse_args(argv))
    except UsageError as exc:
        print(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
