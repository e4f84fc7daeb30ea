"""A stack of DSA decoder layers with random weights, run under an IndexCache pattern.

Built from a named config (``sglang_indexcache.configs.named_config``) or a config dict, with a
given number of layers. Speed does not depend on trained weights, so the weights are random.
``F`` layers run their indexer; an ``S`` layer reuses the top-k of the nearest ``F`` layer before it
(``pattern.reuse_source``), exactly what IndexCache does at inference.

The stack's layers share one paged latent cache (prefill: the request's ``t`` tokens; decode: the
batch's cached tokens) and, in decode, one paged index-key cache: each layer still reads them in full
(far beyond any on-chip cache at benchmark sizes), and the stack fits in memory at long contexts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import pattern as pat
from ..errors import UsageError
from .layer import DSALayer
from .ops import PAGE_SIZE, KernelSet
from .shapes import LayerShapes, decode_experts, layer_shapes
from .timing import NullTimer, Timer, median_seconds

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _pages(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


@dataclass
class DecodeCaches:
    """Paged caches of ``b`` requests with ``cached`` tokens each (random contents).

    kv_cache [pages, 64, d_qk], k_cache [pages, 64, dI], page_table [b, max_pages] int32 (a random
    permutation of physical pages, as a long-running server's would be), seq_lens [b] int32, and
    scratch rows [b, d_qk] / [b, dI] for the step's new token."""

    kv_cache: torch.Tensor
    k_cache: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    kv_scratch: torch.Tensor
    k_scratch: torch.Tensor


class Stack:
    """``layers`` DSA layers of one shape; ``decode_batch`` sizes the MoE width for decode."""

    def __init__(self, config: dict, layers: int, device: torch.device, dtype: torch.dtype,
                 kernels: KernelSet, decode_batch: int | None = None, topk: int | None = None,
                 seed: int = 0):
        if layers <= 0:
            raise UsageError(f"--layers must be positive, got {layers}")
        self.shapes: LayerShapes = layer_shapes(config, topk)
        self.num_layers = layers
        self.device, self.dtype, self.kernels = device, dtype, kernels
        self.experts = (self.shapes.experts_active if decode_batch is None
                        else decode_experts(self.shapes, decode_batch))
        gen = torch.Generator(device=device).manual_seed(seed)
        self.layers = [DSALayer(self.shapes, self.experts, device, dtype, gen) for _ in range(layers)]
        self.gen = gen

    def random(self, *shape, dtype=None) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=dtype or self.dtype)

    # ------------------------------------------------------------------ prefill -------------
    def prefill_inputs(self, tokens: int):
        """(x [t, hidden], kv_cache [pages, 64, d_qk], page_row [pages] int32) for one request."""
        pages = _pages(tokens)
        kv_cache = torch.empty(pages, PAGE_SIZE, self.shapes.d_qk, dtype=self.dtype, device=self.device)
        page_row = torch.arange(pages, dtype=torch.int32, device=self.device)
        return self.random(tokens, self.shapes.hidden), kv_cache, page_row

    def prefill(self, inputs, pattern: str, chunk: int) -> dict:
        """Run one prefill of ``inputs`` under ``pattern``; returns the Timer's result."""
        x0, kv_cache, page_row = inputs
        x = x0.clone()
        timer = Timer(self.device)
        source = pat.reuse_source(pat.validate(pattern, self.num_layers))
        indices = {}
        with timer.whole():
            for i, layer in enumerate(self.layers):
                reuse = indices[source[i]] if source[i] != i else None
                indices[i] = layer.prefill(x, kv_cache, page_row, reuse, self.kernels, timer, i, chunk)
                for done in [j for j in indices if j not in source[i + 1:]]:
                    del indices[done]                               # no later layer reuses it
        return timer.result()

    # ------------------------------------------------------------------ decode --------------
    def decode_inputs(self, batch: int, cached: int):
        """(x [b, hidden], DecodeCaches) for ``batch`` requests of ``cached`` tokens each."""
        s, per = self.shapes, _pages(cached)
        pages = batch * per
        perm = torch.randperm(pages, generator=self.gen, device=self.device).to(torch.int32)
        caches = DecodeCaches(
            kv_cache=self.random(pages, PAGE_SIZE, s.d_qk),
            k_cache=self.random(pages, PAGE_SIZE, s.index_dim),
            page_table=perm.view(batch, per),
            seq_lens=torch.full((batch,), cached, dtype=torch.int32, device=self.device),
            kv_scratch=torch.empty(batch, s.d_qk, dtype=self.dtype, device=self.device),
            k_scratch=torch.empty(batch, s.index_dim, dtype=self.dtype, device=self.device),
        )
        return self.random(batch, s.hidden), caches

    def decode_graph_seconds(self, inputs, pattern: str, repeats: int) -> float:
        """Median seconds of one decode step under ``pattern`` replayed from a CUDA graph (no host
        launch overhead, as a serving engine runs decode); the per-component split comes from the
        eager steps of ``decode``."""
        graph = torch.cuda.CUDAGraph()
        self.decode(inputs, pattern, timer=NullTimer())            # warm-up: compile, allocate
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            self.decode(inputs, pattern, timer=NullTimer())
        seconds = median_seconds(graph.replay, self.device, repeats, warmup=1)
        del graph
        return seconds

    def decode(self, inputs, pattern: str, timer=None) -> dict | None:
        """One decode step of the whole stack under ``pattern``; returns the Timer's result."""
        x0, caches = inputs
        x = x0.clone()
        timer = timer or Timer(self.device)
        source = pat.reuse_source(pat.validate(pattern, self.num_layers))
        indices = {}
        with timer.whole():
            for i, layer in enumerate(self.layers):
                reuse = indices[source[i]] if source[i] != i else None
                indices[i] = layer.decode(x, caches, reuse, self.kernels, timer, i)
        return timer.result()
