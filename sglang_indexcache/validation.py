"""Checks of a pattern against a real checkpoint (layer count, layer 0, indexer weights).

:func:`require_indexers` is the one "an F layer has no indexer weights" check: the pattern-file
validation, the transformers backend, distillation and evaluation call it with what they hold.
"""

from __future__ import annotations

from . import pattern as pat
from .errors import PatternError
from .model_info import ModelInfo


def missing_indexers(pattern: str, have) -> list[int]:
    """The F layers of (canonical) ``pattern`` that are not among the layers ``have``."""
    have = set(have)
    return [i for i in pat.full_layers(pattern) if i not in have]


def require_indexers(pattern: str, have, owner: str, error: type[Exception] = PatternError,
                     hint: str = "") -> None:
    """Raise ``error`` naming the first F layer of ``pattern`` whose indexer ``owner`` lacks.

    ``have``: the layers that hold an indexer; ``owner``: who lacks it, for the message (a
    checkpoint path, "the model"); ``hint``: appended to the message (what to do instead).
    """
    missing = missing_indexers(pattern, have)
    if missing:
        raise error(
            f"layer {missing[0]} is F but {owner} has no indexer weights for it (no indexer weights for"
            f" F layer(s) {pat.layer_ranges(missing)} of pattern {pattern}; layers with one:"
            f" {pat.layer_ranges(have) or 'none'}){hint}"
        )


def require_every_indexer(num_layers: int, have, owner: str, need: str,
                          error: type[Exception] = PatternError) -> None:
    """Raise ``error`` when any of ``num_layers`` layers is not among ``have``.

    ``need``: what wants every layer's indexer (``"overlap needs every layer's indexer"``); the
    message reads ``"NEED, but OWNER has no indexer weights for layers 1-2,5"``.
    """
    missing = missing_indexers(pat.FULL * num_layers, have)
    if missing:
        raise error(f"{need}, but {owner} has no indexer weights for layers {pat.layer_ranges(missing)}")


def check_against_model(pattern: str, model: ModelInfo) -> str:
    """Validate ``pattern`` for ``model``: length, layer 0 F, an indexer in every F layer (when the
    weights were read: ``model.weights_checked``)."""
    pattern = pat.validate(pattern, model.num_dsa_layers)
    if model.weights_checked:
        require_indexers(pattern, model.layers_with_indexer, str(model.path))
    return pattern
