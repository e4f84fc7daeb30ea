"""Multi-layer distillation on transformers' GlmMoeDsa: targets from the frozen model, gradients
only into the F layers' indexers.

Which forward produces ``p`` (the targets):

- ``warmup`` form: a **dense** causal forward. Every F layer's indexer is replaced by a selector
  that returns all ``T`` keys and S layers reuse that, so every layer attends to every earlier
  token; ``p^(l+j)`` is layer ``l+j``'s dense attention averaged over heads. This is the DSA
  warm-up target (the attention the indexer should learn to predict, independent of the current
  indexers), and it makes the target of an S layer the attention it would give with no selection
  at all, not the attention it already gets through a possibly poor borrowed top-k.
- ``sparse`` form: the forward **under the pattern**. Each F layer runs its own indexer
  (top-k, no grad) and its S layers reuse that top-k, exactly as at inference; ``p^(l+j)`` is
  layer ``l+j``'s attention over F layer ``l``'s selected set (renormalised), and ``q`` is the
  indexer's softmax over the same set (DeepSeek-V3.2's sparse-stage indexer loss).

In both, the main model runs under ``no_grad`` (eager attention, so the attention module returns
its probabilities ``[B, H, S, T]``; a forward hook on ``self_attn`` reads them). The indexer of an
F layer gets gradients through :func:`models.indexer.indexer_logits` on its captured (detached) inputs,
once the last layer it serves has added its distribution to the F layer's
:class:`~.distill_loss.ServedTarget`; that layer's loss is back-propagated at once and its
target freed, so at most one centroid is alive at a time.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import pattern as pattern_mod
from ..errors import UsageError
from ..models import indexer as dsa, swap
from ..models.swap import swapped_indexers
from ..validation import require_indexers
from .distill_loss import (ServedTarget, attention_distribution, causal_mask, indexer_log_probs,
                           selected_mask)

log = logging.getLogger(__name__)
FORMS = ("warmup", "sparse")


def indexer_parameter_names(indexers: dict[int, nn.Module]) -> dict[str, nn.Parameter]:
    """Checkpoint names -> parameters of the given layers' indexers (``model.layers.i.self_attn.indexer.*``).

    indexers: layer -> its ``GlmMoeDsaIndexer`` (or a wrapper holding it as ``inner``).
    """
    named = {}
    for layer, indexer in sorted(indexers.items()):
        for name, param in swap.inner_indexer(indexer).named_parameters():
            named[f"model.layers.{layer}.self_attn.indexer.{name}"] = param
    return named


class _Selector(swap.IndexerWrapper):
    """Stand-in for an F layer's indexer during a distillation forward: records its inputs.

    ``dense=True`` returns every key ``[B, S, T]`` (dense attention); otherwise the indexer's own
    causal top-k (no grad), also recorded.
    """

    def __init__(self, inner, dense: bool):
        super().__init__(inner)
        self.dense = dense
        self.inputs = None
        self.topk = None

    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        if past_key_values is not None:
            raise UsageError("distillation runs full-sequence forwards only (no KV cache)")
        self.inputs = (hidden_states.detach(), q_resid.detach(), tuple(x.detach() for x in position_embeddings))
        batch, seq, _ = hidden_states.shape
        if self.dense:
            return torch.arange(seq, dtype=torch.int32).expand(batch, seq, seq)  # [B, S, T]
        q, k, w = dsa.indexer_qkw(self.inner, hidden_states, q_resid, position_embeddings)
        scores = dsa.apply_mask(dsa.chunked_index_scores(q, w, k, self.inner.softmax_scale), attention_mask)
        self.topk = dsa.causal_topk(scores, self.inner.index_topk)  # [B, S, k]
        return self.topk


class Distiller:
    """Computes the multi-layer distillation loss of one batch and its indexer gradients.

    ``pattern``: the F/S pattern (validated); ``form``: ``warmup`` or ``sparse`` (module doc);
    ``single_layer``: each F layer's target is its own attention only (the paper's ablation
    without the cross-layer loss). Call :meth:`freeze` once, then :meth:`step` per batch.
    """

    def __init__(self, model, pattern: str, form: str = "warmup", single_layer: bool = False,
                 indexers=None):
        if form not in FORMS:
            raise UsageError(f"unknown distillation form {form!r}; choose one of {', '.join(FORMS)}")
        self.model, self.form, self.single_layer = model, form, single_layer
        self.pattern = pattern_mod.validate(pattern, len(model.model.layers))
        self.source = pattern_mod.reuse_source(self.pattern)
        served = pattern_mod.served_layers(self.pattern)
        self.served = {f: [f] for f in served} if single_layer else served
        self.full = pattern_mod.full_layers(self.pattern)
        if indexers is None:  # per layer; e.g. TransformersBackend.indexers (S layers detached there)
            indexers = [layer.self_attn.indexer for layer in model.model.layers]
        have = [i for i, ix in enumerate(indexers) if ix is not None]
        require_indexers(self.pattern, have, "the model", UsageError)
        self.indexers = {f: swap.inner_indexer(indexers[f]) for f in self.full}  # layer -> GlmMoeDsaIndexer

    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters (F layers' indexers), by checkpoint name."""
        return indexer_parameter_names(self.indexers)

    def freeze(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)
        for param in self.parameters().values():
            param.requires_grad_(True)

    def step(self, input_ids: torch.Tensor) -> dict[int, float]:
        """Forward ``input_ids [B, S]``, back-propagate each F layer's loss / (B*S) into ``.grad``.

        Returns per F layer the loss in nats per query token.
        """
        batch, seq = input_ids.shape
        selectors = {
            i: _Selector(self.indexers[i], dense=self.form == "warmup") if i in self.served else None
            for i in range(len(self.model.model.layers))
        }
        state = {"targets": {f: ServedTarget(len(s)) for f, s in self.served.items()},
                 "losses": {}, "tokens": batch * seq, "causal": causal_mask(seq, input_ids.device)}
        hooks = [
            layer.self_attn.register_forward_hook(self._hook(i, selectors, state))
            for i, layer in enumerate(self.model.model.layers)
        ]
        try:
            with swapped_indexers(self.model, selectors), torch.no_grad():
                self.model.model(input_ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        if set(state["losses"]) != set(self.served):
            raise RuntimeError(f"distillation targets incomplete: got {sorted(state['losses'])}")
        return state["losses"]

    def _visible(self, source: int, selectors, state) -> torch.Tensor:
        if self.form == "warmup":
            return state["causal"]  # [S, T]
        return selected_mask(selectors[source].topk, state["causal"].shape[0])  # [B, S, T]

    def _hook(self, layer: int, selectors, state):
        source = self.source[layer]

        def hook(module, args, output):
            if layer not in self.served[source]:
                return
            attn_weights = output[1]  # [B, H, S, T]
            if attn_weights is None:
                raise RuntimeError("attention probabilities unavailable: load the model with eager attention")
            visible = self._visible(source, selectors, state)
            target = state["targets"][source]
            target.add(attention_distribution(attn_weights, visible))
            if target.complete:
                state["losses"][source] = self._backward(source, selectors[source], target, visible, state)
                del state["targets"][source]
        return hook

    def _backward(self, source: int, selector: _Selector, target: ServedTarget, visible, state) -> float:
        hidden, q_resid, position_embeddings = selector.inputs
        with torch.enable_grad():
            logits = dsa.indexer_logits(selector.inner, hidden, q_resid, position_embeddings)  # [B, S, T]
            loss = target.loss(indexer_log_probs(logits, visible)) / state["tokens"]
            loss.backward()
        selector.inputs = None
        return float(loss.detach())
