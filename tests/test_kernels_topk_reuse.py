"""Decode-stride top-k reuse in serving (``kernels/topk_reuse.py``).

Two layers of checks: the reference ``merge_reused_topk_ref`` against the rule the quality study
measured (``models/decode_reuse.reuse_topk``, the lowest-scored stored entries dropped first), on
random blocks; the Triton kernel against the reference under Triton's CPU interpreter, on random
stores with short prefixes, garbage rows (CUDA-graph padding), steps far past the refresh and
positions outside the page table. ``out`` is a poisoned view of a wider buffer: an unwritten slot or
a write outside the rows fails.
"""

from __future__ import annotations

import pytest
import torch

from sglang_indexcache.kernels import testing
from sglang_indexcache.kernels import topk_reuse as tr
from sglang_indexcache.models import decode_reuse

SENTINEL = -7


def _stored_block(batch: int, seq: int, stride: int, k: int, gen: torch.Generator):
    """What a refresh query ``t0 = r * stride`` of every row stores: its top-k of random scores over
    keys ``<= t0``, sorted best first, as ``decode_reuse`` takes it (``-inf`` score = no key)."""
    rows = decode_reuse.refresh_rows(seq, stride)                          # [R]
    scores = torch.rand(batch, rows.numel(), seq, generator=gen)           # [B, R, T]
    visible = torch.arange(seq)[None, None, :] <= rows[None, :, None]      # [1, R, T]
    scores = scores.masked_fill(~visible, float("-inf"))
    values, idx = scores.topk(k, dim=-1)                                   # [B, R, k] best first
    return idx.to(torch.int32), values, rows


@pytest.mark.parametrize("seq, stride, k", [
    (40, 4, 16, ),  # refreshes before and after the store is full (t0 + 1 < k, then >= k)
    (50, 8, 8),     # d reaches k - 1: all but one stored entry dropped
    (33, 1, 12),    # stride 1: every query is a refresh, the stored row as is
    (30, 3, 30),    # k = keys: the store never fills before the block ends
])
def test_reference_follows_the_measured_rule(seq, stride, k):
    gen = torch.Generator().manual_seed(seq * 100 + stride)
    batch = 3
    idx, values, rows = _stored_block(batch, seq, stride, k, gen)
    expected = decode_reuse.reuse_topk(idx, values, stride, seq, keys=seq)  # [B, S, k]
    stored_rows = torch.where(torch.isfinite(values), idx, torch.full_like(idx, -1))
    for t in range(seq):
        r, t0 = t // stride, (t // stride) * stride
        got = tr.merge_reused_topk_ref(
            stored_rows[:, r].contiguous(), torch.full((batch,), t0, dtype=torch.int32),
            torch.arange(batch), torch.full((batch,), t + 1))
        for b in range(batch):
            want = expected[b, t]
            assert set(got[b][got[b] >= 0].tolist()) == set(want[want <= t].tolist()), (t, b)
            assert (got[b] >= 0).sum() == min(t + 1, k), (t, b)            # the valid prefix SGLang reads
            assert (got[b][: int((got[b] >= 0).sum())] >= 0).all()
        if t0 + 1 >= k:                                                    # full store: column for column
            assert torch.equal(got, expected[:, t]), t


def test_lowest_scored_entries_are_dropped_first():
    stored = torch.tensor([[9, 3, 7, 1]], dtype=torch.int32)              # best first
    got = tr.merge_reused_topk_ref(stored, torch.tensor([10], dtype=torch.int32), torch.tensor([0]),
                                   torch.tensor([13]))                    # t = 12, d = 2
    assert got.tolist() == [[9, 3, 11, 12]]


def test_order_by_score_and_slots():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf"), 0.7]])
    unsorted = torch.tensor([[2, -1, 4, 1]], dtype=torch.int32)
    assert tr.order_by_score(unsorted, scores).tolist() == [[1, 4, 2, -1]]
    table = torch.tensor([[5, 2], [0, 0]], dtype=torch.int32)             # row 0: page 0 -> 5, page 1 -> 2
    pos = torch.tensor([[0, 3, 4, 7, 8, -1]], dtype=torch.int32)          # page size 4; 8 is past the table
    assert tr.positions_to_slots(pos, table, 4).tolist() == [[20, 23, 8, 11, -1, -1]]


def test_bad_inputs_are_refused():
    stored = torch.zeros(4, 8, dtype=torch.int32)
    pos = torch.zeros(4, dtype=torch.int32)
    rows = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="stored must be int32"):
        tr.merge_reused_topk_ref(stored.long(), pos, rows, rows)
    with pytest.raises(ValueError, match="refresh_pos"):
        tr.merge_reused_topk_ref(stored, pos[:3], rows, rows)
    with pytest.raises(ValueError, match="page_table"):
        tr.merge_reused_topk_ref(stored, pos, rows, rows, page_table=torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="CUDA device"):
        tr.merge_reused_topk(stored, pos, rows, rows)                     # a CPU tensor outside the interpreter


# ---------------------------------------------------------------- the Triton kernel (interpreter) --

@pytest.fixture(scope="module")
def worker():
    with testing.interpreter_worker() as pool:
        yield pool


CASES = [
    # slots R, k, batch, pages (None = positions), page size, block, reason
    (6, 16, 5, None, 64, 1024, "positions, one block per row"),
    (9, 40, 7, 3, 8, 16, "slots through a page table, k not a power of two, several blocks"),
    (5, 64, 4, 2, 16, 32, "positions past the table give -1"),
    (12, 8, 12, None, 64, 8, "duplicate rows (graph padding reads slot 0 many times)"),
]


@pytest.mark.parametrize("slots,k,batch,pages,page_size,block,reason", CASES,
                         ids=[c[-1].split(" ")[0] + str(i) for i, c in enumerate(CASES)])
def test_kernel_matches_reference(worker, slots, k, batch, pages, page_size, block, reason):
    worker.submit(_kernel_case, slots, k, batch, pages, page_size, block, reason).result()


def _kernel_case(slots, k, batch, pages, page_size, block, reason, seed=0):
    gen = torch.Generator().manual_seed(seed + slots * 7 + k)
    valid = torch.randint(0, k + 1, (slots,), generator=gen)               # stored prefix lengths (0..k)
    stored = torch.randint(0, 10_000, (slots, k), generator=gen, dtype=torch.int32)
    stored[torch.arange(k)[None, :] >= valid[:, None]] = -1
    refresh = torch.randint(-1, 200, (slots,), generator=gen, dtype=torch.int32)
    rows = torch.randint(0, slots, (batch,), generator=gen)
    if "duplicate" in reason:
        rows[batch // 2:] = 0
    # steps since the refresh: before it (garbage rows), the refresh itself, within k, far past k
    delta = torch.randint(-3, 2 * k + 3, (batch,), generator=gen)
    seq_lens = (refresh[rows].long() + 1 + delta).clamp(min=1)
    table = None
    if pages is not None:
        table = torch.randint(0, 500, (batch + 2, pages), generator=gen, dtype=torch.int32)
    for rows_t, lens_t in ((rows, seq_lens), (rows.int(), seq_lens.int())):
        expected = tr.merge_reused_topk_ref(stored, refresh, rows_t, lens_t, table, page_size)
        wide = torch.full((batch, k + 5), SENTINEL, dtype=torch.int32)
        out = wide[:, 2:2 + k]
        got = tr.merge_reused_topk(stored, refresh, rows_t, lens_t, table, page_size, out=out, block=block)
        assert got.data_ptr() == out.data_ptr()
        assert (wide[:, :2] == SENTINEL).all() and (wide[:, 2 + k:] == SENTINEL).all(), f"{reason}: wrote outside"
        mismatch = (got != expected).nonzero()
        assert mismatch.numel() == 0, (f"{reason}: {mismatch.shape[0]} entries differ, first at "
                                       f"{mismatch[0].tolist()}: {got[tuple(mismatch[0])]} vs "
                                       f"{expected[tuple(mismatch[0])]}")
