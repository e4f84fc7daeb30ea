"""Moved to :mod:`sglang_indexcache.models.indexer`; this name stays only until
``commands/train_tiny.py`` imports ``install_fast_indexers`` from there."""

from .models.indexer import install_fast_indexers  # noqa: F401
