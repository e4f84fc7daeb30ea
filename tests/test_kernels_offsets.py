"""Offsets past 2**31 in every Triton kernel, under Triton's CPU interpreter (issue 24).

On the H200 a prefill score tile of 16,384 rows x 200,000 keys (3.3e9 elements) was written through an
int32 offset ``row * stride`` that wrapped: a silently wrong top-k. These tests put the operands the
kernels index by row (score tiles, outputs, queries, LSEs, index rows) in ``testing.far_view``s: tiny
tensors whose row 2 starts 2**31 + 128 elements into a sparse file mapping, so the kernels compute the
same large offsets as at serving sizes without gigabytes of memory. A wrapped offset lands in the
mapping's first 2**31 elements (they exist: a wrong value, not a crash), and the result read back at
the right place is still the NaN / sentinel poison, or the operand read is zeros: the comparison with
the fp32 reference fails.
"""

from __future__ import annotations

import pytest
import torch

from sglang_indexcache.kernels import reference as ref
from sglang_indexcache.kernels import testing

SENTINEL = -7


@pytest.fixture(scope="module")
def worker():
    with testing.interpreter_worker() as pool:
        yield pool


def test_far_view_is_far_and_small():
    v = testing.far_view((3, 5))
    assert v.storage_offset() == 1 << 31 and v.stride() == (testing.FAR_STRIDE, 1)
    assert v.storage_offset() + 2 * v.stride(0) > 2 ** 31 + 2 ** 30         # row 2 past 2**31 from row 0
    assert v.isnan().all() and v.untyped_storage().nbytes() > 16 << 30     # 16 GiB mapped, a few pages used


def _ragged(lens, h, d):
    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(t, h, d), torch.randn(t, h), torch.randn(t, d), cu


def _prefill_case(where):
    from sglang_indexcache.kernels.indexer_scores import prefill_scores

    if where == "rows":                              # one request, the chunk's rows 64 .. 66 far apart
        lens, p0, n_rows, h = [70], 64, 3, 16
        out = testing.far_view((1, n_rows, p0 + n_rows), strides=(3 * testing.FAR_STRIDE, testing.FAR_STRIDE, 1))
    else:                                            # three requests, each one far from the last
        lens, p0, n_rows, h = [5, 6, 7], 0, 7, 20
        out = testing.far_view((3, n_rows, n_rows))
    q, w, k, cu = _ragged(lens, h, 32)
    prefill_scores(q, w, k, cu, 0.3, out, p0, n_rows, block_n=16)
    dense = ref.indexer_scores_prefill_ref(q, w, k, cu, 0.3)
    for i, n in enumerate(lens):
        for r in range(min(n_rows, n - p0)):
            pos = p0 + r
            testing.assert_close(out[i, r, :pos + 1], dense[int(cu[i]) + pos, :pos + 1], 1e-5, 1e-5,
                                 name=f"{where}: request {i} row {r}")
            past = out[i, r, pos + 1:]                 # unwritten (NaN) or -inf up to the block's last row
            assert (past.isnan() | past.isneginf()).all(), f"{where}: request {i} row {r}: a score past its position"


@pytest.mark.parametrize("where", ["rows", "requests"])
def test_prefill_scores_tile_past_2_31(worker, where):
    worker.submit(_prefill_case, where).result()


def _decode_case():
    from sglang_indexcache.kernels.indexer_scores import decode_scores

    seq_lens, h, d = [70, 5, 130], 16, 32
    cache, page_table = testing.make_paged_cache(seq_lens, d)
    q, w = torch.randn(3, h, d), torch.randn(3, h)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = testing.far_view((3, max(seq_lens)))
    decode_scores(q, w, cache, page_table, lens, 0.5, out, block_n=32, keys_per_prog=64)
    dense = ref.indexer_scores_decode_ref(q, w, cache, page_table, lens, 0.5)
    for i, n in enumerate(seq_lens):
        testing.assert_close(out[i, :n], dense[i, :n], 1e-5, 1e-5, name=f"request {i}")
        assert out[i, n:].isnan().all(), f"request {i} written past its length"


def test_decode_scores_rows_past_2_31(worker):
    worker.submit(_decode_case).result()


def _topk_case(sampled):
    from sglang_indexcache.kernels.topk import topk_rows
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    n, topk = 5000, 64
    scores = testing.far_view((3, n))
    scores.copy_(torch.randn(3, n))
    lengths = torch.tensor([n, 3000, 4000], dtype=torch.int32)
    out = testing.far_view((3, topk), torch.int32, fill=SENTINEL)
    if sampled:
        topk_rows_sampled(scores, topk, lengths=lengths, out=out, sample=256)
    else:
        topk_rows(scores, topk, lengths=lengths, out=out, block=256)
    assert not (out == SENTINEL).any(), "some outputs were never written"
    dense = scores.masked_fill(torch.arange(n)[None, :] >= lengths[:, None], float("-inf"))
    testing.check_topk(out.clone(), dense.clone(), topk, 0.0)


@pytest.mark.parametrize("sampled", [False, True], ids=["radix", "sampled"])
def test_topk_rows_past_2_31(worker, sampled):
    worker.submit(_topk_case, sampled).result()


def _mla_case(splits):
    from sglang_indexcache.kernels.sparse_mla_decode import sparse_mla_decode

    seq_lens, h, d_v, d_qk, topk = [100, 70, 130], 16, 32, 48, 40
    kv_cache, page_table = testing.make_paged_cache(seq_lens, d_qk)
    idx = torch.stack([torch.randperm(n)[:topk].int() for n in seq_lens])
    q = testing.far_view((3, h, d_qk))
    q.copy_(torch.randn(3, h, d_qk))
    out, lse = testing.far_view((3, h, d_v)), testing.far_view((3, h))
    sparse_mla_decode(q, kv_cache, page_table, idx, 0.2, d_v=d_v, return_lse=True, num_splits=splits,
                      config={"block_n": 16}, out=out, lse=lse)
    exp_out, exp_lse = ref.sparse_mla_decode_ref(q.clone(), kv_cache, page_table, idx, 0.2, d_v=d_v, return_lse=True)
    testing.assert_close(out, exp_out, 1e-5, 1e-5, name=f"{splits} splits: out")
    testing.assert_close(lse, exp_lse, 1e-5, 1e-5, name=f"{splits} splits: lse")


@pytest.mark.parametrize("splits", [1, 2])
def test_sparse_mla_rows_past_2_31(worker, splits):
    """Queries read and outputs / LSEs written at 64-bit offsets (one split: written by the attention
    kernel; two: by the combine kernel)."""
    worker.submit(_mla_case, splits).result()


def _flat_rows_case():
    from sglang_indexcache.kernels.sparse_mla_decode import flat_rows

    seq_lens = [100, 70, 130]
    _, page_table = testing.make_paged_cache(seq_lens, 4)
    idx = testing.far_view((3, 40), torch.int32, fill=0)
    idx.copy_(torch.stack([torch.randperm(n)[:40].int() for n in seq_lens]))
    idx[1, ::7] = -1
    rows = flat_rows(idx, page_table)
    want = [torch.where(idx[i] >= 0, ref.paged_rows(page_table[i], idx[i].clamp(min=0)), -1) for i in range(3)]
    assert torch.equal(rows.long(), torch.stack(want)), "flat rows differ from the page-table lookup"


def test_flat_rows_indices_past_2_31(worker):
    worker.submit(_flat_rows_case).result()


@pytest.mark.parametrize("fn", ["topk_rows", "topk_rows_sampled"])
def test_more_than_2_31_columns_is_refused(fn):
    """Column indices are int32: a row of 2**31 or more scores gets a clear error, never a wrong answer."""
    from sglang_indexcache.kernels import topk, topk_sampled

    scores = torch.zeros(1).expand(1, 1 << 31)                      # one element behind it: never read
    select = topk.topk_rows if fn == "topk_rows" else topk_sampled.topk_rows_sampled
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 columns"):
        select(scores, 8)
