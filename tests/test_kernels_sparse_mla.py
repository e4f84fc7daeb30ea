"""Triton sparse MLA decode vs its fp32 reference, under Triton's CPU interpreter.

Cases run in a worker process started with TRITON_INTERPRET=1 (``interpreter_worker``), so this
pytest process is untouched. The cache is shuffled with NaN in every slot no request owns; outputs
and LSEs are NaN-poisoned before each run, so an unwritten element or a stray read fails.
"""

from __future__ import annotations

import pytest
import torch

from sglang_indexcache.kernels import reference as ref
from sglang_indexcache.kernels import testing

# (atol, rtol): fp32 far under 1e-3; bf16 output is rounded to bf16 and P is rounded to bf16 before
# the PV product (as FlashMLA does), so about 2^-8 relative.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


@pytest.fixture(scope="module")
def worker():
    with testing.interpreter_worker() as pool:
        yield pool


CASES = [
    # seq_lens, h, d_v, d_rope, topk, dtype, splits, config, reason
    ([100, 300, 40], 16, 32, 16, 40, torch.float32, 1, {"block_n": 16}, "one split, several pages"),
    ([130, 70], 20, 32, 16, 48, torch.float32, 3, {"block_n": 16}, "odd head count, split-K combine"),
    ([90, 200], 64, 32, 16, 64, torch.bfloat16, 2, {"block_n": 32}, "64 heads, bf16, 2 splits"),
    ([150], 128, 32, 16, 32, torch.bfloat16, 4, {"block_n": 16}, "128 heads in two head blocks, 4 splits"),
    ([70, 129], 16, 512, 64, 32, torch.bfloat16, 2, {"block_n": 16}, "real MLA dims 576 / 512"),
    ([130, 70, 50], 20, 32, 16, 48, torch.float32, 2, {"block_n": 16, "rows": "paged"},
     "earlier variant: page-table lookup in the loop"),
]


def _indices(seq_lens, topk):
    """Random distinct positions per request, -1 padded where the context is shorter than topk,
    plus scattered -1 entries; the last request gets none valid when there are 3+ requests."""
    rows = []
    for n in seq_lens:
        row = torch.randperm(n)[:topk].int()
        row = torch.cat([row, torch.full((topk - row.numel(),), -1, dtype=torch.int32)])
        row[torch.rand(topk) < 0.2] = -1
        rows.append(row[torch.randperm(topk)])
    idx = torch.stack(rows)                                          # [b, topk]
    if len(seq_lens) >= 3:
        idx[-1] = -1                                                 # a request with no valid index
    return idx


@pytest.mark.parametrize("seq_lens,h,d_v,d_rope,topk,dtype,splits,config,reason", CASES,
                         ids=[c[-1].split(",")[0].replace(" ", "-") for c in CASES])
def test_sparse_mla_matches_reference(worker, seq_lens, h, d_v, d_rope, topk, dtype, splits, config, reason):
    worker.submit(_case, seq_lens, h, d_v, d_rope, topk, dtype, splits, config, reason).result()


def _case(seq_lens, h, d_v, d_rope, topk, dtype, splits, config, reason):
    import importlib

    ops = importlib.import_module("sglang_indexcache.kernels.sparse_mla_decode")
    b, d_qk = len(seq_lens), d_v + d_rope
    kv_cache, page_table = testing.make_paged_cache(seq_lens, d_qk, dtype)
    q = torch.randn(b, h, d_qk).to(dtype)
    idx = _indices(seq_lens, topk)
    scale = d_qk ** -0.5
    out = torch.full((b, h, d_v), float("nan"), dtype=dtype)
    lse = torch.full((b, h), float("nan"))
    ops.sparse_mla_decode(q, kv_cache, page_table, idx, scale, d_v=d_v, return_lse=True,
                          num_splits=splits, config=config, out=out, lse=lse)
    exp_out, exp_lse = ref.sparse_mla_decode_ref(q, kv_cache, page_table, idx, scale, d_v=d_v, return_lse=True)
    assert not torch.isnan(exp_out).any(), "reference read a poisoned slot: bad test set-up"
    atol, rtol = TOLERANCE[dtype]
    testing.assert_close(out, exp_out, atol, rtol, name=f"{reason}: out")
    testing.assert_close(lse, exp_lse, 1e-5, 1e-5, name=f"{reason}: lse")
    if len(seq_lens) >= 3:
        assert torch.equal(out[-1].float(), torch.zeros(h, d_v)) and torch.isneginf(lse[-1]).all()


def test_without_lse_returns_output_only(worker):
    worker.submit(_no_lse_case).result()


def _no_lse_case():
    import importlib

    ops = importlib.import_module("sglang_indexcache.kernels.sparse_mla_decode")
    kv_cache, page_table = testing.make_paged_cache([80], 48)
    q = torch.randn(1, 16, 48)
    idx = _indices([80], 24)
    got = ops.sparse_mla_decode(q, kv_cache, page_table, idx, 0.2, d_v=32, config={"block_n": 16})
    assert isinstance(got, torch.Tensor) and got.shape == (1, 16, 32)
    testing.assert_close(got, ref.sparse_mla_decode_ref(q, kv_cache, page_table, idx, 0.2, d_v=32), 1e-5, 1e-5)


def test_assert_close_explains_mismatches():
    e = torch.tensor([1.0, 2.0, float("-inf")])
    testing.assert_close(torch.tensor([1.0, 2.0, float("-inf")]), e, 1e-6, 1e-6)
    with pytest.raises(AssertionError, match="1 NaN"):
        testing.assert_close(torch.tensor([float("nan"), 2.0, float("-inf")]), e, 1e-6, 1e-6)
    with pytest.raises(AssertionError, match="inf mismatches"):
        testing.assert_close(torch.tensor([1.0, 2.0, 0.0]), e, 1e-6, 1e-6)
    with pytest.raises(AssertionError, match=r"1/3 elements off .* max abs error 0\.5"):
        testing.assert_close(torch.tensor([1.0, 2.5, float("-inf")]), e, 1e-6, 1e-6)


@pytest.mark.parametrize("splits,rows", [(1, "flat"), (3, "flat"), (2, "paged")])
def test_plan_once_run_per_layer(worker, splits, rows):
    """One plan (launch config, split-K scratch, index rows) for an F layer's top-k, then one run per
    layer that reuses it (the F layer and its S layers: each its own q and cache over the same pages):
    every layer matches the reference, and the plan's remap ran once."""
    worker.submit(_plan_case, splits, rows).result()


def _plan_case(splits, rows):
    import importlib

    ops = importlib.import_module("sglang_indexcache.kernels.sparse_mla_decode")
    seq_lens, h, d_v, d_qk, topk = [130, 70, 90], 20, 32, 48, 48
    cache0, page_table = testing.make_paged_cache(seq_lens, d_qk)
    idx = _indices(seq_lens, topk)
    q0 = torch.randn(3, h, d_qk)
    calls = {"n": 0}
    remap = ops.flat_rows

    def counted(*a, **kw):
        calls["n"] += 1
        return remap(*a, **kw)

    ops.flat_rows = counted
    try:
        plan = ops.plan_sparse_mla(q0, cache0, page_table, idx, d_v=d_v, num_splits=splits,
                                   config={"block_n": 16, "rows": rows})
        for layer in range(3):                                      # F layer, then two S layers
            cache = cache0 if layer == 0 else torch.where(cache0.isnan(), cache0, torch.randn_like(cache0))
            q = q0 if layer == 0 else torch.randn(3, h, d_qk)
            out, lse = ops.run_sparse_mla(plan, q, cache, 0.2, return_lse=True)
            exp_out, exp_lse = ref.sparse_mla_decode_ref(q, cache, page_table, idx, 0.2, d_v=d_v, return_lse=True)
            testing.assert_close(out, exp_out, 1e-5, 1e-5, name=f"layer {layer}: out")
            testing.assert_close(lse, exp_lse, 1e-5, 1e-5, name=f"layer {layer}: lse")
    finally:
        ops.flat_rows = remap
    assert calls["n"] == (1 if rows == "flat" else 0), calls
    assert (plan.o_part is not None) == (splits > 1)
    with pytest.raises(ValueError, match="as planned"):
        ops.run_sparse_mla(plan, torch.randn(2, h, d_qk), cache0, 0.2)
    with pytest.raises(ValueError, match="as planned"):
        ops.run_sparse_mla(plan, q0, cache0[:-1], 0.2)
