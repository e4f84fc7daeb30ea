"""Comparison-only and research code for the kernels; the package (``sglang_indexcache``) never imports it.

Imported as ``kernel_research`` by the scripts next to it (``python scripts/X.py`` puts ``scripts/``
on ``sys.path``) and by their tests:

- ``sglang_ops``, ``sglang_compare``, ``compare_common``: our kernels against SGLang 0.5.17's
  (``scripts/gpu_kernel_compare.py``);
- ``indexer_fused``: the fused prefill variant (no score tile; slower, off the serving path), plugged
  into ``indexer_topk_prefill`` through its ``chunk_topk`` hook;
- ``resources``: registers, spills and occupancy of a compiled kernel (``scripts/mla_variants.py``);
- ``mla_inputs``: the diagnostic index sets of the sparse MLA studies (``mla_variants.py``, ``ncu_targets.py``).
"""
