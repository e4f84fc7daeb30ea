"""Calibration of IndexCache patterns: data loading, model backends, greedy search.

Imported as ``sglang_indexcache.calibration`` (this folder is mapped there by pyproject.toml).
"""
