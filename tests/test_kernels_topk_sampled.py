"""Sampled-threshold top-k (``kernels/topk_sampled.py``) vs ``reference.select_topk``, under Triton's
CPU interpreter (a worker process with TRITON_INTERPRET=1, as the other kernel tests).

The scores are a column slice of a wider buffer poisoned past each row's length with NaN and +inf (a
read past ``lengths`` would select a +inf column); ``out`` is poisoned before the run. Cases cover
the sampled path (long rows, several programs per row), the exhaustive path (rows no longer than the
sample), and rows where the sample must mislead (ties, a tiny capacity, scores sorted by column) so
that the whole-row fallback runs; ``fallback=False`` shows that those rows did need it.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_topk import NEG_INF, SENTINEL, _holes, _ints, _normal, worker  # noqa: F401 - shared inputs, fixture

from sglang_indexcache.kernels import testing


def _ramp(rows, n):
    """Increasing with the column (recent tokens score highest): the top-k is one end of the row."""
    return torch.arange(n).float().expand(rows, n) + torch.rand(rows, n) * 0.5


CASES = [
    # rows, n, lengths (None = n), topk, make, kwargs, reason
    (3, 20000, None, 64, _normal, {}, "long rows: the sampled path"),
    (2, 30000, [30000, 9000], 100, _normal, {"parts": 5}, "several programs per row"),
    (5, 3000, [3000, 0, 40, 256, 200], 64, _normal, {"sample": 256},
     "rows up to the sample's size: exhaustive"),
    (3, 12000, [12000, 11000, 5000], 128, _holes, {}, "-inf holes"),
    (2, 16000, None, 200, _ramp, {"parts": 4}, "top-k at one end of the row"),
    (3, 9000, None, 300, _ints, {}, "exact ties: the sample overflows the capacity, fallback"),
    (2, 20000, None, 64, _normal, {"capacity": 70, "target": 60}, "tiny capacity: fallback"),
]


def _case(rows, n, lengths, topk, make, kwargs):
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    wide = torch.full((rows, n + 37), float("nan"))
    wide[:, n + 1:] = float("inf")
    lens = torch.tensor(lengths if lengths is not None else [n] * rows, dtype=torch.int32)
    x = make(rows, n)
    for r in range(rows):
        wide[r, :int(lens[r])] = x[r, :int(lens[r])]
    scores = wide[:, :n]
    out = torch.full((rows, topk), SENTINEL, dtype=torch.int32)
    got = topk_rows_sampled(scores, topk, lengths=lens if lengths is not None else None, out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    assert not (out == SENTINEL).any(), "some outputs were never written"
    dense = torch.where(torch.arange(n)[None, :] < lens[:, None].long(), scores, NEG_INF)
    testing.check_topk(out, dense, topk, 0.0)


@pytest.mark.parametrize("rows,n,lengths,topk,make,kwargs,reason", CASES, ids=[c[-1].split(":")[0] for c in CASES])
def test_matches_reference(worker, rows, n, lengths, topk, make, kwargs, reason):
    worker.submit(_case, rows, n, lengths, topk, make, kwargs).result()


def _misled(fallback: bool):
    """Exact ties make the candidate lists overflow; without the fallback those rows come out -1."""
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    scores = torch.zeros(2, 9000)
    scores[:, ::7] = 1.0                                            # 1286 exact ties, top-k 300
    return topk_rows_sampled(scores, 300, capacity=400, target=350, sample=256, fallback=fallback)


def test_fallback_is_needed_and_used(worker):
    without = worker.submit(_misled, False).result()
    assert (without == -1).all(), "an overflowing row must not be selected from its partial list"
    with_fb = worker.submit(_misled, True).result()
    testing.check_topk(with_fb, (torch.arange(9000) % 7 == 0).float().expand(2, -1).clone(), 300, 0.0)


def _sampled_only():
    """The sampled path alone (no fallback) on seeded normal rows: every row right from its list."""
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    torch.manual_seed(0)
    scores = torch.randn(4, 60000)                                  # defaults: 4096 samples, 1.5 x k
    out = topk_rows_sampled(scores, 256, fallback=False)
    testing.check_topk(out, scores, 256, 0.0)


def test_sampled_path_alone(worker):
    worker.submit(_sampled_only).result()


def test_bad_arguments():
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    with pytest.raises(ValueError, match="topk must be a positive int"):
        topk_rows_sampled(torch.zeros(2, 8), 0)
    with pytest.raises(ValueError, match="float32"):
        topk_rows_sampled(torch.zeros(2, 8, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="lengths must be int32"):
        topk_rows_sampled(torch.zeros(2, 8), 2, lengths=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="capacity must be >= topk"):
        topk_rows_sampled(torch.zeros(2, 8), 4, capacity=3)
    with pytest.raises(ValueError, match="sample must be a power of two"):
        topk_rows_sampled(torch.zeros(2, 8), 4, sample=100)
