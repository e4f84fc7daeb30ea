"""One DSA decoder layer with random weights, absorbed MLA, for speed measurements only.

Speed does not depend on trained weights: every product has the shapes of the real layer, and the
values are drawn so that activations stay finite (normal / sqrt(fan_in), RMSNorm before each block).
Rotary embeddings are left out (elementwise, negligible next to the products).

Prefill of ``t`` tokens runs in two passes over token chunks: pass A writes every token's latent
(``kv_lora + rope``) into the paged cache and, in an F layer, computes the indexer's q/k/weights
and its top-k; pass B computes the absorbed queries, the sparse attention over the top-k latents,
the output projection and the FFN. A decode step does the same for one new token per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import KernelSet
from .shapes import LayerShapes
from .timing import Timer


def _weight(n_in: int, n_out: int, gen, device, dtype, batch: int | None = None) -> torch.Tensor:
    shape = (n_in, n_out) if batch is None else (batch, n_in, n_out)
    w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / n_in ** 0.5
    return w.to(dtype)


class DSALayer:
    """Weights of one layer; ``experts`` = MLPs of ``ffn_inter`` the FFN is wide (see shapes.py)."""

    def __init__(self, s: LayerShapes, experts: int, device, dtype, gen: torch.Generator):
        self.s = s
        w = lambda n_in, n_out, batch=None: _weight(n_in, n_out, gen, device, dtype, batch)  # noqa: E731
        self.q_a = w(s.hidden, s.q_lora)                          # [hidden, q_lora]
        self.q_b = w(s.q_lora, s.heads * (s.qk_nope + s.rope))    # [q_lora, h*(nope+rope)]
        self.kv_a = w(s.hidden, s.kv_lora + s.rope)              # [hidden, d_qk]
        self.w_uk = w(s.qk_nope, s.kv_lora, batch=s.heads)        # [h, nope, kv_lora]
        self.w_uv = w(s.kv_lora, s.v_head, batch=s.heads)         # [h, kv_lora, v_head]
        self.o_proj = w(s.heads * s.v_head, s.hidden)            # [h*v_head, hidden]
        self.router = w(s.hidden, s.n_routed) if s.moe else None  # [hidden, n_routed]
        self.gate_up = w(s.hidden, 2 * s.ffn_inter * experts)     # [hidden, 2*ffn]
        self.down = w(s.ffn_inter * experts, s.hidden)           # [ffn, hidden]
        self.idx_q = w(s.q_lora, s.index_heads * s.index_dim)     # [q_lora, hI*dI]
        self.idx_k = w(s.hidden, s.index_dim)                     # [hidden, dI]
        self.idx_w = w(s.hidden, s.index_heads)                   # [hidden, hI]
        self.sm_scale = (s.qk_nope + s.rope) ** -0.5
        self.idx_scale = s.index_dim ** -0.5 * s.index_heads ** -0.5

    # ------------------------------------------------------------------ pieces --------------
    def _rms(self, x):
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6)

    def _latents(self, h):
        """h [c, hidden] normed -> (qa [c, q_lora], kv [c, d_qk])."""
        qa = self._rms(h @ self.q_a)
        kv = h @ self.kv_a
        kv[:, :self.s.kv_lora] = self._rms(kv[:, :self.s.kv_lora])
        return qa, kv

    def _index_inputs(self, h, qa):
        """-> q [c, hI, dI], weights [c, hI] fp32, k [c, dI] of the indexer."""
        s = self.s
        q = (qa @ self.idx_q).view(-1, s.index_heads, s.index_dim)
        k = F.layer_norm(h @ self.idx_k, (s.index_dim,))
        return q, (h @ self.idx_w).float(), k

    def _absorbed_query(self, qa):
        """qa [c, q_lora] -> [c, h, d_qk]: q_nope absorbed through W_UK, rope part appended."""
        s = self.s
        q = (qa @ self.q_b).view(-1, s.heads, s.qk_nope + s.rope)              # [c, h, nope+rope]
        q_lat = torch.bmm(q[..., :s.qk_nope].transpose(0, 1), self.w_uk)      # [h, c, kv_lora]
        return torch.cat([q_lat.transpose(0, 1), q[..., s.qk_nope:]], dim=-1)  # [c, h, d_qk]

    def _output_and_ffn(self, x, o):
        """x [c, hidden] (updated in place), o [c, h, kv_lora] attention output in latent space."""
        v = torch.bmm(o.transpose(0, 1), self.w_uv).transpose(0, 1)          # [c, h, v_head]
        x += v.reshape(x.shape[0], -1) @ self.o_proj
        h2 = self._rms(x)
        if self.router is not None:
            torch.topk(h2 @ self.router, k=1, dim=-1)                         # routing decision
        gate, up = (h2 @ self.gate_up).chunk(2, dim=-1)
        x += (F.silu(gate) * up) @ self.down

    # ------------------------------------------------------------------ prefill -------------
    def prefill(self, x, kv_cache, page_row, indices, kernels: KernelSet, timer: Timer, layer: int,
                chunk: int):
        """x [t, hidden] (updated in place), kv_cache [pages, 64, d_qk] (rows 0..t-1 written),
        page_row [pages] int32; ``indices`` [t, topk] int32 of an earlier F layer, or None to run
        this layer's indexer. Returns the indices this layer used."""
        s, t = self.s, x.shape[0]
        flat = kv_cache.view(-1, s.d_qk)[:t]                                  # [t, d_qk]
        qa = torch.empty(t, s.q_lora, dtype=x.dtype, device=x.device)         # [t, q_lora]
        with timer.section("dense", layer):
            for a in range(0, t, chunk):
                qa[a:a + chunk], flat[a:a + chunk] = self._latents(self._rms(x[a:a + chunk]))
        if indices is None:
            with timer.section("indexer", layer):
                q = torch.empty(t, s.index_heads, s.index_dim, dtype=x.dtype, device=x.device)
                w = torch.empty(t, s.index_heads, dtype=torch.float32, device=x.device)
                k = torch.empty(t, s.index_dim, dtype=x.dtype, device=x.device)
                for a in range(0, t, chunk):
                    q[a:a + chunk], w[a:a + chunk], k[a:a + chunk] = self._index_inputs(
                        self._rms(x[a:a + chunk]), qa[a:a + chunk])
                indices = kernels.indexer_prefill(q, w, k, s.topk, self.idx_scale)  # [t, topk]
                del q, w, k
        for a in range(0, t, chunk):
            with timer.section("dense", layer):
                q_abs = self._absorbed_query(qa[a:a + chunk])
            with timer.section("attention", layer):
                o = kernels.attention_prefill(q_abs, kv_cache, page_row, indices[a:a + chunk],
                                              self.sm_scale, s.kv_lora)
            with timer.section("dense", layer):
                self._output_and_ffn(x[a:a + chunk], o)
        return indices

    # ------------------------------------------------------------------ decode --------------
    def decode(self, x, caches, indices, kernels: KernelSet, timer: Timer, layer: int):
        """One step: x [b, hidden] (updated in place); ``caches`` a DecodeCaches; ``indices``
        [b, topk] of an earlier F layer or None. Returns the indices this layer used."""
        s = self.s
        with timer.section("dense", layer):
            h = self._rms(x)
            qa, kv = self._latents(h)
            caches.kv_scratch.copy_(kv)                                       # the new token's latent
            q_abs = self._absorbed_query(qa)
        if indices is None:
            with timer.section("indexer", layer):
                q, w, k = self._index_inputs(h, qa)
                caches.k_scratch.copy_(k)
                indices = kernels.indexer_decode(q, w, caches.k_cache, caches.page_table,
                                                 caches.seq_lens, s.topk, self.idx_scale)
        with timer.section("attention", layer):
            o = kernels.attention_decode(q_abs, caches.kv_cache, caches.page_table, indices,
                                         self.sm_scale, s.kv_lora)
        with timer.section("dense", layer):
            self._output_and_ffn(x, o)
        return indices
