"""SGLang 0.5.17's DSA kernels called as its DSA backend calls them, the layouts it keeps, and the
PyTorch stand-ins used only by the CPU smoke test of ``scripts/gpu_kernel_compare.py``.

Read in SGLang 0.5.17 (``srt/layers/attention/dsa/dsa_indexer.py``, ``dsa_topk_backend.py``,
``dsa_backend.py``, ``srt/mem_cache/memory_pool.py``) and the wheels it pins (sgl-deep-gemm 0.1.5.post1,
sglang-kernel 0.4.5):

- **Prefill indexer** (``Indexer._get_topk_ragged``): ``deep_gemm.fp8_mqa_logits(q_fp8 [t, h, 128],
  (k_fp8 [n, 128], k_scale [n] fp32), weights [t, h] fp32, ks [t], ke [t] int32, clean_logits=False)``
  -> logits ``[t, n]`` fp32, row ``r`` valid in columns ``ks[r] .. ke[r]-1`` only (q heads < 32 padded
  to 32 first, ``_pad_heads_for_deep_gemm``). For one request with a cached prefix, ``ks = 0`` and
  ``ke[r] = position + 1``. ``k_fp8``/``k_scale`` are gathered from the paged index-K cache
  (``get_index_k_scale_buffer``); the query scale of each (token, head) is folded into ``weights``
  (``fused_q_indexer_rope_first_quant``).
- **Decode indexer** (``Indexer._get_topk_paged`` -> ``deepgemm_paged_mqa_logits_split``):
  ``deep_gemm.fp8_paged_mqa_logits(q_fp8 [b, 1, h, 128], kv_cache [num_pages, 64, 1, 132] uint8,
  weights [b, h], context_lens [b, 1] int32, block_table [b, max_pages] int32, schedule_meta,
  max_context_len = max_pages * 64, clean_logits=False)`` -> ``[b, max_context_len]`` fp32, with
  ``schedule_meta = deep_gemm.get_paged_mqa_logits_metadata(context_lens, 64, num_sms)`` computed once
  per forward (``init_forward_metadata``), not per layer.
- **Top-k** (``DSATopKBackend.SGL_KERNEL``): the radix select of sgl-kernel's ``topk.cu`` over each
  row's ``[row_start, row_start + length)``. SGLang calls it fused with an index transform
  (``fast_topk_transform_fused`` / ``..._ragged_fused``; decode on Hopper: the JIT
  ``topk_transform_512_v2``); the comparison takes ``sgl_kernel.fast_topk_v2(score, lengths, 2048,
  row_starts)``, the same selection returning positions relative to ``row_start``.
- **Index-K cache**: per layer ``[num_pages, 64 * 132]`` uint8; page ``i`` holds its 64 x 128 fp8 e4m3
  values (``buf[i, :8192]``) followed by 64 fp32 scales (``buf[i, 8192:]``), key = value x scale.
- **Sparse MLA** (``--dsa-prefill-backend flashmla_sparse --dsa-decode-backend flashmla_sparse``, what
  the bf16-KV server on the H200 ran; ``_forward_flashmla_sparse``):
  ``sgl_kernel.flash_mla.flash_mla_sparse_fwd(q [s_q, h, 576] bf16 (h padded to a multiple of 64),
  kv [slots, 1, 576] bf16, indices [s_q, 1, topk] int32 flat cache slots (-1 skipped), sm_scale,
  d_v=512, topk_length [s_q] int32)`` -> ``(out [s_q, h, 512], max_logits, lse)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from sglang_indexcache.kernels.reference import index_scores, sparse_mla_decode_ref

PAGE = 64
D_INDEX = 128
FP8_MAX = 448.0


@dataclasses.dataclass
class SglangOps:
    """The SGLang-side functions of the comparison (``real=False``: PyTorch stand-ins, smoke test only)."""

    name: str
    real: bool
    mqa_logits: Callable        # (q_fp8, k_fp8, k_scale, weights, ks, ke) -> [t, n] fp32
    topk: Callable              # (logits, lengths, topk, row_starts=None) -> [t, topk] int32
    paged_meta: Callable        # (seq_lens [b] int32) -> schedule metadata
    paged_logits: Callable      # (q_fp8 [b, h, d], index_buf, weights [b, h], seq_lens, page_table, meta)
    sparse_mla: Callable        # (q [s, h, 576], kv_flat [slots, 1, 576], slots [s, topk], sm_scale, lens)


# ------------------------------------------------------------------ layouts and quantization ---------

def quant_rows_fp8(x: torch.Tensor):
    """Per-row e4m3 quantization: ``(x_fp8, scale)`` with ``scale = amax / 448`` over the last dim, as
    DeepGEMM's tests build the index-K cache. ``x [..., d]`` -> ``[..., d]`` fp8, ``[...]`` fp32."""
    scale = x.float().abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def quant_queries_fp8(q: torch.Tensor, weights: torch.Tensor):
    """Index queries as SGLang hands them to DeepGEMM: fp8 per (token, head), the scale folded into
    the head weights (``relu(a x) = a relu(x)``, ``a > 0``). ``q [t, h, d]``, ``weights [t, h]`` fp32."""
    q_fp8, q_scale = quant_rows_fp8(q)                              # [t, h, d], [t, h]
    return q_fp8, weights.float() * q_scale


def index_k_buffer(k_fp8: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """SGLang's paged index-K cache of one layer, ``[num_pages, 64 * 132]`` uint8, from flat slots:
    ``k_fp8 [num_pages * 64, 128]`` e4m3 and ``k_scale [num_pages * 64]`` fp32 (slot = page * 64 + i)."""
    pages = k_fp8.shape[0] // PAGE
    buf = torch.empty(pages, PAGE * (D_INDEX + 4), dtype=torch.uint8, device=k_fp8.device)
    buf[:, :PAGE * D_INDEX] = k_fp8.reshape(pages, PAGE * D_INDEX).view(torch.uint8)
    buf[:, PAGE * D_INDEX:] = k_scale.float().reshape(pages, PAGE).contiguous().view(torch.uint8)
    return buf


def index_k_views(buf: torch.Tensor):
    """Views (no copy) of an index-K buffer: ``k_cache [num_pages, 64, 128]`` e4m3 with page stride
    8448 bytes, ``k_scale [num_pages, 64]`` fp32 with page stride 2112 elements."""
    pages = buf.shape[0]
    k_cache = buf[:, :PAGE * D_INDEX].view(torch.float8_e4m3fn).view(pages, PAGE, D_INDEX)
    k_scale = buf[:, PAGE * D_INDEX:].view(torch.float32)           # [num_pages, 64]
    return k_cache, k_scale


def flat_slots(page_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Flat cache slots ``[b, n]`` int32 (``page * 64 + offset``, -1 kept) of ``positions [b, n]``."""
    pos = positions.long()
    slots = page_table.long().gather(1, pos.clamp(min=0) // PAGE) * PAGE + pos.clamp(min=0) % PAGE
    return torch.where(pos < 0, -1, slots).int()


# ------------------------------------------------------------------ the real kernels ----------------

def _pad_heads(q_fp8, weights):
    """``_pad_heads_for_deep_gemm``: fewer than 32 heads are padded to 32 (zero weights)."""
    h = q_fp8.shape[1]
    if h >= 32:
        return q_fp8, weights
    q = torch.nn.functional.pad(q_fp8.view(torch.uint8), (0, 0, 0, 32 - h)).view(torch.float8_e4m3fn)
    return q, torch.nn.functional.pad(weights, (0, 32 - h))


def load_sglang_ops() -> SglangOps:
    """DeepGEMM, sgl-kernel's top-k and FlashMLA (sgl-kernel build) as SGLang 0.5.17 calls them.
    Raises ImportError (with the reason) when the stack does not load."""
    import deep_gemm
    from sgl_kernel import fast_topk_v2
    from sgl_kernel.flash_mla import flash_mla_sparse_fwd

    num_sms = deep_gemm.get_num_sms()

    def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke):
        q, w = _pad_heads(q_fp8, weights)
        return deep_gemm.fp8_mqa_logits(q, (k_fp8, k_scale), w, ks, ke, clean_logits=False)

    def paged_meta(seq_lens):
        return deep_gemm.get_paged_mqa_logits_metadata(seq_lens.int().unsqueeze(-1), PAGE, num_sms)

    def paged_logits(q_fp8, buf, weights, seq_lens, page_table, meta):
        kv = buf.view(buf.shape[0], PAGE, 1, D_INDEX + 4)
        return deep_gemm.fp8_paged_mqa_logits(q_fp8.unsqueeze(1), kv, weights, seq_lens.int().unsqueeze(-1),
                                              page_table, meta, page_table.shape[1] * PAGE, clean_logits=False)

    def topk(logits, lengths, k, row_starts=None):
        return fast_topk_v2(logits, lengths, k, row_starts=row_starts)

    def sparse_mla(q, kv_flat, slots, sm_scale, topk_length=None):
        s, h, d = q.shape
        pad = -h % 64                                               # Hopper: heads in multiples of 64
        q_in = torch.cat([q, q.new_zeros(s, pad, d)], 1) if pad else q
        out = flash_mla_sparse_fwd(q=q_in, kv=kv_flat, indices=slots.unsqueeze(1), sm_scale=sm_scale,
                                   d_v=512, topk_length=topk_length)[0]
        return out[:, :h] if pad else out

    version = getattr(deep_gemm, "__version__", "?")
    return SglangOps(f"deep_gemm {version} + sgl_kernel fast_topk_v2 + sgl_kernel flash_mla_sparse_fwd",
                     True, mqa_logits, topk, paged_meta, paged_logits, sparse_mla)


# ------------------------------------------------------------------ PyTorch stand-ins (smoke only) ---

def _ref_topk(logits, lengths, k, row_starts=None):
    rows, n = logits.shape
    start = torch.zeros(rows, dtype=torch.long) if row_starts is None else row_starts.long().cpu()
    cols = torch.arange(n)[None, :]
    end = start[:, None] + lengths.long().cpu()[:, None]
    masked = logits.float().cpu().masked_fill((cols < start[:, None]) | (cols >= end), float("-inf"))
    kk = min(k, n)
    vals, idx = masked.topk(kk, dim=1)
    out = torch.full((rows, k), -1, dtype=torch.int32)
    out[:, :kk] = torch.where(vals == float("-inf"), -1, idx - start[:, None]).int()
    return out.to(logits.device)


def _ref_mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke):
    keys = k_fp8.float() * k_scale.float()[:, None]                 # [n, d]
    out = index_scores(q_fp8.float(), weights.float(), keys, 1.0)  # [t, n]
    cols = torch.arange(keys.shape[0], device=out.device)[None, :]
    return out.masked_fill((cols < ks[:, None]) | (cols >= ke[:, None]), float("nan"))  # unwritten


def _ref_paged_logits(q_fp8, buf, weights, seq_lens, page_table, meta):
    k_cache, k_scale = index_k_views(buf)
    keys = (k_cache.float() * k_scale[..., None]).reshape(-1, D_INDEX)  # [slots, d]
    width = page_table.shape[1] * PAGE
    pos = torch.arange(width, device=buf.device)
    slots = flat_slots(page_table, pos.expand(page_table.shape[0], -1)).long()  # [b, width]
    out = index_scores(q_fp8.float()[:, None], weights.float()[:, None], keys[slots], 1.0)[:, 0]  # [b, width]
    return out.masked_fill(pos[None, :] >= seq_lens[:, None], float("nan"))


def _ref_sparse_mla(q, kv_flat, slots, sm_scale, topk_length=None):
    s = q.shape[0]
    ident = torch.arange(kv_flat.shape[0] // PAGE, dtype=torch.int32, device=q.device).expand(s, -1)
    return sparse_mla_decode_ref(q, kv_flat.view(-1, PAGE, kv_flat.shape[-1]), ident, slots, sm_scale)


def reference_ops() -> SglangOps:
    """PyTorch stand-ins with the same signatures: the CPU smoke test only, never a real run."""
    return SglangOps("PyTorch references standing in for SGLang's kernels (smoke test only)", False,
                     _ref_mqa_logits, _ref_topk, lambda seq_lens: None, _ref_paged_logits, _ref_sparse_mla)
