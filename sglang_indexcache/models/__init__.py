"""The DSA maths over transformers' GlmMoeDsa modules, in one place.

- ``indexer``: index queries/keys/weights of a layer, index scores (the formula is
  ``kernels.reference.index_scores``), masks, top-k, the ``FastIndexer``/``CausalIndexer`` drop-ins;
- ``swap``: the one mechanism that puts modules (or ``None`` for S layers) in the indexer slots;
- ``sparse_attention``: a decoder layer with gather-based sparse MLA (``kernels.reference.gathered_attention``);
- ``lm_loss``: the LM loss of token blocks under a pattern.
"""
