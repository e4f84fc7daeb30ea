"""Inputs, baselines and rows of ``bench kernels`` (see ``kernels.py``); GPU only.

Counts: sparse MLA decode does ``2 b h topk (d_qk + d_v)`` FLOPs and must read each selected latent
row once (``b topk (2 d_qk + 4)`` bytes); the decode indexer does ``2 b h L d`` FLOPs and must read
the index-K cache once (``b L d`` elements, plus 4-byte scales in fp8); a prefill indexer of one
request of L tokens does ``h d L (L + 1)`` FLOPs (causal). Floors use these minimum counts; our
two-pass indexer also writes and re-reads fp32 scores, which the counts deliberately leave out.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels.indexer_scores import prefill_scores
from ..kernels.reference import gathered_attention, index_scores
from . import kernel_anchors
from .ops import torch_indexer_prefill as torch_prefill

from .shapes import D_IDX, D_QK, D_V, TOPK

@dataclasses.dataclass
class Context:
    bench: object
    ceil: dict
    doc: dict
    row: object                     # kernels._row(kind, shape, impl, ms, flops, nbytes, ceil, **extra)
    sglang_dir: str | None
    mla_config: dict | None
    device: str = "cuda"


def paged_cache(b: int, ctx: int, width: int, dtype, device):
    """Cache [pages, 64, width] for b requests of ctx tokens, shuffled page table, flat rows [b, ctx]."""
    per = math.ceil(ctx / 64)
    pages = b * per
    cache = torch.randn(pages, 64, width, device=device).to(dtype)
    page_table = torch.randperm(pages, device=device, dtype=torch.int32).view(b, per)
    pos = torch.arange(ctx, device=device)
    rows = page_table.long()[:, pos // 64] * 64 + pos % 64          # [b, ctx]
    return cache, page_table, rows


def prefill_scores_only(q, w, k, ks, cu, config, budget_bytes=1 << 30):
    """The score kernel over every chunk of query positions, as ``indexer_topk_prefill`` runs it."""
    n = q.shape[0]
    chunk = max(1, min(n, budget_bytes // (4 * n)))
    buf = torch.empty(chunk * n, dtype=torch.float32, device=q.device)

    def run():
        for p0 in range(0, n, chunk):
            rows = min(chunk, n - p0)
            prefill_scores(q, w, k, cu, 0.1, buf[:rows * (p0 + rows)].view(1, rows, p0 + rows), p0, rows,
                           k_scale=ks, **config)
    return run


def torch_sparse_mla(q, kv_flat, rows, valid, scale):
    """Plain PyTorch: gather the selected latents, bf16 matmuls, fp32 softmax."""
    return gathered_attention(q, kv_flat[rows], valid, scale, D_V)  # [b, h, d_v]


def mla_rows(c: Context, shape: str, heads: int, batches, contexts):
    from ..kernels import sparse_mla_decode

    fmla, fstatus = kernel_anchors.load_flash_mla()
    sgl, sstatus = kernel_anchors.load_sglang_triton(c.sglang_dir)
    if c.device != "cuda":
        fmla = sgl = None
    c.doc["anchors"]["flash_mla"], c.doc["anchors"]["sglang_triton"] = fstatus, sstatus
    scale = D_QK ** -0.5
    for ctx in contexts:
        for b in batches:
            cache, page_table, rows = paged_cache(b, ctx, D_QK, torch.bfloat16, c.device)
            flat = cache.view(-1, 1, D_QK)
            sets = []
            for _ in range(3):                                      # rotating queries and index sets
                idx = torch.rand(b, ctx, device=c.device).topk(TOPK, dim=1).indices.int()  # [b, topk]
                sets.append((torch.randn(b, heads, D_QK, device=c.device).bfloat16(), idx,
                             rows.gather(1, idx.long()).int()))
            flops = 2.0 * b * heads * TOPK * (D_QK + D_V)
            nbytes = b * (TOPK * (2 * D_QK + 4) + heads * (D_QK + D_V) * 2)
            extra = {"batch": b, "context": ctx, "heads": heads}
            ours = [lambda s=s: sparse_mla_decode(s[0], cache, page_table, s[1], scale, config=c.mla_config)
                    for s in sets]
            ref_out = ours[0]().clone()
            ms, timing = c.bench.ms_graph(ours)
            c.doc["rows"].append(c.row("sparse_mla_decode", shape, "triton (ours)", ms,
                                       flops, nbytes, c.ceil, timing=timing, **extra))
            valid = torch.ones(b, TOPK, dtype=torch.bool, device=c.device)
            base = [lambda s=s: torch_sparse_mla(s[0], cache.view(-1, D_QK), s[2], valid, scale) for s in sets]
            _anchor(c, "sparse_mla_decode", shape, "torch gather+matmul", base, ref_out, flops, nbytes, extra)
            if fmla is not None:
                fl = [lambda s=s: fmla(s[0], flat, s[2].view(b, 1, TOPK), scale) for s in sets]
                _anchor(c, "sparse_mla_decode", shape, "flash_mla sparse_fwd (SM90 legacy)", fl, ref_out,
                        flops, nbytes, extra)
            if sgl is not None:
                sg = [lambda s=s: sgl(s[0][..., :D_V], s[0][..., D_V:], flat, s[2].view(b, 1, TOPK), scale)
                      for s in sets]
                _anchor(c, "sparse_mla_decode", shape, "sglang triton decode", sg, ref_out, flops, nbytes, extra)
            del cache, flat, sets, rows
            c.bench.empty_cache()


def _anchor(c: Context, kind, shape, impl, fns, ref_out, flops, nbytes, extra):
    """Time an anchor; record its max difference from our output on the same inputs."""
    try:
        got = fns[0]()
        got = got.reshape(ref_out.shape)
        diff = (got.float() - ref_out.float()).abs().max().item()
        ms, timing = c.bench.ms_graph(fns)
        c.doc["rows"].append(c.row(kind, shape, impl, ms, flops, nbytes, c.ceil,
                                   max_diff_vs_ours=round(diff, 5), timing=timing, **extra))
    except Exception as exc:                                        # noqa: BLE001 - an anchor may not run
        c.doc["anchors"][f"{impl} @ {shape} b={extra.get('batch')}"] = f"failed: {type(exc).__name__}: {exc}"[:300]


def torch_indexer_decode(q, w, kc_flat, rows, scale, topk):
    """Plain PyTorch: gather K, bf16 logits, relu, weighted head sum in fp32, top-k."""
    scores = index_scores(q[:, None], w[:, None], kc_flat[rows], scale)[:, 0]  # [b, L]
    return scores.topk(min(topk, scores.shape[1]), dim=1).indices


def indexer_decode_rows(c: Context, shape: str, heads: int, batches, contexts):
    from ..kernels import indexer_topk as it
    from ..kernels.indexer_scores import decode_scores

    c.doc["anchors"]["deep_gemm"] = kernel_anchors.probe_deep_gemm() + " (indexer compared with the FLOP/byte floor)"
    for ctx in contexts:
        for b in batches:
            cache, page_table, rows = paged_cache(b, ctx, D_IDX, torch.bfloat16, c.device)
            lens = torch.full((b,), ctx, dtype=torch.int32, device=c.device)
            qs = [torch.randn(b, heads, D_IDX, device=c.device).bfloat16() for _ in range(3)]
            w = torch.rand(b, heads, device=c.device)
            extra = {"batch": b, "context": ctx, "heads": heads}
            flops = 2.0 * b * heads * ctx * D_IDX
            for dtype in ("bf16", "fp8"):
                kc, ks, elem = cache, None, 2
                if dtype == "fp8":
                    kc, ks, elem = cache.to(torch.float8_e4m3fn), torch.rand(cache.shape[:2], device=c.device), 1
                nbytes = b * ctx * (D_IDX * elem + (4 if ks is not None else 0))
                fns = [lambda q=q, kc=kc, ks=ks: it.indexer_topk_decode(q, w, kc, page_table, lens, TOPK, 0.1,
                                                                          k_scale=ks) for q in qs]
                c.doc["rows"].append(c.row("indexer_decode", shape, f"triton {dtype} (ours)", c.bench.ms(fns),
                                           flops, nbytes, c.ceil, **extra))

                buf = torch.empty(b, ctx, device=c.device)

                def scores_only(q=qs[0], kc=kc, ks=ks, buf=buf):
                    decode_scores(q, w, kc, page_table, lens, 0.1, buf, k_scale=ks)
                c.doc["rows"].append(c.row("indexer_decode", shape, f"triton {dtype} scores only",
                                           c.bench.ms(scores_only), flops, nbytes, c.ceil, **extra))
            if b * heads * ctx <= 1 << 30:
                base = [lambda q=q: torch_indexer_decode(q, w, cache.view(-1, D_IDX), rows, 0.1, TOPK) for q in qs]
                c.doc["rows"].append(c.row("indexer_decode", shape, "torch gather+einsum+topk", c.bench.ms(base),
                                           flops, b * ctx * D_IDX * 2, c.ceil, **extra))
            del cache, rows
            c.bench.empty_cache()


def torch_indexer_prefill(q, w, k, scale, topk, chunk=1024):
    """Plain PyTorch, one request: per chunk of 1024 queries, logits over the keys so far, top-k."""
    return torch_prefill(q, w, k, topk, scale, budget_bytes=chunk * q.shape[1] * q.shape[0] * q.element_size())


def indexer_prefill_rows(c: Context, shape: str, heads: int, contexts):
    from ..kernels import indexer_topk as it

    for n in contexts:
        q = torch.randn(n, heads, D_IDX, device=c.device).bfloat16()
        k = torch.randn(n, D_IDX, device=c.device).bfloat16()
        w = torch.rand(n, heads, device=c.device)
        cu = torch.tensor([0, n], dtype=torch.int32, device=c.device)
        flops = 1.0 * heads * D_IDX * n * (n + 1)
        nbytes = n * (heads * D_IDX * 2 + D_IDX * 2 + heads * 4 + TOPK * 4)
        extra = {"batch": 1, "context": n, "heads": heads}
        c.doc["rows"].append(c.row("indexer_prefill", shape, "triton (ours)", c.bench.ms(
            lambda: it.indexer_topk_prefill(q, w, k, cu, TOPK, 0.1)), flops, nbytes, c.ceil, **extra))

        scores_only = prefill_scores_only(q, w, k, None, cu, {})
        c.doc["rows"].append(c.row("indexer_prefill", shape, "triton scores only", c.bench.ms(scores_only),
                                   flops, nbytes, c.ceil, **extra))
        c.doc["rows"].append(c.row("indexer_prefill", shape, "triton scores + torch.topk", c.bench.ms(
            lambda: it.indexer_topk_prefill(q, w, k, cu, TOPK, 0.1, selector="torch")), flops, nbytes, c.ceil,
            **extra))
        if n <= 32768:
            c.doc["rows"].append(c.row("indexer_prefill", shape, "torch chunked einsum+topk", c.bench.ms(
                lambda: torch_indexer_prefill(q, w, k, 0.1, TOPK)), flops, nbytes, c.ceil, **extra))
        del q, k, w
        c.bench.empty_cache()


SWEEP_CONFIGS = [  # (block_h, block_n, num_warps, num_stages, num_splits or None = auto)
    (64, 64, 8, 2, None), (64, 64, 8, 2, 1), (64, 64, 8, 2, 2), (64, 64, 8, 2, 4), (64, 64, 8, 2, 8),
    (64, 32, 8, 3, None), (64, 32, 8, 2, None), (32, 32, 4, 2, None), (32, 64, 4, 2, None),
    (16, 64, 4, 2, None),
]


def mla_sweep(c: Context, heads: int, batches, ctx: int = 32768):
    """Our sparse MLA decode under each launch config of ``SWEEP_CONFIGS`` (rows marked ``sweep``)."""
    from ..kernels import sparse_mla_decode

    for b in batches:
        cache, page_table, _ = paged_cache(b, ctx, D_QK, torch.bfloat16, c.device)
        q = torch.randn(b, heads, D_QK, device=c.device).bfloat16()
        idx = torch.rand(b, ctx, device=c.device).topk(TOPK, dim=1).indices.int()
        flops = 2.0 * b * heads * TOPK * (D_QK + D_V)
        nbytes = b * (TOPK * (2 * D_QK + 4) + heads * (D_QK + D_V) * 2)
        for bh, bn, nw, ns, sp in SWEEP_CONFIGS:
            cfg = {"block_h": bh, "block_n": bn, "num_warps": nw, "num_stages": ns}
            try:
                ms, _ = c.bench.ms_graph(lambda: sparse_mla_decode(q, cache, page_table, idx, 0.04, config=cfg,
                                                                  num_splits=sp))
            except Exception as exc:                                # noqa: BLE001 - e.g. out of shared memory
                c.doc["anchors"][f"sweep {cfg} b={b}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            impl = f"triton {bh}/{bn}/{nw}/{ns} splits={sp or 'auto'}"
            c.doc["rows"].append(c.row("sparse_mla_decode", f"sweep h={heads}", impl, ms, flops, nbytes, c.ceil,
                                       batch=b, context=ctx, heads=heads, sweep=True))
        del cache
        c.bench.empty_cache()
