"""Triton radix-select top-k (``kernels/topk.py``) vs ``reference.select_topk``, under Triton's CPU interpreter.

Each case runs in one worker process started with TRITON_INTERPRET=1 (``interpreter_worker``). The
scores are a column slice of a wider buffer (row stride != N) whose columns past each row's length
are poisoned with NaN and +inf: a read past ``lengths`` would select a +inf column. ``out`` is a
poisoned view of a wider buffer too, so unwritten slots and writes outside the row are caught.
"""

from __future__ import annotations

import pytest
import torch

from sglang_indexcache.kernels import reference as ref
from sglang_indexcache.kernels import testing

SENTINEL = -7
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def worker():
    with testing.interpreter_worker() as pool:
        yield pool


def _normal(rows, n):
    return torch.randn(rows, n) * 3


def _ints(rows, n):
    """Integers in a small range: thousands of exact ties at every threshold (incl. -0.0 vs +0.0)."""
    x = torch.randint(-3, 4, (rows, n)).float()
    return torch.where(torch.rand(rows, n) < 0.5, x, -x)


def _holes(rows, n):
    """Positive and negative values with -inf holes (non-candidates) in half the columns."""
    x = torch.randn(rows, n) * 100
    return x.masked_fill(torch.rand(rows, n) < 0.5, NEG_INF)


def _spread(rows, n):
    """Magnitudes over ~60 octaves and both signs, with tiny subnormals: every radix level matters."""
    x = torch.randn(rows, n) * torch.exp2(torch.randint(-140, 20, (rows, n)).float())
    return x


def _tight(rows, n):
    """Values 1 + j * 2**-23 (consecutive floats): one top-level bin holds every key."""
    j = torch.randint(0, 1 << 12, (rows, n))
    return 1.0 + j.float() * 2.0 ** -23


CASES = [
    # rows, n, lengths (None = n), topk, make, kwargs, reason
    (3, 1000, None, 50, _normal, {}, "plain rows, default launch"),
    (5, 700, [700, 0, 30, 699, 301], 64, _normal, {"block": 128}, "mixed lengths: empty, shorter than k"),
    (4, 600, [600, 5, 300, 64], 300, _ints, {"block": 64}, "exact ties at the threshold"),
    (3, 900, None, 100, _holes, {"block": 256}, "-inf holes, negative and positive"),
    (2, 5000, [5000, 4321], 257, _spread, {"block": 1024}, "wide dynamic range, subnormals, k not 2**n"),
    (2, 2000, None, 3, _tight, {"block": 512}, "all keys in one top-level bin, tiny k"),
    (3, 800, [800, 790, 1], 1, _normal, {"block": 256}, "k = 1"),
    (4, 1500, [1500, 1200, 3, 900], 40, _ints, {"capacity": 0, "block": 256},
     "no scratch: every level re-reads the row (fallback) with ties"),
    (3, 1500, None, 40, _normal, {"capacity": 3, "block": 256}, "scratch too small for most bins"),
    (7, 400, [400, 1, 399, 0, 200, 57, 12], 32, _holes, {"max_programs": 2, "block": 64},
     "persistent grid: 2 programs walk 7 rows, scratch reused"),
    (3, 1000, None, 64, _spread, {"radix_bits": 11, "block": 256}, "11-bit digits: 3 levels, clamped last"),
    (3, 1000, None, 64, _ints, {"radix_bits": 5, "capacity": 8, "block": 128}, "5-bit digits: 7 levels"),
]


@pytest.mark.parametrize("rows,n,lengths,topk,make,kwargs,reason", CASES,
                         ids=[c[-1].split(":")[0].split(",")[0].replace(" ", "-") for c in CASES])
def test_topk_rows_matches_reference(worker, rows, n, lengths, topk, make, kwargs, reason):
    worker.submit(_case, rows, n, lengths, topk, make, kwargs, reason).result()


def _case(rows, n, lengths, topk, make, kwargs, reason, seed=0, device="cpu"):
    from sglang_indexcache.kernels import topk as ops

    torch.manual_seed(seed)
    lens = torch.tensor(lengths if lengths is not None else [n] * rows, dtype=torch.int32)
    wide = torch.full((rows, n + 37), float("nan"))
    wide[:, 1::2] = float("inf")
    values = make(rows, n)                                             # [rows, n]
    cand = torch.arange(n)[None, :] < lens[:, None].long()             # [rows, n]
    wide[:, 5:5 + n][cand] = values[cand]
    scores = wide.to(device)[:, 5:5 + n]                               # [rows, n], row stride n + 37
    out_buf = torch.full((rows, topk + 3), SENTINEL, dtype=torch.int32, device=device)
    out = out_buf[:, 1:1 + topk]                                       # [rows, topk] view, row stride topk + 3
    got = ops.topk_rows(scores, topk, lengths=None if lengths is None else lens.to(device), out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    out, out_buf = out.cpu(), out_buf.cpu()
    assert not (out == SENTINEL).any(), f"{reason}: some outputs were never written"
    assert (out_buf[:, 0] == SENTINEL).all() and (out_buf[:, 1 + topk:] == SENTINEL).all(), \
        f"{reason}: wrote outside the output rows"
    dense = torch.where(cand, values, torch.full_like(values, NEG_INF))  # [rows, n] the specification's input
    testing.check_topk(out, dense, topk, 0.0, name=reason)
    expected = ref.select_topk(dense, topk)
    assert torch.equal((out < 0).sum(1), (expected < 0).sum(1)), f"{reason}: -1 counts differ"
    _check_ties_take_lowest_columns(out, dense, reason)


def _check_ties_take_lowest_columns(out, dense, reason):
    """Where a row has more candidates than slots, the keys equal to the smallest selected value are
    the lowest columns holding that key (the documented deterministic tie rule)."""
    key = dense.view(torch.int32)
    for r in range(out.shape[0]):
        sel = out[r][out[r] >= 0].long()
        if sel.numel() < out.shape[1] or sel.numel() == 0:
            continue
        t = dense[r, sel].min()
        t_key = key[r, sel][dense[r, sel] == t].min()                  # -0.0 vs +0.0: compare bit keys
        at_t = (key[r] == t_key).nonzero().flatten()                   # [m] columns holding T, ascending
        taken = sel[key[r, sel] == t_key].sort().values
        assert torch.equal(taken, at_t[:taken.numel()]), f"{reason}: row {r} tie columns {taken.tolist()[:8]}"


def test_edge_shapes(worker):
    worker.submit(_edge_shapes).result()


def _edge_shapes():
    from sglang_indexcache.kernels import topk as ops

    empty = ops.topk_rows(torch.empty(3, 0), 4)                        # no columns at all
    assert torch.equal(empty, torch.full((3, 4), -1, dtype=torch.int32))
    assert ops.topk_rows(torch.empty(0, 10), 4).shape == (0, 4)
    all_masked = torch.full((2, 50), NEG_INF)
    assert (ops.topk_rows(all_masked, 8, block=16) == -1).all(), "an all -inf row selects nothing"
    inf_row = torch.randn(1, 40)
    inf_row[0, [3, 17]] = float("inf")                                 # +inf is a candidate, as in the reference
    got = ops.topk_rows(inf_row, 5, block=16)
    assert torch.equal(got.sort(1).values, ref.select_topk(inf_row, 5).sort(1).values)
    col = torch.randn(4, 1)
    strided = col.expand(4, 1)                                         # n = 1: column stride irrelevant
    assert torch.equal(ops.topk_rows(strided, 2), torch.tensor([[0, -1]] * 4, dtype=torch.int32))
    over = torch.randn(2, 30)
    lens = torch.tensor([100, -4], dtype=torch.int32)                  # clamped to 0 .. n
    got = ops.topk_rows(over, 40, lengths=lens, block=16)
    assert (got[0] >= 0).sum() == 30 and (got[1] == -1).all()


BAD_ARGS = [
    (lambda: (torch.randn(2, 8).double(), 2, {}), "float32"),
    (lambda: (torch.randn(8), 2, {}), "2-D"),
    (lambda: (torch.randn(8, 2).T, 2, {}), "unit column stride"),
    (lambda: (torch.randn(2, 8), 0, {}), "topk must be a positive int"),
    (lambda: (torch.randn(2, 8), 2.0, {}), "topk must be a positive int"),
    (lambda: (torch.randn(2, 8), 2, {"lengths": torch.tensor([1, 2])}), "lengths must be int32"),
    (lambda: (torch.randn(2, 8), 2, {"lengths": torch.tensor([1], dtype=torch.int32)}), "lengths must be int32"),
    (lambda: (torch.randn(2, 8), 2, {"out": torch.empty(2, 3, dtype=torch.int32)}), "out must be int32"),
    (lambda: (torch.randn(2, 8), 2, {"out": torch.empty(2, 2)}), "out must be int32"),
    (lambda: (torch.randn(2, 8), 2, {"out": torch.empty(2, 4, dtype=torch.int32)[:, ::2]}), "unit column stride"),
    (lambda: (torch.randn(2, 8), 2, {"block": 100}), "block must be a power of two"),
    (lambda: (torch.randn(2, 8), 2, {"radix_bits": 16}), "radix_bits"),
    (lambda: (torch.randn(2, 8), 2, {"capacity": -1}), "capacity"),
]


@pytest.mark.parametrize("make,message", BAD_ARGS, ids=[f"{i}-{m.split()[0]}" for i, (_, m) in enumerate(BAD_ARGS)])
def test_bad_arguments_raise_one_line(make, message):
    from sglang_indexcache.kernels import topk as ops

    scores, topk, kwargs = make()
    with pytest.raises(ValueError, match=message) as info:
        ops.topk_rows(scores, topk, **kwargs)
    assert "\n" not in str(info.value)


def test_cpu_tensor_without_interpreter_is_refused():
    from sglang_indexcache.kernels import topk as ops

    if testing.is_interpreted(ops._topk_kernel):
        pytest.skip("this process interprets Triton kernels")
    with pytest.raises(ValueError, match="CUDA"):
        ops.topk_rows(torch.randn(2, 8), 2)


GPU_CASES = [CASES[1], CASES[2], CASES[4], CASES[7], CASES[8], CASES[9]] + [
    (64, 65536, [65536 - 997 * i for i in range(64)], 2048, _normal, {}, "decode-like rows, k = 2048"),
    (256, 16384, [64 * (i + 1) for i in range(256)], 2048, _ints, {}, "causal prefill lengths, ties"),
    (1, 262144, None, 2048, _spread, {}, "one 256K row"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows,n,lengths,topk,make,kwargs,reason", GPU_CASES,
                         ids=[c[-1].split(":")[0].split(",")[0].replace(" ", "-") for c in GPU_CASES])
def test_gpu_matches_reference(rows, n, lengths, topk, make, kwargs, reason):
    """The same checks compiled for the GPU (no interpreter), plus serving-sized rows."""
    _case(rows, n, lengths, topk, make, kwargs, reason, device="cuda")


def test_mapped_columns_and_skipped_rows(worker):
    worker.submit(_mapped_and_skipped).result()


def _mapped_and_skipped():
    """``columns`` maps each selected column to the one it stands for (candidate lists); with
    ``skip_negative`` a row of negative length is left as it was (the sampled top-k writes the rows
    its lists answer and the fallback rows in two calls into one ``out``)."""
    from sglang_indexcache.kernels import topk as ops

    scores = torch.randn(3, 300)
    columns = torch.stack([torch.randperm(10000)[:300] for _ in range(3)]).int()
    lens = torch.tensor([300, -1, 120], dtype=torch.int32)
    out = torch.full((3, 40), SENTINEL, dtype=torch.int32)
    ops.topk_rows(scores, 40, lengths=lens, out=out, columns=columns, skip_negative=True, block=64)
    assert (out[1] == SENTINEL).all(), "a row of negative length must be left untouched"
    for r, n in ((0, 300), (2, 120)):
        want = columns[r, ref.select_topk(scores[r:r + 1, :n], 40)[0].long()]
        assert torch.equal(out[r].sort().values, want.sort().values), f"row {r}: mapped columns differ"
    clamped = ops.topk_rows(scores, 40, lengths=lens, block=64)     # default: clamped to 0, filled -1
    assert (clamped[1] == -1).all()
