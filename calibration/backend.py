"""A calibration backend over transformers' GlmMoeDsa: every indexer loaded, F/S pattern switchable.

The model definition is transformers' own (``GlmMoeDsaForCausalLM``); this module only decides, per
layer, whether the attention module holds its indexer (F) or ``None`` (S, so it reuses the carried
top-k of the nearest F layer before it and cannot run an indexer). The indexers are the fast drop-in
:class:`sglang_indexcache.models.indexer.CausalIndexer` (same top-k as transformers'); the slots are
switched by :mod:`sglang_indexcache.models.swap`, attention is :mod:`~sglang_indexcache.models.sparse_attention`
and losses are :mod:`sglang_indexcache.models.lm_loss`'s (total nats over total predicted tokens).

Layer-wise API (exact prefix reuse for the greedy search)::

    st = b.begin(input_ids)            # embeddings, causal mask, RoPE of a batch [B, S]
    st = b.layer(i, st, full=True)     # layer i with its own indexer, or reusing st.topk
    st = b.layer(i, st, full=True, stride=4)  # ... reusing its top-k across 4 decode steps
    nll_sum, tokens = b.end(st, input_ids)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import ModelDirError, PatternError
from sglang_indexcache.model_info import load_model_info
from sglang_indexcache.models import lm_loss, sparse_attention, swap
from sglang_indexcache.models.indexer import CausalIndexer
from sglang_indexcache.models.lm_loss import LossResult, summed_loss
from sglang_indexcache.validation import require_every_indexer, require_indexers

log = logging.getLogger(__name__)
GLM_DSA_TYPES = ("glm_moe_dsa",)


@dataclass
class LayerState:
    """What enters a decoder layer for one batch.

    ``hidden [B, S, hidden]`` (model dtype), ``topk [B, S, k]`` int32 carried from the nearest F
    layer before (``None`` before layer 0), and the batch constants ``mask`` (transformers' causal
    mask), ``position_embeddings`` ``(cos, sin)`` and ``position_ids [1, S]``.
    """

    hidden: torch.Tensor
    topk: torch.Tensor | None
    mask: torch.Tensor
    position_embeddings: tuple
    position_ids: torch.Tensor


class TransformersBackend:
    """transformers GlmMoeDsa with every indexer kept, and a switchable F/S pattern."""

    def __init__(self, model, tokenizer=None, indexer_layers=None, path=None, sparse_attention=True):
        self.model = model.eval()
        # gather-based attention over the top-k (same softmax, far fewer FLOPs than dense masking)
        self.sparse_attention = sparse_attention
        # transformers' plain per-expert loop: same result, ~3x faster on the CPU than grouped_mm
        for module in model.modules():
            if hasattr(getattr(module, "config", None), "_experts_implementation"):
                module.config._experts_implementation = "eager"
        self.tokenizer = tokenizer
        self.path = path
        self.config = model.config
        self.num_layers = int(model.config.num_hidden_layers)
        # [num_layers] CausalIndexer (a FastIndexer), None where the checkpoint has none
        self.indexers = swap.wrap_indexers(model, CausalIndexer)
        self.indexer_layers = set(range(self.num_layers)) if indexer_layers is None else set(indexer_layers)
        for i in range(self.num_layers):
            if i not in self.indexer_layers:
                self.indexers[i] = None
        require_indexers(pat.FULL + pat.SHARED * (self.num_layers - 1), self.indexer_layers, "the model",
                         ModelDirError, hint="; no pattern can run (layer 0 must be F)")
        # all-F, or as close as the checkpoint allows (F exactly where it has an indexer)
        self.pattern = "".join(pat.FULL if i in self.indexer_layers else pat.SHARED for i in range(self.num_layers))
        self.set_pattern(self.pattern)
        self.decode_stride = [1] * self.num_layers

    # ------------------------------------------------------------------ construction ----------
    @classmethod
    def from_pretrained(cls, model_dir, device="cpu", dtype=torch.float32, pattern: str | None = None,
                        attn_implementation: str = "sdpa"):
        """Load a HF GlmMoeDsa checkpoint with every layer's indexer that it holds.

        ``pattern`` (optional) is checked first: an F layer without indexer weights is refused with
        :class:`ModelDirError` (transformers would silently initialise it randomly).
        """
        from transformers import AutoConfig, AutoTokenizer, GlmMoeDsaForCausalLM

        info = load_model_info(model_dir)
        model_type = info.config.get("model_type")
        if model_type not in GLM_DSA_TYPES:
            raise ModelDirError(
                f"{model_dir}: model_type {model_type!r} is not supported by the transformers backend"
                f" (supported: {', '.join(GLM_DSA_TYPES)})"
            )
        have = info.layers_with_indexer
        if pattern is not None:
            require_indexers(pat.validate(pattern, info.num_dsa_layers), have, str(model_dir), ModelDirError)
        config = AutoConfig.from_pretrained(model_dir)
        # Build an indexer exactly where the checkpoint has weights; the pattern decides use later.
        config.indexer_types = ["full" if i in have else "shared" for i in range(info.num_dsa_layers)]
        try:
            model = GlmMoeDsaForCausalLM.from_pretrained(
                model_dir, config=config, dtype=dtype, attn_implementation=attn_implementation
            ).to(device)
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"cannot load {model_dir} with transformers: {exc}".splitlines()[0]) from exc
        tokenizer = None
        if any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        backend = cls(model, tokenizer, indexer_layers=have, path=Path(model_dir))
        if pattern is not None:
            backend.set_pattern(pattern)
        return backend

    @classmethod
    def from_config(cls, config: dict, num_layers: int | None = None, seed: int = 0, dtype=torch.float32,
                    device="cpu", overrides: dict | None = None, attn_implementation: str = "sdpa"):
        """Random weights for a GlmMoeDsa config dict (e.g. ``configs.named_config("glm-5")``).

        ``num_layers`` cuts the depth; ``overrides`` replaces config keys (e.g. a smaller
        ``vocab_size`` to save memory in tests). Every layer gets an indexer.
        """
        from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

        values = {k: v for k, v in dict(config).items() if k not in ("model_type", "indexer_types")}
        values.update(overrides or {})
        if num_layers is not None:
            values["num_hidden_layers"] = int(num_layers)
        layers = int(values["num_hidden_layers"])
        values["indexer_types"] = ["full"] * layers
        values.pop("mlp_layer_types", None)
        hf_config = GlmMoeDsaConfig(**values)
        hf_config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = GlmMoeDsaForCausalLM(hf_config)
        finally:
            torch.set_default_dtype(previous)
        return cls(model.to(device=device, dtype=dtype))

    # ------------------------------------------------------------------ pattern --------------
    def set_pattern(self, pattern: str) -> str:
        """Switch to ``pattern`` without reloading: S layers' indexers detached, F layers' restored."""
        pattern = pat.validate(pattern, self.num_layers)
        require_indexers(pattern, self.indexer_layers, "the model")
        self.pattern = swap.apply_pattern(self.model, self.indexers, pattern)
        return pattern

    def set_decode_stride(self, strides) -> list[int]:
        """Per-layer decode strides (a list, one per layer, or one int for all; 1 = today's top-k).

        Simulated teacher-forced (``models/decode_reuse.py``); only F layers' entries matter.
        """
        if isinstance(strides, int) and not isinstance(strides, bool):
            strides = pat.uniform_strides(self.num_layers, strides)
        self.decode_stride = pat.validate_strides(strides, self.num_layers)
        for indexer, stride in zip(self.indexers, self.decode_stride):
            if indexer is not None:
                indexer.decode_stride = stride
        return self.decode_stride

    @property
    def start_pattern(self) -> str:
        """All F, or F exactly where the checkpoint has an indexer (the greedy search's start)."""
        return "".join(pat.SHARED if ix is None else pat.FULL for ix in self.indexers)

    def _attach(self, i: int, full: bool) -> None:
        if full:
            require_indexers(self.pattern[:i] + pat.FULL + self.pattern[i + 1:], self.indexer_layers, "the model")
        swap.set_indexers(self.model, {i: self.indexers[i] if full else None})

    # ------------------------------------------------------------------ layer-wise API --------
    @torch.inference_mode()
    def begin(self, input_ids: torch.Tensor) -> LayerState:
        """Embeddings, causal mask and RoPE for a batch ``input_ids [B, S]`` (int64)."""
        from transformers.masking_utils import create_causal_mask

        inner = self.model.model
        input_ids = input_ids.to(inner.embed_tokens.weight.device)
        hidden = inner.embed_tokens(input_ids)  # [B, S, hidden]
        position_ids = torch.arange(input_ids.shape[1], device=hidden.device)[None]  # [1, S]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
            position_ids=position_ids, allow_is_causal_skip=False,
        )
        pos = inner.rotary_emb(hidden, position_ids=position_ids)
        return LayerState(hidden, None, mask, pos, position_ids)

    @torch.inference_mode()
    def layer(self, i: int, state: LayerState, full: bool, stride: int | None = None) -> LayerState:
        """Run decoder layer ``i``: ``full`` -> its own indexer, else reuse ``state.topk``.

        ``stride`` (F layers): this call's decode stride instead of ``decode_stride[i]``. Leaves the
        layer's indexer attached as the current pattern says, with its own stride.
        """
        if not full and state.topk is None:
            raise PatternError(f"layer {i} is S but no earlier F layer produced a top-k")
        self._attach(i, full)
        if full and stride is not None:
            self.indexers[i].decode_stride = stride
        layer = self.model.model.layers[i]
        try:
            if self.sparse_attention:
                hidden, topk = sparse_attention.decoder_layer(layer, state.hidden, state.position_embeddings,
                                                              state.mask, state.position_ids, state.topk)
            else:
                hidden, topk = layer(
                    state.hidden, attention_mask=state.mask, position_embeddings=state.position_embeddings,
                    position_ids=state.position_ids, prev_topk_indices=state.topk,
                )
        finally:
            self._attach(i, self.pattern[i] == pat.FULL)
            if self.indexers[i] is not None:
                self.indexers[i].decode_stride = self.decode_stride[i]
        return replace(state, hidden=hidden, topk=topk)

    @torch.inference_mode()
    def end(self, state: LayerState, input_ids: torch.Tensor) -> tuple[float, int]:
        """Final norm + lm_head; summed next-token NLL (float64 sum of float32 terms) and count."""
        return lm_loss.next_token_nll(self.model, state.hidden, input_ids)

    # ------------------------------------------------------------------ whole batches ---------
    @torch.inference_mode()
    def batch_nll(self, input_ids: torch.Tensor, pattern: str | None = None) -> tuple[float, int]:
        """Summed NLL and token count of one batch ``[B, S]`` under ``pattern`` (default: current)."""
        pattern = self.pattern if pattern is None else pat.validate(pattern, self.num_layers)
        state = self.begin(input_ids)
        for i in range(self.num_layers):
            state = self.layer(i, state, pattern[i] == pat.FULL)
        return self.end(state, input_ids)

    def loss(self, blocks, batch_size: int = 4, progress=None) -> LossResult:
        """Mean LM loss of ``blocks`` (TokenBlocks or LongTensor ``[n, S]``) under the current pattern."""
        return summed_loss(self.batch_nll, blocks, batch_size, progress)

    @torch.inference_mode()
    def record_topk(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's OWN top-k ``[B, S, k]`` int32 on ``input_ids [B, S]`` (as if all F)."""
        require_every_indexer(self.num_layers, self.indexer_layers, "the model",
                              "recording every layer's own top-k needs every layer's indexer")
        state, out = self.begin(input_ids), []
        for i in range(self.num_layers):
            state = self.layer(i, state, True)
            out.append(state.topk)
        return out
