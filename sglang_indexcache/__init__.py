"""sglang-indexcache: IndexCache (cross-layer top-k reuse) for DeepSeek-Sparse-Attention models."""

__version__ = "0.1.0"
