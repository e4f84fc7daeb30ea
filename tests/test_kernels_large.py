"""Our indexer top-k past 2**31 elements on a GPU against the exact top-k (issue 24): one tile of
16,384 and of 32,768 rows x 200,000 keys, the radix and the sampled selectors alone on random scores
and the prefill score kernel + sampled top-k on real index q/k (``scripts/gpu_large_checks.py``, which
the GPU call runs without pytest; ``tests/test_gpu_kernels_24.py`` smoke-tests it on the CPU).
The CPU tests of the same offsets: ``tests/test_kernels_offsets.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_large_checks as large  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (about 30 GB free)")]


@pytest.mark.parametrize("rows", [16384, 32768])
def test_topk_selectors_on_a_tile_past_2_31(rows):
    torch.manual_seed(rows)
    case = large.check_topk(torch.device("cuda"), rows, 200000)
    assert case["elements"] > 2 ** 31
    for name in ("radix", "sampled"):
        r = case[name]
        assert r["rows_checked"] > 0.99 * rows, r                   # tie-free rows
        assert r["recall_min"] >= large.MIN_RECALL, (name, r)


@pytest.mark.parametrize("rows", [16384, 32768])
def test_prefill_tile_past_2_31(rows):
    torch.manual_seed(rows)
    case = large.check_prefill(torch.device("cuda"), rows, 200000)
    assert case["tile_max_rel_error"] <= 1e-3, case
    assert case["rows_checked"] == len(case["checked_rows"]) and case["recall_min"] >= large.MIN_RECALL, case
