"""The benchmark's view of the DSA kernels: which implementation runs the indexer and the attention.

Three kernel sets, all with the semantics of ``sglang_indexcache.kernels`` (KERNELS_API):

- ``triton``: the package's Triton kernels (GPU). Prefill attention calls ``sparse_mla_decode``
  with one "request" per query token (its page-table row repeated), in query chunks.
- ``torch``: the references' math, chunked so that memory stays bounded at any context: prefill
  indexer scores one block of queries against its causal keys at a time, prefill attention gathers
  the selected latents of a few queries at a time (truly sparse: only the top-k rows are read);
  decode calls the package's ``*_ref`` functions as they are. The CPU default; on a GPU it is the
  plain-PyTorch comparison.
- ``ref``: the package's ``*_ref`` functions for everything (quadratic memory: small sizes only).

Matrix products run in the activations' dtype (bf16 by default: the CPU's AMX units and the GPU's
tensor cores), scores and softmax in fp32.
"""

from __future__ import annotations

import os

import torch

from ..errors import UsageError
from ..kernels.reference import PAGE_SIZE, gathered_attention, index_scores, paged_rows, select_topk

API_NAMES = ("indexer_topk_prefill", "indexer_topk_decode", "sparse_mla_decode")
KERNEL_SETS = ("auto", "triton", "torch", "ref")


def load_api() -> tuple[dict, str]:
    """The six API functions (Triton kernel + ``_ref`` reference) of ``sglang_indexcache.kernels``."""
    from .. import kernels as package

    api = {}
    for name in API_NAMES:
        api[name] = getattr(package, name)
        api[f"{name}_ref"] = getattr(package, f"{name}_ref")
    return api, "sglang_indexcache.kernels"


class KernelSet:
    """Indexer and sparse attention for one request's prefill and for batched decode."""

    def __init__(self, name: str, device: torch.device, budget_bytes: int | None = None):
        self.api, self.source = load_api()
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name == "triton":
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise UsageError("--kernels triton needs a CUDA device; use --kernels torch on the CPU")
        self.name = name
        self.device = device
        self.budget = budget_bytes or ((1 << 30) if device.type == "cuda" else (1 << 27))
        self.select_topk = select_topk
        self._tables = None                                        # (page_row, [rows, max_pages])

    def describe(self) -> str:
        return f"{self.name} ({self.source})"

    # ------------------------------------------------------------------ prefill -------------
    def indexer_prefill(self, q, weights, k, topk: int, scale: float) -> torch.Tensor:
        """q [t, h, d], weights [t, h] fp32, k [t, d] of one request -> indices [t, topk] int32."""
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        if self.name == "triton":
            return self.api["indexer_topk_prefill"](q, weights, k, cu, topk, scale)
        if self.name == "ref":
            return self.api["indexer_topk_prefill_ref"](q, weights, k, cu, topk, scale)
        return self._indexer_prefill_chunked(q, weights, k, topk, scale)

    def _indexer_prefill_chunked(self, q, weights, k, topk, scale):
        return torch_indexer_prefill(q, weights.to(q.dtype), k, topk, scale, self.budget)  # bf16 head sum

    def attention_prefill(self, q, kv_cache, page_row, indices, sm_scale: float, d_v: int):
        """q [c, h, d_qk] of c query tokens of one request, kv_cache [pages, 64, d_qk], page_row
        [max_pages] int32 (the request's page table), indices [c, topk] -> out [c, h, d_v]."""
        c = q.shape[0]
        if self.name in ("triton", "ref"):
            fn = self.api["sparse_mla_decode" if self.name == "triton" else "sparse_mla_decode_ref"]
            return fn(q, kv_cache, self._page_table(page_row, c), indices, sm_scale, d_v)
        return self._attention_gather(q, kv_cache, page_row, indices, sm_scale, d_v)

    def _page_table(self, page_row, rows: int):
        """``[rows, max_pages]`` int32: the request's page row repeated, built once per request."""
        if self._tables is None or self._tables[0] is not page_row or self._tables[1].shape[0] < rows:
            self._tables = (page_row, page_row.unsqueeze(0).expand(rows, -1).contiguous())
        return self._tables[1][:rows]

    def _attention_gather(self, q, kv_cache, page_row, indices, sm_scale, d_v):
        return torch_sparse_mla(q, kv_cache, page_row, indices, sm_scale, d_v, self.budget)

    # ------------------------------------------------------------------ decode --------------
    def indexer_decode(self, q, weights, k_cache, page_table, seq_lens, topk: int, scale: float):
        """q [b, h, d], weights [b, h] fp32, k_cache [pages, 64, d], page_table [b, max_pages] -> [b, topk]."""
        if self.name == "triton":                                   # bound from the page table: no host
            return self.api["indexer_topk_decode"](q, weights, k_cache, page_table, seq_lens, topk, scale,
                                                   max_seq_len=page_table.shape[1] * PAGE_SIZE)  # sync
        return self.api["indexer_topk_decode_ref"](q, weights, k_cache, page_table, seq_lens, topk, scale)

    def attention_decode(self, q, kv_cache, page_table, indices, sm_scale: float, d_v: int):
        """q [b, h, d_qk], kv_cache [pages, 64, d_qk], indices [b, topk] -> out [b, h, d_v]."""
        name = "sparse_mla_decode" if self.name == "triton" else "sparse_mla_decode_ref"
        return self.api[name](q, kv_cache, page_table, indices, sm_scale, d_v)


def torch_indexer_prefill(q, weights, k, topk: int, scale: float, budget_bytes: int) -> torch.Tensor:
    """Causal indexer top-k of one request in plain PyTorch, ``indexer_topk_prefill``'s semantics.

    q [t, h, d], weights [t, h], k [t, d] -> indices [t, topk] int32 (-1 padded). Query blocks
    sized to ``budget_bytes`` are scored against their causal keys only (``reference.index_scores``:
    the products in q's dtype, the head sum in weights' dtype).
    """
    t, h, _ = q.shape
    out = torch.empty(t, topk, dtype=torch.int32, device=q.device)
    rows = max(1, min(t, budget_bytes // max(1, h * t * q.element_size())))
    for p0 in range(0, t, rows):
        p1 = min(t, p0 + rows)                                     # queries [p0, p1), keys [0, p1)
        scores = index_scores(q[p0:p1], weights[p0:p1], k[:p1], scale)   # [c, p1] fp32
        causal = torch.ones(p1 - p0, p1 - p0, dtype=torch.bool, device=q.device).triu_(1)
        scores[:, p0:p1].masked_fill_(causal, float("-inf"))
        out[p0:p1] = select_topk(scores, topk)
    return out


def torch_sparse_mla(q, kv_cache, page_row, indices, sm_scale: float, d_v: int, budget_bytes: int):
    """Sparse MLA of ``c`` query tokens of one request in plain PyTorch, truly sparse.

    q [c, h, d_qk], kv_cache [pages, 64, d_qk], page_row [max_pages] int32 (the request's page table),
    indices [c, topk] (-1 skipped) -> out [c, h, d_v]. The selected latent rows of a few queries at a
    time (``budget_bytes``) are gathered and attended (``reference.gathered_attention``).
    """
    c, h, d_qk = q.shape
    topk = indices.shape[1]
    flat = kv_cache.reshape(-1, d_qk)
    out = torch.empty(c, h, d_v, dtype=q.dtype, device=q.device)
    step = max(1, min(c, budget_bytes // max(1, topk * d_qk * q.element_size() * 2)))
    for a in range(0, c, step):
        idx = indices[a:a + step]                                  # [s, topk]
        rows = paged_rows(page_row, idx.clamp(min=0).reshape(-1)).view(idx.shape)
        kv = flat.index_select(0, rows.reshape(-1)).view(idx.shape[0], topk, d_qk)  # [s, topk, d_qk]
        out[a:a + step] = gathered_attention(q[a:a + step], kv, idx >= 0, sm_scale, d_v)  # [s, h, d_v]
    return out
