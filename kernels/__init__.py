"""Triton kernels for DSA serving and their pure-PyTorch references (the specification).

Imported as ``sglang_indexcache.kernels`` (this folder is mapped there by pyproject.toml; it is never a
top-level ``kernels`` package, which would shadow the PyPI package SGLang depends on).
"""
