"""Triton kernels for DSA serving and their pure-PyTorch references (the specification).

Imported as ``sglang_indexcache.kernels`` (this folder is mapped there by pyproject.toml; it is never a
top-level ``kernels`` package, which would shadow the PyPI package SGLang depends on).
"""

from .indexer_topk import indexer_topk_decode, indexer_topk_prefill
from .reference import (
    PAGE_SIZE,
    indexer_scores_decode_ref,
    indexer_scores_prefill_ref,
    indexer_topk_decode_ref,
    indexer_topk_prefill_ref,
    sparse_mla_decode_ref,
)
from .sparse_mla_decode import plan_sparse_mla, run_sparse_mla, sparse_mla_decode
from .topk import topk_rows
from .topk_sampled import topk_rows_sampled
from .topk_reuse import merge_reused_topk, merge_reused_topk_ref

__all__ = [
    "PAGE_SIZE",
    "indexer_topk_prefill", "indexer_topk_prefill_ref",
    "indexer_topk_decode", "indexer_topk_decode_ref",
    "sparse_mla_decode", "sparse_mla_decode_ref", "plan_sparse_mla", "run_sparse_mla",
    "indexer_scores_prefill_ref", "indexer_scores_decode_ref",
    "topk_rows", "topk_rows_sampled",
    "merge_reused_topk", "merge_reused_topk_ref",
]
