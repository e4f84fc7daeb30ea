"""The one mechanism that changes what sits in transformers' ``GlmMoeDsaAttention.indexer`` slots.

transformers' GlmMoeDsa reads a layer as F when ``self_attn.indexer`` is a module and as S (reuse
the carried top-k) when it is ``None``. Everything of ours that changes that slot goes through here:

- :class:`IndexerWrapper`: base of every drop-in we put there (``FastIndexer``, ``CausalIndexer``,
  the training and distillation wrappers); it keeps the checkpoint's module as ``inner`` so the
  parameters stay where the checkpoint names them (``...self_attn.indexer.inner.*`` is never saved:
  :func:`unwrap_indexers` puts the originals back first);
- :func:`wrap_indexers` / :func:`unwrap_indexers`: wrap every layer's indexer, idempotently;
- :func:`set_indexers`: give each layer a module or ``None``; :func:`apply_pattern` does that for
  an F/S pattern; :func:`swapped_indexers` does it temporarily.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .. import pattern as pat
from ..validation import require_every_indexer

__all__ = ["IndexerWrapper", "inner_indexer", "current_indexers", "wrap_indexers", "unwrap_indexers",
           "set_indexers", "apply_pattern", "swapped_indexers"]


class IndexerWrapper(nn.Module):
    """A module in a ``self_attn.indexer`` slot that holds the checkpoint's indexer as ``inner``.

    Subclasses implement ``forward(hidden_states, q_resid, position_embeddings, attention_mask,
    position_ids=None, past_key_values=None) -> topk [B, S, k]`` (transformers' signature).
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.layer_idx = inner.layer_idx


def inner_indexer(module):
    """The checkpoint's ``GlmMoeDsaIndexer`` behind ``module`` (itself when it is not a wrapper)."""
    while isinstance(module, IndexerWrapper):
        module = module.inner
    return module


def current_indexers(model) -> list:
    """What each layer's ``self_attn.indexer`` slot holds now (``None`` for S layers)."""
    return [layer.self_attn.indexer for layer in model.model.layers]


def wrap_indexers(model, wrapper: type[IndexerWrapper], require_all: bool = False, **kwargs) -> list:
    """Put ``wrapper(inner, **kwargs)`` in every layer that has an indexer; return the slots' contents.

    A slot that already holds a ``wrapper`` is kept and given ``kwargs`` as attributes (idempotent:
    ``mode="sparse"`` switches a training wrapper's mode). ``require_all`` refuses a model with a
    layer without an indexer (``ValueError``); otherwise such a layer stays ``None``.
    """
    layers = model.model.layers
    if require_all:
        require_every_indexer(len(layers), [i for i, layer in enumerate(layers) if layer.self_attn.indexer is not None],
                              "the model", "training needs every layer's indexer (indexer_types all 'full')",
                              ValueError)
    for layer in layers:
        attn = layer.self_attn
        if attn.indexer is None:
            continue
        if isinstance(attn.indexer, wrapper):
            for name, value in kwargs.items():
                setattr(attn.indexer, name, value)
        else:
            attn.indexer = wrapper(inner_indexer(attn.indexer), **kwargs)
    return current_indexers(model)


def unwrap_indexers(model) -> None:
    """Put the checkpoint's own indexer modules back in every slot that holds a wrapper."""
    for layer in model.model.layers:
        layer.self_attn.indexer = inner_indexer(layer.self_attn.indexer)


def set_indexers(model, modules: dict[int, nn.Module | None]) -> None:
    """``layers[i].self_attn.indexer = modules[i]`` for each ``i`` given (``None``: an S layer)."""
    layers = model.model.layers
    for i, module in modules.items():
        layers[i].self_attn.indexer = module


def apply_pattern(model, indexers: list, pattern: str) -> str:
    """Give the F layers of ``pattern`` their module from ``indexers`` and the S layers ``None``.

    ``pattern`` is validated against ``len(indexers)``; an F layer whose entry is ``None`` is refused
    by the caller first (``validation.missing_indexers``). Returns the canonical pattern.
    """
    pattern = pat.validate(pattern, len(indexers))
    set_indexers(model, {i: ix if kind == pat.FULL else None for i, (ix, kind) in enumerate(zip(indexers, pattern))})
    return pattern


@contextlib.contextmanager
def swapped_indexers(model, modules: dict[int, nn.Module | None]):
    """Temporarily :func:`set_indexers`; every slot is restored on exit."""
    saved = dict(enumerate(current_indexers(model)))
    try:
        set_indexers(model, modules)
        yield
    finally:
        set_indexers(model, saved)
