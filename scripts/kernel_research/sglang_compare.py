"""The cases of ``scripts/gpu_kernel_compare.py``: our Triton kernels against SGLang 0.5.17's on the
same inputs, in SGLang's layouts (``sglang_ops``), timed with their spread and checked against each
other and against fp32 references.

Inputs are random (``randn`` queries, keys and latents, ``randn / sqrt(h)`` head weights, random
distinct top-k positions, shuffled page tables). fp8 inputs are quantized once and handed to both
sides: index queries per (token, head) with the scale folded into the weights, keys per token
(``amax / 448``), as SGLang stores its index-K cache. Our bf16 rows use the unquantized tensors.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sglang_indexcache.bench.timing import Bench
from sglang_indexcache.kernels import indexer_topk_decode, indexer_topk_prefill, sparse_mla_decode
from sglang_indexcache.kernels.indexer_scores import prefill_scores
from sglang_indexcache.kernels.reference import index_scores, sparse_mla_decode_ref
from sglang_indexcache.kernels.sparse_mla_decode import mla_bytes, mla_flops
from sglang_indexcache.kernels.testing import assert_close
from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

from . import sglang_ops as so
from .compare_common import Case, exact_recall, floor_ms, overlap_summary

D, D_QK, D_V = 128, 576, 512
OURS_FP8 = "ours fp8 q+k"
OURS_FP8K = "ours bf16 q + fp8 keys"
OURS_FP8_INPLACE = "ours fp8 q+k, reading SGLang's index-K buffer in place"
OURS_BF16 = "ours bf16"
OURS = "ours"


@dataclasses.dataclass
class Env:
    device: torch.device
    ops: so.SglangOps
    bench: Bench
    ceil: dict                  # bf16_tflops, fp8_tflops, copy_gbps (measured in this run)
    topk: int = 2048
    chunk: int = 16384          # query tokens per prefill chunk (SGLang's --chunked-prefill-size)
    exact_rows: int = 8         # rows checked against the fp32 reference

    @property
    def sgl(self) -> str:
        return "sglang" if self.ops.real else "sglang stand-in (PyTorch reference, smoke only)"

    def floor(self, flops, nbytes, dtype: str) -> float:
        peak = self.ceil["fp8_tflops"] if dtype == "fp8" else self.ceil["bf16_tflops"]
        return round(floor_ms(flops, nbytes, peak, self.ceil["copy_gbps"]), 4)


def _exact_prefill(q_rows, w_rows, keys, lengths):
    """fp32 scores ``[r, n]`` of query rows against ``keys [n, d]``, -inf at columns >= ``lengths``."""
    out = torch.stack([index_scores(q_rows[i:i + 1].float(), w_rows[i:i + 1].float(), keys.float(), 1.0)[0]
                       for i in range(q_rows.shape[0])])
    cols = torch.arange(keys.shape[0], device=keys.device)[None, :]
    return out.masked_fill(cols >= lengths[:, None], float("-inf"))


def _prefill_inputs(env: Env, n_keys: int, heads: int, p0: int):
    dev = env.device
    q = torch.randn(n_keys, heads, D, device=dev, dtype=torch.bfloat16)   # ours reads rows p0.. only
    k = torch.randn(n_keys, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n_keys, heads, device=dev) * heads ** -0.5
    q8c, w8c = so.quant_queries_fp8(q[p0:], w[p0:])                # the chunk, as SGLang gets it
    q8 = torch.empty(n_keys, heads, D, device=dev, dtype=torch.float8_e4m3fn)
    q8.view(torch.uint8).fill_(0x7F)                                # NaN: rows before p0 never read
    q8[p0:] = q8c
    w8 = torch.full((n_keys, heads), float("nan"), device=dev)
    w8[p0:] = w8c
    k8, k_scale = so.quant_rows_fp8(k)                              # [n, d] e4m3, [n] fp32
    return q, k, w, q8c, w8c, q8, w8, k8, k_scale


def indexer_prefill(env: Env, n_keys: int, heads: int) -> Case:
    """The last chunk of a prefill: ``chunk`` queries at positions ``n_keys - chunk ..`` against keys
    ``0 .. position`` (what SGLang's indexer does per chunk of a chunked prefill)."""
    n_q = min(env.chunk, n_keys)
    p0, dev, topk = n_keys - n_q, env.device, env.topk
    case = Case(f"indexer-prefill h={heads} keys={n_keys}", "indexer_prefill",
                {"heads": heads, "keys": n_keys, "queries": n_q, "first_position": p0, "topk": topk})
    q, k, w, q8c, w8c, q8, w8, k8, k_scale = _prefill_inputs(env, n_keys, heads, p0)
    ks = torch.zeros(n_q, dtype=torch.int32, device=dev)
    ke = (p0 + 1 + torch.arange(n_q, device=dev)).int()            # exclusive end = position + 1
    cu = torch.tensor([0, n_keys], dtype=torch.int32, device=dev)
    tile = torch.empty(1, n_q, n_keys, device=dev)                  # one tile, as SGLang's logits

    def ours_scores(qq, ww, kk, sc):
        prefill_scores(qq, ww, kk, cu, 1.0, tile, p0, n_q, k_scale=sc)
        return tile[0]

    def ours(qq, ww, kk, sc):
        return topk_rows_sampled(ours_scores(qq, ww, kk, sc), topk, lengths=ke, check_fallback=True)

    def sgl_logits():
        return env.ops.mqa_logits(q8c, k8, k_scale, w8c, ks, ke)

    def sgl():
        return env.ops.topk(sgl_logits(), ke, topk, ks)

    pairs = heads * D * (n_q * p0 + n_q * (n_q + 1) // 2)          # causal (query, key) pairs x h x d
    io = n_q * (heads * 4 + topk * 4)
    case.floors_ms = {"fp8": env.floor(2 * pairs, io + n_q * heads * D + n_keys * (D + 4), "fp8"),
                      "bf16": env.floor(2 * pairs, io + 2 * n_q * heads * D + 2 * n_keys * D, "bf16")}
    case.notes.append("floors leave out the [queries, keys] fp32 score round trip both sides make")
    logits = sgl_logits()
    out_sgl = env.ops.topk(logits, ke, topk, ks)
    out8, out16 = ours(q8, w8, k8, k_scale), ours(q, w, k, None)
    ours_on_sgl = topk_rows_sampled(logits, topk, lengths=ke, check_fallback=True)
    case.check("overlap ours fp8 vs sglang", lambda: overlap_summary(out8, out_sgl))
    case.check("overlap ours bf16 vs sglang", lambda: overlap_summary(out16, out_sgl))
    case.check("overlap ours top-k vs sglang top-k, same logits", lambda: overlap_summary(ours_on_sgl, out_sgl))
    rows = torch.linspace(0, n_q - 1, min(env.exact_rows, n_q), device=dev).long()
    ref8 = _exact_prefill(q8c[rows], w8c[rows], k8.float() * k_scale[:, None], ke[rows])
    ref16 = _exact_prefill(q[p0 + rows], w[p0 + rows], k.float(), ke[rows])
    for name, sel, ref in (("sglang vs exact fp8", out_sgl, ref8), ("ours fp8 vs exact fp8", out8, ref8),
                           ("ours bf16 vs exact bf16", out16, ref16),
                           ("fp8 cost: sglang vs exact bf16", out_sgl, ref16)):
        case.check(name, lambda sel=sel, ref=ref: exact_recall(sel[rows], ref, topk))
    del out8, out16, ours_on_sgl, ref8, ref16
    b = env.bench
    case.measure(b, env.sgl, sgl, floor="fp8")
    case.measure(b, OURS_FP8, lambda: ours(q8, w8, k8, k_scale), floor="fp8")
    case.measure(b, OURS_BF16, lambda: ours(q, w, k, None), floor="bf16")
    case.measure(b, f"{env.sgl}: logits only", sgl_logits, floor="fp8")
    case.measure(b, f"{env.sgl}: top-k only", lambda: env.ops.topk(logits, ke, topk, ks))
    case.measure(b, f"{OURS_FP8}: scores only", lambda: ours_scores(q8, w8, k8, k_scale), floor="fp8")
    case.measure(b, "ours sampled top-k only (on sglang's logits)",
                 lambda: topk_rows_sampled(logits, topk, lengths=ke, check_fallback=True))
    for name in (OURS_FP8, OURS_BF16):
        case.ratio(name, env.sgl)
    return case


def whole_prefill(env: Env, n_keys: int, heads: int) -> Case:
    """A whole prefill of one request: ours as ``indexer_topk_prefill`` runs it (its own score tiles of
    at most 1 GiB) against SGLang's indexer once per chunk of ``chunk`` queries."""
    dev, topk, chunk = env.device, env.topk, env.chunk
    case = Case(f"whole-prefill h={heads} tokens={n_keys}", "whole_prefill",
                {"heads": heads, "tokens": n_keys, "sglang_chunk": chunk, "topk": topk})
    q = torch.randn(n_keys, heads, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n_keys, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n_keys, heads, device=dev) * heads ** -0.5
    q8, w8 = so.quant_queries_fp8(q, w)
    k8, k_scale = so.quant_rows_fp8(k)
    cu = torch.tensor([0, n_keys], dtype=torch.int32, device=dev)
    ends = (1 + torch.arange(n_keys, device=dev)).int()
    zeros = torch.zeros(n_keys, dtype=torch.int32, device=dev)
    out_sgl = torch.empty(n_keys, topk, dtype=torch.int32, device=dev)

    def sgl():
        for c0 in range(0, n_keys, chunk):
            c1 = min(n_keys, c0 + chunk)
            logits = env.ops.mqa_logits(q8[c0:c1], k8[:c1], k_scale[:c1], w8[c0:c1], zeros[c0:c1], ends[c0:c1])
            out_sgl[c0:c1] = env.ops.topk(logits, ends[c0:c1], topk, zeros[c0:c1])
        return out_sgl

    pairs = heads * D * n_keys * (n_keys + 1) // 2
    case.floors_ms = {"fp8": env.floor(2 * pairs, n_keys * (heads * (D + 4) + D + 4 + 4 * topk), "fp8"),
                      "bf16": env.floor(2 * pairs, n_keys * (heads * (2 * D + 4) + 2 * D + 4 * topk), "bf16")}
    case.notes.append("sglang side: chunks of contiguous fp8 keys (SGLang also gathers them from its paged "
                      "cache per chunk, not counted here)")
    sgl()
    out8 = indexer_topk_prefill(q8, w8, k8, cu, topk, 1.0, k_scale)
    case.check("overlap ours fp8 vs sglang", lambda: overlap_summary(out8, out_sgl))
    del out8
    case.measure(env.bench, env.sgl, sgl, floor="fp8")
    case.measure(env.bench, OURS_FP8, lambda: indexer_topk_prefill(q8, w8, k8, cu, topk, 1.0, k_scale), floor="fp8")
    case.measure(env.bench, OURS_BF16, lambda: indexer_topk_prefill(q, w, k, cu, topk, 1.0), floor="bf16")
    for name in (OURS_FP8, OURS_BF16):
        case.ratio(name, env.sgl)
    return case


def indexer_decode(env: Env, batch: int, n_keys: int, heads: int) -> Case:
    """One decode step: each of ``batch`` requests has ``n_keys`` cached index keys (CUDA graphs)."""
    dev, topk = env.device, env.topk
    per = math.ceil(n_keys / so.PAGE)
    case = Case(f"indexer-decode h={heads} b={batch} keys={n_keys}", "indexer_decode",
                {"heads": heads, "batch": batch, "keys": n_keys, "topk": topk})
    table = torch.randperm(batch * per, device=dev).int().view(batch, per)
    k = torch.randn(batch * per * so.PAGE, D, device=dev, dtype=torch.bfloat16)   # by flat slot
    k8, k_scale = so.quant_rows_fp8(k)
    buf = so.index_k_buffer(k8, k_scale)                            # SGLang's cache of this layer
    q = torch.randn(batch, heads, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(batch, heads, device=dev) * heads ** -0.5
    q8, w8 = so.quant_queries_fp8(q, w)
    lens = torch.full((batch,), n_keys, dtype=torch.int32, device=dev)
    meta = env.ops.paged_meta(lens)                                 # once per step in SGLang
    kc8, ks8 = k8.view(-1, so.PAGE, D), k_scale.view(-1, so.PAGE)   # the same values, split layout
    kc16 = k.view(-1, so.PAGE, D)
    bound = per * so.PAGE

    def sgl():
        return env.ops.topk(env.ops.paged_logits(q8, buf, w8, lens, table, meta), lens, topk)

    def ours(qq, ww, kc, sc):
        return indexer_topk_decode(qq, ww, kc, table, lens, topk, 1.0, sc, max_seq_len=bound)

    flops = 2.0 * batch * heads * n_keys * D
    case.floors_ms = {"fp8": env.floor(flops, batch * n_keys * (D + 4), "fp8"),
                      "bf16": env.floor(flops, batch * n_keys * 2 * D, "bf16")}
    kv8, sv8 = so.index_k_views(buf)                               # page-strided views, no copy
    out_sgl, out8 = sgl(), ours(q8, w8, kc8, ks8)
    out16, out_in = ours(q, w, kc16, None), ours(q8, w8, kv8, sv8)
    case.check("overlap ours fp8 vs sglang", lambda: overlap_summary(out8, out_sgl))
    case.check("overlap ours fp8 in place vs sglang", lambda: overlap_summary(out_in, out_sgl))
    case.check("overlap ours bf16 vs sglang", lambda: overlap_summary(out16, out_sgl))
    rows = torch.arange(min(batch, 4), device=dev)
    slots = so.flat_slots(table[rows], torch.arange(n_keys, device=dev).expand(len(rows), -1)).long()

    def exact(qq, ww, keys_of):
        return torch.cat([_exact_prefill(qq[i:i + 1], ww[i:i + 1], keys_of(slots[i]), lens[i:i + 1]) for i in rows])

    ref8 = exact(q8, w8, lambda s: k8[s].float() * k_scale[s][:, None])     # the request's keys only
    ref16 = exact(q, w, lambda s: k[s].float())
    for name, sel, ref in (("sglang vs exact fp8", out_sgl, ref8), ("ours fp8 vs exact fp8", out8, ref8),
                           ("ours bf16 vs exact bf16", out16, ref16)):
        case.check(name, lambda sel=sel, ref=ref: exact_recall(sel[rows], ref, topk))
    case.measure(env.bench, env.sgl, sgl, graph=True, floor="fp8")
    case.measure(env.bench, OURS_FP8, lambda: ours(q8, w8, kc8, ks8), graph=True, floor="fp8")
    case.measure(env.bench, OURS_FP8_INPLACE, lambda: ours(q8, w8, kv8, sv8), graph=True, floor="fp8")
    case.measure(env.bench, OURS_FP8K, lambda: ours(q, w, kc8, ks8), graph=True, floor="fp8")
    case.measure(env.bench, OURS_BF16, lambda: ours(q, w, kc16, None), graph=True, floor="bf16")
    for name in (OURS_FP8, OURS_FP8_INPLACE, OURS_FP8K, OURS_BF16):
        case.ratio(name, env.sgl)
    return case


def _mla_check(case: Case, ours_out, sgl_out, ref_out, n_ref: int):
    def close(a, b):
        diff = (a.float() - b.float()).abs()
        try:
            assert_close(a, b, 1e-2, 1e-2)
            ok = True
        except AssertionError:
            ok = False
        return {"max_abs_diff": round(float(diff.max()), 6), "within_bf16_tol_1e-2": ok}

    case.check("ours vs sglang (all rows)", lambda: close(ours_out, sgl_out))
    case.check(f"ours vs fp32 reference ({n_ref} rows)", lambda: close(ours_out[:n_ref], ref_out))
    case.check(f"sglang vs fp32 reference ({n_ref} rows)", lambda: close(sgl_out[:n_ref], ref_out))


def sparse_mla(env: Env, rows: int, n_keys: int, heads: int, prefill: bool) -> Case:
    """Sparse MLA over ``topk`` random distinct positions of a paged latent cache: decode (``rows``
    requests of ``n_keys`` tokens each) or prefill (``rows`` queries of one ``n_keys``-token request)."""
    dev, topk = env.device, env.topk
    per = math.ceil(n_keys / so.PAGE)
    kind = "mla_prefill" if prefill else "mla_decode"
    case = Case(f"{kind.replace('_', '-')} h={heads} {'queries' if prefill else 'b'}={rows} keys={n_keys}", kind,
                {"heads": heads, "rows": rows, "keys": n_keys, "topk": topk, "one_request": prefill})
    requests = 1 if prefill else rows
    kv = torch.randn(requests * per * so.PAGE, 1, D_QK, device=dev, dtype=torch.bfloat16)  # [slots, 1, 576]
    table = torch.randperm(requests * per, device=dev).int().view(requests, per)
    table = table.expand(rows, per).contiguous() if prefill else table   # each query: its request's row
    idx = torch.rand(rows, n_keys, device=dev).topk(topk, dim=1).indices.int()   # [rows, topk] distinct
    slots = so.flat_slots(table, idx)                               # what SGLang's top-k transform gives
    q = torch.randn(rows, heads, D_QK, device=dev, dtype=torch.bfloat16)
    scale = D_QK ** -0.5
    topk_len = torch.full((rows,), topk, dtype=torch.int32, device=dev)
    cache = kv.view(-1, so.PAGE, D_QK)

    def sgl():
        return env.ops.sparse_mla(q, kv, slots, scale, topk_len)

    def ours():
        return sparse_mla_decode(q, cache, table, idx, scale)

    kv_bytes = mla_bytes(rows, heads, topk)
    case.floors_ms = {"bf16": env.floor(mla_flops(rows, heads, topk), kv_bytes, "bf16")}
    if prefill:
        case.notes.append("floor counts each query's gathered rows (no row shared between queries)")
    n_ref = min(2, rows)
    out_o, out_s = ours().clone(), sgl().clone()
    ref = sparse_mla_decode_ref(q[:n_ref], cache, table[:n_ref], idx[:n_ref], scale)
    _mla_check(case, out_o, out_s, ref, n_ref)
    case.measure(env.bench, env.sgl, sgl, graph=True, floor="bf16")
    case.measure(env.bench, OURS, ours, graph=True, floor="bf16")
    case.ratio(OURS, env.sgl)
    return case
