"""Helpers for the SGLang tests: the cached 0.5.23 wheel, stock/patched trees, small checkpoints."""
