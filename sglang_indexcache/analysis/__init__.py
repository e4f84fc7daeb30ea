"""Analysis: cross-layer top-k overlap."""
