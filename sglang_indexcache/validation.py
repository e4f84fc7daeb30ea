"""Checks of a pattern against a real checkpoint (layer count, layer 0, indexer weights)."""

from __future__ import annotations

from . import pattern as pat
from .errors import PatternError
from .model_info import ModelInfo, _ranges


def check_against_model(pattern: str, model: ModelInfo) -> str:
    """Validate ``pattern`` for ``model``: length, layer 0 F, an indexer in every F layer."""
    pattern = pat.validate(pattern, model.num_dsa_layers)
    missing = [i for i in pat.full_layers(pattern) if i not in model.layers_with_indexer]
    if missing:
        raise PatternError(
            f"layer {missing[0]} is F but {model.path} has no indexer weights for it"
            f" (F layers without indexer: {_ranges(missing)}; layers with one: "
            f"{_ranges(sorted(model.layers_with_indexer))})"
        )
    return pattern
