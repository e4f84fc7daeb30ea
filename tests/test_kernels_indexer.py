"""Triton lightning-indexer top-k vs its fp32 reference, under Triton's CPU interpreter.

Each case runs in one worker process started with TRITON_INTERPRET=1 (``interpreter_worker``): Triton
decides at import whether to interpret, so this pytest process and its other modules are untouched.
Inputs are drawn fresh; one head is made strictly positive so that scores have no ties (the
comparison is then exact as sets); outputs are poisoned with a sentinel before each run.
"""

from __future__ import annotations

import os

import pytest
import torch

from sglang_indexcache.kernels import reference as ref
from sglang_indexcache.kernels import testing

SENTINEL = -7
# Scores are fp32 sums of exact products of the (bf16 or fp32) inputs in both implementations, so
# they differ only by summation order: tight for both dtypes.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float8_e4m3fn: 1e-5}


@pytest.fixture(scope="module")
def worker():
    with testing.interpreter_worker() as pool:
        yield pool


def _tie_free(q, k):
    """Head 0 scores ``k[s, 0] > 0``, distinct per key: no ties, the other heads exercise relu."""
    q[:, 0] = 0
    q[:, 0, 0] = 1
    k[..., 0] = k[..., 0].abs() + 0.25


PREFILL_CASES = [
    # lens, h, d, topk, dtype, kwargs, reason
    ([1, 7, 40], 16, 32, 8, torch.float32, {}, "ragged; early positions have fewer than k candidates"),
    ([70, 33], 16, 32, 16, torch.float32, {"key_chunk": 16}, "running top-k merged over key chunks"),
    ([50, 90], 64, 32, 32, torch.bfloat16, {"key_chunk": 48}, "bf16, 64 heads, merge, odd chunk"),
    ([0, 45, 0, 12], 16, 32, 8, torch.float32, {"budget_bytes": 4 * 4 * 8 * 45},
     "empty requests; query positions walked in chunks of 8"),
    ([65], 64, 128, 16, torch.bfloat16, {"rows": 64, "block_n": 32}, "real index dims 64 x 128"),
    ([70, 9], 20, 32, 16, torch.bfloat16, {"keys_major": True, "block_n": 16, "selector": "torch"},
     "keys-major products, 20 heads padded to 32, torch.topk selector"),
    ([80, 30], 16, 32, 16, "fp8-keys", {"block_n": 16, "key_chunk": 32},
     "fp8 keys with per-token scales, bf16 queries, merged chunks"),
    ([60], 32, 32, 8, "fp8", {"rows": 64, "block_n": 16}, "fp8 queries and keys"),
]


@pytest.mark.parametrize("lens,h,d,topk,dtype,kwargs,reason", PREFILL_CASES,
                         ids=[c[-1].split(";")[0].replace(" ", "-") for c in PREFILL_CASES])
def test_prefill_matches_reference(worker, lens, h, d, topk, dtype, kwargs, reason):
    worker.submit(_prefill_case, lens, h, d, topk, dtype, kwargs, reason).result()


def _prefill_case(lens, h, d, topk, dtype, kwargs, reason):
    from sglang_indexcache.kernels import indexer_topk as ops

    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k = torch.randn(t, h, d), torch.randn(t, d)
    _tie_free(q, k)
    k_scale = None
    if dtype in ("fp8", "fp8-keys"):                               # e4m3 keys, per-token scales
        k, k_scale = k.to(torch.float8_e4m3fn), torch.rand(t) + 0.5
        q = q.to(torch.float8_e4m3fn if dtype == "fp8" else torch.bfloat16)
        dtype = torch.float8_e4m3fn
    else:
        q, k = q.to(dtype), k.to(dtype)
    w = torch.rand(t, h) + 0.1
    w[:, 1:] *= torch.sign(torch.randn(t, h - 1))                  # negative weights on other heads
    scale = d ** -0.5
    out = torch.full((t, topk), SENTINEL, dtype=torch.int32)
    got = ops.indexer_topk_prefill(q, w, k, cu, topk, scale, k_scale, out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    assert not (out == SENTINEL).any(), "some outputs were never written"
    scores = ref.indexer_scores_prefill_ref(q, w, k, cu, scale, k_scale)
    testing.check_topk(out, scores, topk, TOL[dtype], name=reason)
    expected = ref.indexer_topk_prefill_ref(q, w, k, cu, topk, scale, k_scale)
    assert torch.equal(out.sort(1).values, expected.sort(1).values), "tie-free inputs: sets must be equal"


DECODE_CASES = [
    # seq_lens, h, d, topk, dtype, kwargs, reason
    ([1, 5, 64, 130], 16, 32, 32, torch.float32, {}, "shorter than k, exactly one page, 3 pages"),
    ([200, 31, 0], 64, 32, 16, torch.bfloat16, {"key_chunk": 64}, "merge over chunks; empty request"),
    ([129, 300], 64, 128, 64, torch.bfloat16, {}, "real index dims 64 x 128"),
    ([90, 17], 128, 32, 16, torch.float32, {"block_n": 32}, "128 heads"),
    ([300, 77, 1], 32, 32, 16, torch.bfloat16, {"keys_per_prog": 64, "block_n": 32},
     "several programs per request (64 keys each)"),
    ([120, 40], 16, 32, 16, torch.float32, {"selector": "torch", "key_chunk": 64}, "torch.topk selector"),
    ([150, 70], 32, 64, 16, torch.float8_e4m3fn, {"key_chunk": 64}, "fp8 keys with per-token scales"),
    ([150, 70], 32, 128, 16, "fp8", {}, "fp8 queries and keys (SGLang's inputs)"),
    ([150, 70, 3], 32, 128, 16, "fp8-sglang", {"max_seq_len": 1 << 30},
     "fp8 queries and keys read in place from SGLang's fused index-K buffer (page-strided views)"),
    ([1, 5, 130], 16, 32, 32, torch.float32, {"max_seq_len": 1 << 30},
     "no host sync: bound from the page table (poisoned pages past it)"),
    ([200, 31, 0], 64, 32, 16, torch.bfloat16, {"max_seq_len": 200, "key_chunk": 64},
     "no host sync: caller's bound, merged chunks"),
]


@pytest.mark.parametrize("seq_lens,h,d,topk,dtype,kwargs,reason", DECODE_CASES,
                         ids=[c[-1].split(";")[0].split(",")[0].replace(" ", "-") for c in DECODE_CASES])
def test_decode_matches_reference(worker, seq_lens, h, d, topk, dtype, kwargs, reason):
    worker.submit(_decode_case, seq_lens, h, d, topk, dtype, kwargs, reason).result()


def _decode_case(seq_lens, h, d, topk, dtype, kwargs, reason):
    from sglang_indexcache.kernels import indexer_topk as ops

    b = len(seq_lens)
    fp8 = dtype in (torch.float8_e4m3fn, "fp8", "fp8-sglang")
    cache, page_table = testing.make_paged_cache(seq_lens, d, torch.float32)
    q = torch.randn(b, h, d)
    _tie_free(q, cache)
    k_scale = None
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
        k_scale = torch.rand(cache.shape[:2]) + 0.5                 # [num_pages, 64]
        q = q.to(torch.bfloat16 if dtype == torch.float8_e4m3fn else torch.float8_e4m3fn)
        if dtype == "fp8-sglang":                                   # [num_pages, 64 * (d + 4)] uint8
            pages = cache.shape[0]
            buf = torch.cat([cache.view(torch.uint8).reshape(pages, -1), k_scale.view(torch.uint8)], 1)
            cache = buf[:, :64 * d].view(torch.float8_e4m3fn).view(pages, 64, d)
            k_scale = buf[:, 64 * d:].view(torch.float32)            # page stride 64 * (d + 4) / 4
            assert cache.data_ptr() == buf.data_ptr() and not cache.is_contiguous()
        dtype = torch.float8_e4m3fn
    else:
        cache, q = cache.to(dtype), q.to(dtype)
    w = torch.rand(b, h) + 0.1
    w[:, 1:] *= torch.sign(torch.randn(b, h - 1))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.full((b, topk), SENTINEL, dtype=torch.int32)
    ops.indexer_topk_decode(q, w, cache, page_table, lens, topk, 0.5, k_scale=k_scale, out=out, **kwargs)
    assert not (out == SENTINEL).any(), "some outputs were never written"
    scores = ref.indexer_scores_decode_ref(q, w, cache, page_table, lens, 0.5, k_scale)
    assert not torch.isnan(scores).any(), "reference read a poisoned slot: bad test set-up"
    testing.check_topk(out, scores, topk, TOL[dtype], name=reason)


def test_check_topk_explains_a_wrong_set():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf")]])
    with pytest.raises(AssertionError, match="gathered scores"):
        testing.check_topk(torch.tensor([[0, 1]], dtype=torch.int32), scores, 2, 1e-6)
    with pytest.raises(AssertionError, match="wrong number of valid"):
        testing.check_topk(torch.tensor([[1, -1]], dtype=torch.int32), scores, 2, 1e-6)
    with pytest.raises(AssertionError, match="not candidates"):
        testing.check_topk(torch.tensor([[1, 2, 3]], dtype=torch.int32), scores, 3, 1e-6)
    testing.check_topk(torch.tensor([[2, 1, 0]], dtype=torch.int32), scores, 3, 1e-6)


def test_interpreter_does_not_leak(worker):
    """The worker interprets; this process keeps its environment and compiled kernels."""
    from sglang_indexcache.kernels import indexer_scores

    assert worker.submit(testing.worker_interprets).result()
    assert os.environ.get("TRITON_INTERPRET") in (None, "", "0")
    assert not testing.is_interpreted(indexer_scores._decode_kernel)
