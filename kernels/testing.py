"""Test helpers shared by the kernel tests and the GPU check script.

- ``assert_close``: one comparator that explains a mismatch (how many elements differ, where, the
  largest error, NaN/inf disagreements). NaN in ``actual`` never passes.
- ``check_topk``: top-k indices compared as sets against dense reference scores.
- ``set_overlap`` (from ``reference.py``, its home): per-row share of one top-k index set in another.
- ``interpreter_worker``: a worker process that runs the kernels in Triton's CPU interpreter.
- ``make_paged_cache``: a shuffled paged cache whose unowned slots hold NaN.
- ``far_view``: a small view whose elements lie past 2**31 in a sparse file mapping (offset tests).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile

import torch

from ._triton_common import interpreting as is_interpreted
from .reference import set_overlap

# (atol, rtol) per operand dtype; fp32 math everywhere, so these bound only rounding of inputs/outputs.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


def _where(mask: torch.Tensor, limit: int = 5) -> str:
    idx = mask.nonzero()[:limit].tolist()
    return ", ".join(str(tuple(i)) for i in idx)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "output"):
    """Raise AssertionError explaining every kind of mismatch between ``actual`` and ``expected``.

    Equal infinities pass; NaN in ``actual`` never passes; otherwise ``|a - e| <= atol + rtol * |e|``.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    problems = []
    nan = torch.isnan(a)
    if nan.any():
        problems.append(f"{int(nan.sum())} NaN (e.g. at {_where(nan)})")
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & ~(a == e) & ~nan
    if inf_mismatch.any():
        problems.append(f"{int(inf_mismatch.sum())} inf mismatches (e.g. at {_where(inf_mismatch)})")
    finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = finite & (err > atol + rtol * e.abs())
    if bad.any():
        worst = tuple(torch.nonzero(err == err.max())[0].tolist())
        problems.append(
            f"{int(bad.sum())}/{a.numel()} elements off (atol={atol:g}, rtol={rtol:g}), e.g. at "
            f"{_where(bad)}; max abs error {err.max().item():.3g} at {worst}: "
            f"actual {a[worst].item():.6g} vs expected {e[worst].item():.6g}")
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))


def check_topk(indices: torch.Tensor, scores: torch.Tensor, topk: int, tol: float, name: str = "top-k"):
    """Check ``indices`` [rows, topk] int32 against dense reference ``scores`` [rows, n] (-inf = no candidate).

    Per row: -1 exactly in the slots beyond the candidate count; no duplicates; every index a
    candidate; the scores gathered at the indices equal the reference's top-k scores (sorted, within
    ``tol``); and the index *set* is exact wherever the k-th and (k+1)-th scores differ by more than
    ``tol`` (a tie-free boundary).
    """
    idx, sc = indices.detach().cpu().long(), scores.detach().cpu().float()
    rows, n = sc.shape
    if tuple(idx.shape) != (rows, topk):
        raise AssertionError(f"{name}: shape {list(idx.shape)} != expected {[rows, topk]}")
    problems = []
    count = torch.isfinite(sc).sum(1).clamp(max=topk) if n else torch.zeros(rows, dtype=torch.long)
    valid = idx >= 0
    wrong_count = valid.sum(1) != count
    if wrong_count.any():
        r = int(wrong_count.nonzero()[0])
        problems.append(f"{int(wrong_count.sum())} rows with a wrong number of valid indices, e.g. row {r}: "
                        f"{int(valid[r].sum())} vs {int(count[r])}")
    out_of_range = valid & (idx >= n) | (idx < -1)
    if out_of_range.any():
        problems.append(f"{int(out_of_range.sum())} indices out of range (e.g. at {_where(out_of_range)})")
        raise AssertionError(f"{name}: " + "; ".join(problems))
    got = torch.where(valid, sc.gather(1, idx.clamp(min=0)), torch.full_like(sc[:, :1], float("-inf")))
    not_cand = valid & ~torch.isfinite(got)
    if not_cand.any():
        problems.append(f"{int(not_cand.sum())} indices are not candidates (masked or NaN), e.g. at "
                        f"{_where(not_cand)}")
    dup = torch.zeros(rows, dtype=torch.bool)
    for r in range(rows):
        v = idx[r][valid[r]]
        dup[r] = v.unique().numel() != v.numel()
    if dup.any():
        problems.append(f"{int(dup.sum())} rows with duplicate indices, e.g. row {int(dup.nonzero()[0])}")
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))
    k = min(topk, n)
    ref_vals = torch.topk(sc, k, dim=1).values if k else sc[:, :0]
    got_sorted = got.sort(dim=1, descending=True).values[:, :k]
    assert_close(got_sorted, ref_vals, atol=tol, rtol=tol, name=f"{name} gathered scores")
    if n > topk:
        kth = torch.topk(sc, topk + 1, dim=1).values                 # [rows, topk+1]
        tie_free = (kth[:, topk - 1] - kth[:, topk] > tol) & torch.isfinite(kth[:, topk - 1])
        ref_set = torch.topk(sc, topk, dim=1).indices
        differs = tie_free & (set_overlap(ref_set, idx) < 1)
        if differs.any():
            r = int(differs.nonzero()[0])
            raise AssertionError(f"{name}: {int(differs.sum())} tie-free rows select a different set, e.g. row "
                                 f"{r}: extra {sorted(set(idx[r].tolist()) - set(ref_set[r].tolist()))}, "
                                 f"missing {sorted(set(ref_set[r].tolist()) - set(idx[r].tolist()))}")


@contextlib.contextmanager
def interpreter_worker():
    """Yield a one-process pool whose worker runs Triton kernels in the CPU interpreter.

    Triton decides at import time (of ``triton`` itself and of each ``@triton.jit``) whether to
    interpret, so the worker is a fresh ``spawn`` process started with ``TRITON_INTERPRET=1``; this
    process's environment is restored at once and nothing else in it changes. Submit module-level
    functions; their exceptions (a comparator's AssertionError) come back to the caller.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        if not pool.submit(worker_interprets).result():
            raise RuntimeError("the interpreter worker compiled its kernels instead of interpreting them")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def worker_interprets() -> bool:
    """True when this process's kernels run in Triton's interpreter."""
    import importlib

    scores = importlib.import_module(f"{__package__}.indexer_scores")
    mla = importlib.import_module(f"{__package__}.sparse_mla_decode")
    return is_interpreted(scores._decode_kernel) and is_interpreted(mla._sparse_mla_kernel)


def make_paged_cache(seq_lens, width: int, dtype=torch.float32, spare_pages: int = 2, page_size: int = 64):
    """A shuffled paged cache for ``seq_lens`` with NaN in every slot no request owns.

    Returns ``(cache [num_pages, page_size, width], page_table [b, max_pages] int32)``. Pages are
    assigned in random order; unused page-table slots and the tails of last pages point at NaN rows,
    so a kernel that reads beyond a sequence produces NaN and fails the comparison.
    """
    need = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(need) + spare_pages + 1
    cache = torch.randn(num_pages, page_size, width).to(dtype)
    poison = num_pages - 1                                          # an all-NaN page
    cache[poison] = float("nan")
    order = torch.randperm(num_pages - 1).tolist()
    page_table = torch.full((len(seq_lens), max(need + [1]) + 1), poison, dtype=torch.int32)
    for i, (n, pages) in enumerate(zip(seq_lens, need)):
        mine = [order.pop() for _ in range(pages)]
        page_table[i, :pages] = torch.tensor(mine, dtype=torch.int32)
        if n % page_size:
            cache[mine[-1], n % page_size:] = float("nan")
    for p in order:                                                 # spare pages nobody owns
        cache[p] = float("nan")
    return cache, page_table


FAR_OFFSET = 1 << 31            # elements: where far views start in their mapping
FAR_STRIDE = (1 << 30) + 64     # elements: a row stride whose row 2 starts past 2**31


def far_view(shape, dtype=torch.float32, strides=None, fill=float("nan")) -> torch.Tensor:
    """``shape`` tensor whose elements sit at 64-bit distances: the leading dim has stride
    ``FAR_STRIDE`` (row 2 starts 2**31 + 128 elements in), the other dims are contiguous, unless
    ``strides`` is given. It lives at element ``FAR_OFFSET`` of a file mapping (``torch.from_file``)
    of a sparse temporary file: only the pages of its own elements ever take memory or disk, so a
    test of offset arithmetic past 2**31 needs a few pages, not gigabytes. A kernel that wraps an
    int32 offset writes into (or reads from) the mapping's first 2**31 elements, which exist:
    a wrong value, not a crash. Filled with ``fill`` (the file is unlinked at once; the mapping
    lives as long as the tensor).
    """
    if strides is None:
        inner = [1] * len(shape)
        for j in range(len(shape) - 2, 0, -1):
            inner[j] = inner[j + 1] * shape[j + 1]
        strides = [FAR_STRIDE] + inner[1:]
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides) if n > 0)
    numel = FAR_OFFSET + span
    elem = torch.empty((), dtype=dtype).element_size()
    with tempfile.NamedTemporaryFile(prefix="far-view-", suffix=".bin") as f:
        f.truncate(numel * elem)                                    # sparse: no block allocated
        base = torch.from_file(f.name, shared=True, size=numel * elem, dtype=torch.uint8)
    view = base.view(dtype).as_strided(tuple(shape), tuple(strides), FAR_OFFSET)
    view.fill_(fill)
    return view
