"""Lightning-indexer kernels on a GPU: launch sweep, then scores, top-k and the whole op at long contexts.

``python scripts/indexer_variants.py --out FILE.json [--budget S]`` (a research script, not part of the package):

1. ceilings: bf16 and fp8 (e4m3, ``torch._scaled_mm``) matrix products of 8192^3, device copy;
2. prefill score-kernel launch sweep at 32K tokens (64 and 32 index heads; bf16, then fp8 q and k),
   the fastest config per (heads, dtype) kept for the rest;
3. prefill of one request at 32K-200K: scores alone, scores + radix top-k (``topk.topk_rows``, the
   default), scores + ``torch.topk`` (``selector="torch"``), for bf16 and fp8; the top-k alone on one
   chunk of scores;
4. decode against a paged index-K cache at 128K/200K, batch 1/16/64, captured in a CUDA graph
   (``max_seq_len`` bound: no host sync): whole op with each selector, scores alone, fp8 keys.

Prefill counts ``h d L (L+1)`` FLOPs (causal): the floor is that over the bf16 (or fp8) matmul
ceiling. Decode's floor is one read of the index-K cache (``b L d`` elements) at the copy ceiling.
Every row is written to ``--out`` as it is measured (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import logging
import math

from sglang_indexcache.atomic import atomic_write_json
from sglang_indexcache.bench.floor import roofline_bound, roofline_seconds
from sglang_indexcache.bench.kernel_bench_ops import prefill_scores_only
from sglang_indexcache.bench.timing import measure_ceilings

log = logging.getLogger(__name__)

D, TOPK = 128, 2048
DEV = "cuda"                        # --device cpu (with TRITON_INTERPRET=1) checks this script at toy sizes
SWEEP = [  # rows (query tokens x padded heads), block_n, warps, stages, keys-major
    (256, 64, 8, 3, True), (256, 64, 8, 4, True), (256, 32, 8, 4, True), (512, 64, 8, 3, True),
    (512, 32, 8, 3, True), (256, 128, 8, 3, True), (512, 64, 16, 3, True), (256, 64, 4, 3, True),
]


def _save(path: str, doc: dict):
    atomic_write_json(path, doc)


def ceilings(torch) -> dict:
    """bf16 / fp8 matmul TFLOP/s and copy GB/s of this device (``timing.measure_ceilings``)."""
    c = measure_ceilings(torch.device(DEV), torch.bfloat16, fp8=True)
    out = {"bf16_tflops": round(c["matmul_flops"] / 1e12, 1), "copy_gbps": round(c["copy_bytes"] / 1e9, 1)}
    if "fp8_matmul_flops" in c:
        out["fp8_tflops"] = round(c["fp8_matmul_flops"] / 1e12, 1)
    else:
        out["fp8_error"] = c["fp8_error"]
    return out


def _prefill_inputs(torch, n: int, heads: int, dtype: str):
    q = torch.randn(n, heads, D, device=DEV)
    k = torch.randn(n, D, device=DEV)
    w = torch.rand(n, heads, device=DEV)
    ks = None
    if dtype == "fp8":
        q, k, ks = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), torch.rand(n, device=DEV) + 0.5
    else:
        q, k = q.bfloat16(), k.bfloat16()
    cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    return q, w, k, ks, cu


def _row(doc, path, case: dict, ms: float, flops: float, nbytes: float):
    c = doc["ceilings"]
    peak = c.get("fp8_tflops") or c["bf16_tflops"] if case.get("dtype") == "fp8" else c["bf16_tflops"]
    peak = max(peak, 1e-9)
    row = {**case, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "gbps": round(nbytes / ms / 1e6, 1)}
    floor = 1e3 * roofline_seconds(flops, nbytes, peak * 1e12, c["copy_gbps"] * 1e9)  # ms
    row["floor_ms"], row["of_floor"] = round(floor, 4), round(floor / ms, 3)
    if case.get("dtype") == "fp8" and roofline_bound(flops, nbytes, peak * 1e12, c["copy_gbps"] * 1e9) == "compute":
        row["of_bf16_floor"] = round(flops / (c["bf16_tflops"] * 1e9) / ms, 3)
    doc["rows"].append(row)
    log.info("%s", row)
    _save(path, doc)


def _try(doc, path, case, fn, bench, flops, nbytes, graph=False):
    try:
        ms = bench.ms_graph(fn)[0] if graph else bench.ms(fn)
    except Exception as exc:                                        # noqa: BLE001 - e.g. out of resources
        doc["failed"].append({**case, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        _save(path, doc)
        return None
    _row(doc, path, case, ms, flops, nbytes)
    return ms


def sweep(torch, bench, doc, path, heads: int, dtype: str, n: int = 32768) -> dict:
    """Fastest ``PREFILL_CONFIG`` for ``heads`` and ``dtype`` among ``SWEEP`` (scores only, n tokens)."""
    q, w, k, ks, cu = _prefill_inputs(torch, n, heads, dtype)
    flops = heads * D * n * (n + 1.0)
    best, best_ms = None, math.inf
    for rows, bn, nw, ns, km in SWEEP:
        cfg = {"rows": rows, "block_n": bn, "num_warps": nw, "num_stages": ns, "keys_major": km}
        case = {"kind": "prefill-sweep", "heads": heads, "dtype": dtype, "context": n, "config": cfg}
        ms = _try(doc, path, case, prefill_scores_only(q, w, k, ks, cu, cfg), bench, flops, 0)
        if ms is not None and ms < best_ms:
            best, best_ms = cfg, ms
    doc["best_config"][f"{heads}-{dtype}"] = best
    _save(path, doc)
    return best


def prefill_rows(torch, bench, doc, path, heads: int, dtype: str, config: dict, contexts):
    from kernel_research.indexer_fused import fused_chunks

    from sglang_indexcache.kernels import indexer_topk_prefill
    from sglang_indexcache.kernels.topk import topk_rows
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    for n in contexts:
        q, w, k, ks, cu = _prefill_inputs(torch, n, heads, dtype)
        flops = heads * D * n * (n + 1.0)
        base = {"kind": "prefill", "heads": heads, "dtype": dtype, "context": n}
        _try(doc, path, {**base, "impl": "scores only"}, prefill_scores_only(q, w, k, ks, cu, config),
             bench, flops, 0)
        for sel in ("triton", "radix", "torch"):
            fn = lambda sel=sel: indexer_topk_prefill(q, w, k, cu, TOPK, 0.1, ks, selector=sel, **config)  # noqa: E731
            _try(doc, path, {**base, "impl": f"scores + {sel} top-k"}, fn, bench, flops, 0)
        fused = fused_chunks(16384)
        fn = lambda: indexer_topk_prefill(q, w, k, cu, TOPK, 0.1, ks, chunk_topk=fused, **config)  # noqa: E731
        _try(doc, path, {**base, "impl": "fused chunks from 16K + sampled top-k"}, fn, bench, flops, 0)
        chunk = max(1, min(n, (1 << 30) // (4 * n)))
        p0 = n - chunk                                              # the last (longest) chunk
        scores = torch.randn(chunk, n, device=DEV)
        lengths = (p0 + torch.arange(chunk, device=DEV) + 1).int()
        for sel, fn in (("sampled", lambda: topk_rows_sampled(scores, TOPK, lengths=lengths)),
                        ("radix", lambda: topk_rows(scores, TOPK, lengths=lengths)),
                        ("torch", lambda: scores.topk(min(TOPK, n), dim=1))):
            read = 4.0 * float(lengths.sum())
            _try(doc, path, {**base, "impl": f"{sel} top-k alone, last chunk of {chunk} rows"}, fn, bench, 0, read)
        del q, w, k, ks, scores
        bench.empty_cache()


def decode_rows(torch, bench, doc, path, heads: int, contexts, batches):
    from sglang_indexcache.kernels import indexer_topk_decode
    from sglang_indexcache.kernels.indexer_scores import decode_scores

    for n in contexts:
        for b in batches:
            per = math.ceil(n / 64)
            cache = torch.randn(b * per, 64, D, device=DEV).bfloat16()
            table = torch.randperm(b * per, device=DEV, dtype=torch.int32).view(b, per)
            lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
            q = torch.randn(b, heads, D, device=DEV).bfloat16()
            w = torch.rand(b, heads, device=DEV)
            base = {"kind": "decode", "heads": heads, "batch": b, "context": n}
            flops = 2.0 * b * heads * n * D
            bound = per * 64
            for dtype in ("bf16", "fp8-keys"):
                kc, ks, elt = cache, None, 2
                if dtype == "fp8-keys":
                    kc, ks, elt = cache.to(torch.float8_e4m3fn), torch.rand(b * per, 64, device=DEV) + 0.5, 1
                nbytes = b * n * (D * elt + (4 if ks is not None else 0))
                for sel in ("triton", "radix", "torch") if dtype == "bf16" else ("triton",):
                    fn = lambda kc=kc, ks=ks, sel=sel: indexer_topk_decode(  # noqa: E731
                        q, w, kc, table, lens, TOPK, 0.1, ks, max_seq_len=bound, selector=sel)
                    _try(doc, path, {**base, "dtype": dtype, "impl": f"scores + {sel} top-k (graph)"}, fn, bench,
                         flops, nbytes, graph=True)
                buf = torch.empty(b, bound, device=DEV)
                fn = lambda kc=kc, ks=ks: decode_scores(q, w, kc, table, lens, 0.1, buf, k_scale=ks)  # noqa: E731
                _try(doc, path, {**base, "dtype": dtype, "impl": "scores only (graph)"}, fn, bench, flops, nbytes,
                     graph=True)
            del cache, table, q
            bench.empty_cache()


def main(argv=None) -> int:
    import torch

    from sglang_indexcache.bench.timing import Bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--budget", type=float, default=0.1, help="seconds of timed calls per row")
    parser.add_argument("--contexts", default="32768,65536,131072", help="prefill contexts")
    parser.add_argument("--skip-sweep", action="store_true", help="use PREFILL_CONFIG as it is")
    parser.add_argument("--sweep-context", type=int, default=32768)
    parser.add_argument("--decode-contexts", default="131072,200000")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    global DEV
    DEV = args.device
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench = Bench(torch.device(DEV), args.budget)
    doc = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
           "rows": [], "failed": [], "best_config": {}}
    doc["ceilings"] = ceilings(torch)
    _save(args.out, doc)
    from sglang_indexcache.kernels.indexer_scores import PREFILL_CONFIG

    contexts = [int(x) for x in args.contexts.split(",")]
    for heads in (64, 32):
        for dtype in ("bf16", "fp8"):
            cfg = dict(PREFILL_CONFIG) if args.skip_sweep else (
                sweep(torch, bench, doc, args.out, heads, dtype, args.sweep_context) or dict(PREFILL_CONFIG))
            prefill_rows(torch, bench, doc, args.out, heads, dtype, cfg, contexts)
    for heads in (64, 32):
        decode_rows(torch, bench, doc, args.out, heads, [int(x) for x in args.decode_contexts.split(",")],
                    [int(x) for x in args.batches.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
