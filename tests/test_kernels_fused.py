"""The fused prefill variant (``scripts/kernel_research/indexer_fused.py``, comparison only) vs the fp32
reference, under Triton's CPU interpreter: plugged into ``indexer_topk_prefill`` through its
``chunk_topk`` hook, with the same checks as the serving cases of ``test_kernels_indexer.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))   # kernel_research, also in the worker
from test_kernels_indexer import _prefill_case, worker  # noqa: E402,F401 - shared case, fixture

CASES = [
    # lens, h, d, topk, dtype, fused_chunks keywords, indexer_topk_prefill keywords, reason
    ([300, 170], 16, 32, 16, torch.float32, {"fused_from": 64, "sample": 64}, {"budget_bytes": 4 * 2 * 300 * 64},
     "fused chunks (no score tile): sampled keys, score-and-append, exact select"),
    ([260], 20, 32, 16, torch.bfloat16, {"fused_from": 64, "sample": 64, "capacity": 20},
     {"budget_bytes": 4 * 260 * 100, "block_n": 16},
     "fused chunks, lists too short for most rows: the whole-chunk fallback"),
    ([200], 16, 32, 8, "fp8", {"fused_from": 64, "sample": 64}, {"budget_bytes": 4 * 200 * 64},
     "fused chunks with fp8 queries and keys"),
]


def _fused_case(lens, h, d, topk, dtype, fused, kwargs, reason):
    from kernel_research.indexer_fused import fused_chunks

    _prefill_case(lens, h, d, topk, dtype, {**kwargs, "chunk_topk": fused_chunks(**fused)}, reason)


@pytest.mark.parametrize("lens,h,d,topk,dtype,fused,kwargs,reason", CASES,
                         ids=[c[-1].split(":")[0].split(",")[0].replace(" ", "-") for c in CASES])
def test_fused_prefill_matches_reference(worker, lens, h, d, topk, dtype, fused, kwargs, reason):
    worker.submit(_fused_case, lens, h, d, topk, dtype, fused, kwargs, reason).result()
