"""Sparse MLA decode: the earlier kernel variant against the current one and launch variants (GPU).

``python scripts/mla_variants.py --out FILE.json [--budget S]`` (a research script) times, with CUDA-graph
replay and the L2 flushed before every call (``bench.timing.Bench``):

- decode shapes: 128 and 64 heads, batch 1 / 16 / 64, contexts 8K and 128K, top-k 2048;
- the layer-stack prefill shape: ``T`` query tokens of one request, each its own "request" with the
  request's page-table row (``bench.ops.KernelSet.attention_prefill``), 20 and 128 heads;

for our kernel under ``LEGACY_CONFIG`` (page-table lookup in the loop), ``DEFAULT_CONFIG`` (flat rows)
and a few launch variants, next to FlashMLA's ``flash_mla_sparse_fwd`` when it imports. Each row:
median ms, TFLOP/s, and GB/s of the selected latent rows (``b * topk * 1152`` bytes: the minimum for
decode; for prefill every query re-reads its rows, so this is the gathered traffic, not a floor).
Results are written to ``--out`` after every row (an interrupted run keeps what it measured).

``--diagnose`` measures *why* instead (DeepSeek-V3.2 shapes only: decode batch 64 at 128K and the
128-head prefill shape). Every launch variant runs on three index sets: ``random`` (the real case),
``contiguous`` (each request's rows are one run of consecutive cache rows: the same bytes without
the scattered gather) and ``l2`` (every request reads the same 2048 rows, so after the first they
come from L2: the time left is compute and latency). Each row also records what the compiler gave
the variant: registers, spills, shared memory and the CTAs per SM they allow
(``kernel_research.resources``). Launch variants include ones sized for two CTAs per SM.
"""

from __future__ import annotations

import argparse
import logging

from sglang_indexcache.atomic import atomic_write_json
from kernel_research.mla_inputs import DATA_MODES, mla_inputs

log = logging.getLogger(__name__)

D_QK, D_V, TOPK = 576, 512, 2048
# The first version of the sparse MLA kernel: the page table looked up inside the attention loop.
LEGACY_CONFIG = {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 2, "rows": "paged"}


def _variants(heads: int) -> list[tuple[str, dict]]:
    from sglang_indexcache.kernels.sparse_mla_decode import DEFAULT_CONFIG

    out = [("v1 paged (earlier)", LEGACY_CONFIG), ("v2 flat (default)", DEFAULT_CONFIG),
           ("flat bn32 st3", {**DEFAULT_CONFIG, "block_n": 32, "num_stages": 3}),
           ("flat 16 warps", {**DEFAULT_CONFIG, "num_warps": 16})]
    if heads > 64:
        out.append(("flat all heads bh128 bn32 w16 st1",
                    {**DEFAULT_CONFIG, "block_h": 128, "block_n": 32, "num_warps": 16, "num_stages": 1}))
    if heads <= 32:
        out.append(("flat bh32 4 warps", {**DEFAULT_CONFIG, "block_h": 32, "num_warps": 4}))
    return out


# --diagnose: launch variants with their expected resource use on an H100 (64 heads x 576 q in shared
# memory = 72 KB; a 64-row x 576 tile = 72 KB per stage; bh x 512 fp32 accumulator in registers).
DIAGNOSE_VARIANTS = (
    ("default (bh64 bn64 w8 st2)", {}),
    ("bh64 bn32 w8 st2", {"block_n": 32}),
    ("bh64 bn64 w8 st1", {"num_stages": 1}),
    ("bh32 bn32 w4 st2 (2 CTAs/SM?)", {"block_h": 32, "block_n": 32, "num_warps": 4}),
    ("bh32 bn32 w8 st2 (2 CTAs/SM?)", {"block_h": 32, "block_n": 32, "num_warps": 8}),
    ("bh16 bn32 w4 st2", {"block_h": 16, "block_n": 32, "num_warps": 4}),
)
def _time_case(bench, torch, doc, out_path, case: dict, shared_table: bool, fmla, variants=None):
    from kernel_research import resources

    from sglang_indexcache.kernels import sparse_mla_decode
    from sglang_indexcache.kernels.sparse_mla_decode import _sparse_mla_kernel

    b, ctx, heads = case["batch"], case["context"], case["heads"]
    q, cache, table, idx, rows = mla_inputs(b, ctx, heads, shared_table, bench.device, case.get("data", "random"))
    scale = D_QK ** -0.5
    flops = 2.0 * b * heads * TOPK * (D_QK + D_V)
    nbytes = b * TOPK * 2 * D_QK
    impls = [(name, lambda cfg=cfg: sparse_mla_decode(q, cache, table, idx, scale, config=cfg))
             for name, cfg in (variants or _variants(heads))]
    if fmla is not None:
        flat = cache.view(-1, 1, D_QK)
        impls.append(("flash_mla sparse_fwd", lambda: fmla(q, flat, rows.view(b, 1, TOPK), scale)))
    want = None
    for name, fn in impls:
        before = resources.snapshot(_sparse_mla_kernel)
        try:
            got = fn()
            want = got.float() if want is None else want
            err = float((got.float() - want).abs().max())
            ms, timing = bench.ms_graph(fn)
        except Exception as exc:                                    # noqa: BLE001 - e.g. out of resources
            doc["failed"].append({**case, "impl": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        doc["rows"].append({**case, "impl": name, "ms": round(ms, 4), "timing": timing,
                            "tflops": round(flops / ms / 1e9, 1), "gbps": round(nbytes / ms / 1e6, 1),
                            "max_abs_diff_vs_v1": err,
                            "compiled": resources.new_since(_sparse_mla_kernel, before)})
        log.info("%s: %.4f ms", doc["rows"][-1], ms)
        _save(out_path, doc)
    del q, cache, table, idx, rows
    torch.cuda.empty_cache()


def _save(path: str, doc: dict):
    atomic_write_json(path, doc)


def main(argv=None) -> int:
    import torch

    from sglang_indexcache.bench import kernel_anchors
    from sglang_indexcache.bench.timing import Bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--budget", type=float, default=0.1, help="seconds of timed calls per row")
    parser.add_argument("--prefill-queries", type=int, default=2048, help="query tokens of the prefill shape")
    parser.add_argument("--diagnose", action="store_true",
                        help="launch variants x index sets (random / contiguous / l2) with compiled resources")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench = Bench(torch.device("cuda"), args.budget)
    fmla, status = kernel_anchors.load_flash_mla()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flash_mla": status,
           "rows": [], "failed": []}
    if args.diagnose:
        from sglang_indexcache.kernels.sparse_mla_decode import DEFAULT_CONFIG

        variants = [(name, {**DEFAULT_CONFIG, **cfg}) for name, cfg in DIAGNOSE_VARIANTS]
        for kind, b, shared in (("decode", 64, False), ("prefill", args.prefill_queries, True)):
            for data in DATA_MODES:
                case = {"kind": kind, "heads": 128, "batch": b, "context": 131072, "data": data}
                _time_case(bench, torch, doc, args.out, case, shared, fmla if data == "random" else None,
                           variants)
        return 0
    for heads, batches in ((128, (1, 16, 64)), (64, (1, 16, 64))):
        for ctx in (8192, 131072):
            for b in batches:
                _time_case(bench, torch, doc, args.out, {"kind": "decode", "heads": heads, "batch": b,
                                                         "context": ctx}, False, fmla)
    for heads in (20, 128):
        _time_case(bench, torch, doc, args.out, {"kind": "prefill", "heads": heads,
                                                 "batch": args.prefill_queries, "context": 131072},
                   True, fmla)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
