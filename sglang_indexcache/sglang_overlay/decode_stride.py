"""Decode stride in SGLang: the per-request top-k store beside the KV pool and the hooks of patch 0007.

``--index-cache-decode-stride N`` (or a pattern file's ``decode_stride``): an F layer refreshes its
top-k every ``N`` decode steps of a request and in between reuses what it stored, merged with the
positions generated since (``kernels/topk_reuse.py``; the rule and its measured quality:
``models/decode_reuse.py``, docs/quality.md). Which layers refresh is decided per batch on the CPU
(``stride_state``); the GPU side reads everything from device tensors, so both step kinds are
captured as CUDA graphs. Without a stride above 1 (and outside calibration mode) nothing here is
allocated or registered and every hook returns SGLang's own value.

The store (:class:`TopkStore`, on the GPU, per process / TP rank): for each F layer of a stride
group, ``[R, index_topk]`` int32 (``R``: the ``ReqToTokenPool`` rows) holding the top-k of the
row's last refresh sorted by score, best first, as the decode backend consumes it (physical KV
slots when SGLang fuses the top-k with the page-table transform, its default; positions otherwise),
and ``[R]`` int32, the query position of that refresh. Rows follow SGLang's own request slots, so
the store is allocated once and never resized; a slot's entry is valid only while the mirror on the
CPU (``stride_state.RowMirror``) says so.

Hooks (``0007-index-cache-decode-stride.patch``, both releases):

- ``ForwardBatch.init_new`` -> :func:`on_forward_batch`: the step kind of the batch (a plain decode
  batch), or invalidation of its rows (anything else), kept on the ForwardBatch as ``index_cache_step``;
- ``Indexer.forward_cuda`` -> :func:`reuse_topk`: on a reuse step of this layer, write the new
  token's index key and return the merged set (no logits, no top-k);
- ``Indexer._get_topk_paged`` -> :func:`topk_transform`: on a refresh step, the top-k sorted by score,
  mapped like SGLang's own, written to the store;
- the decode CUDA-graph runner: one graph per step kind (0.5.23: :func:`graph_variants`, SGLang's
  attention graph variants; 0.5.17: :func:`capture_labels` / :func:`capturing` / :func:`graph_label`
  beside its lora/nolora labels);
- run-time switch (``POST /index_cache/stride``): :func:`switch`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .. import pattern as pat
from ..errors import UsageError
from . import compat
from .stride_state import REFRESH, RowMirror, StridePlan, kind_label

logger = logging.getLogger("sglang_indexcache.sglang")

STEP_ATTR = "index_cache_step"  # ForwardBatch attribute set by on_forward_batch
_STATE: dict[str, Any] = {"plan": None, "layer_strides": None, "switchable": False, "captured": None,
                          "conflict": None, "mirror": None, "store": None, "capturing": None}


@dataclass(frozen=True)
class Step:
    """A decode batch's step kind under the plan it was decided with."""

    plan: StridePlan
    kind: int

    @property
    def label(self) -> str:
        return kind_label(self.kind, len(self.plan.groups))


class TopkStore:
    """Per F layer of a stride group: ``topk [R, k]`` int32 and ``pos [R]`` int32 on one device."""

    def __init__(self, rows: int, k: int, device):
        self.rows, self.k, self.device = rows, k, device
        self.layers: dict[int, tuple[Any, Any]] = {}

    def ensure(self, layers) -> list[int]:
        """Allocate the layers not yet held (filled with -1); returns the new ones."""
        import torch

        new = [i for i in layers if i not in self.layers]
        for i in new:
            self.layers[i] = (torch.full((self.rows, self.k), -1, dtype=torch.int32, device=self.device),
                              torch.full((self.rows,), -1, dtype=torch.int32, device=self.device))
        return new

    @property
    def nbytes(self) -> int:
        return len(self.layers) * self.rows * (self.k + 1) * 4


# ------------------------------------------------------------------ set-up and switches ------------

def configure(settings, server_args=None) -> None:
    """At model load (``runtime.on_model_loaded``): the plan of ``settings``; nothing when it has no
    stride above 1, except in calibration mode, where strides can be switched on at run time."""
    from .settings import stride_conflict

    _STATE.update(plan=None, layer_strides=None, switchable=False, captured=None, mirror=None, store=None)
    if settings is None or (not settings.strides and not settings.calibration):
        return
    strides = settings.layer_strides()
    _STATE.update(plan=StridePlan.of(settings.pattern, strides), layer_strides=strides,
                  switchable=settings.calibration or bool(settings.strides),
                  conflict=stride_conflict(server_args) if server_args is not None else None)


def plan() -> StridePlan | None:
    return _STATE["plan"]


def state() -> dict:
    """The decode-stride part of ``GET /index_cache`` (scheduler side)."""
    from .settings import describe_strides

    current = _STATE["plan"]
    if current is None:
        return {}
    store = _STATE["store"]
    described = describe_strides(current.pattern, _STATE["layer_strides"], None)
    described.pop("stride_source")
    return {**described, "stride_switchable": _STATE["switchable"], "store_bytes": store.nbytes if store else 0}


def check_pattern(pattern: str) -> StridePlan | None:
    """The plan ``pattern`` would run with the current strides (calibration mode regroups the F
    layers at a pattern switch); a UsageError when they would need too many groups."""
    if _STATE["plan"] is None:
        return None
    try:
        return StridePlan.of(pattern, _STATE["layer_strides"])
    except UsageError as exc:
        raise UsageError(f"pattern {pattern} with the current decode strides: {exc}; switch the strides first") from exc


def on_pattern(pattern: str) -> None:
    """Calibration mode switched the pattern: regroup the F layers (no CUDA graphs there)."""
    new = check_pattern(pattern)
    if new is not None:
        _STATE.update(plan=new, mirror=None)


def switch(values, num_layers: int) -> StridePlan:
    """Set the decode strides (one value for every layer, or one per layer); UsageError when this
    server cannot. Runs between batches; every request refreshes at its next decode step."""
    current = _STATE["plan"]
    if current is None or not _STATE["switchable"]:
        raise UsageError("this server started without --index-cache-decode-stride above 1 (no top-k store, no CUDA"
                         " graph for reuse steps): restart it with one, or with --index-cache-calibration")
    if _STATE["conflict"]:
        raise UsageError(f"a decode stride cannot run with {_STATE['conflict']}")
    if not isinstance(values, list) or not values:
        raise UsageError(f"decode_stride must be a positive integer or a list of {num_layers}, got {values!r}")
    strides = values * num_layers if len(values) == 1 else values
    try:
        strides = pat.validate_strides(strides, num_layers)
        new = current.with_strides(strides) if _STATE["captured"] is not None else StridePlan.of(current.pattern, strides)
    except UsageError as exc:
        raise UsageError(f"decode_stride: {exc}") from exc
    _STATE.update(plan=new, layer_strides=strides, mirror=None)
    return new


# ------------------------------------------------------------------ scheduler side: the step kind --

def on_forward_batch(forward_batch, batch, model_runner) -> None:
    """``ForwardBatch.init_new``: decide a plain decode batch's step kind; invalidate the rows of any
    other forward (prefill, chunk, mixed, PD-transferred) so that they refresh at their next decode."""
    current = _STATE["plan"]
    if current is None or getattr(model_runner, "is_draft_worker", False):
        return
    mode = batch.forward_mode
    if mode.is_idle():
        return
    pool = model_runner.req_to_token_pool
    mirror = _mirror(current, pool)
    rows = [compat.req_row(req) for req in batch.reqs]
    if not mode.is_decode():
        mirror.invalidate(rows)
        return
    if not current.active:
        return
    _ensure_store(model_runner, current)
    if batch.seq_lens_cpu is None:
        kind = mirror.refresh_without_positions(current, rows)
    else:
        gens = pool.req_generation[rows].tolist()
        kind = mirror.decide(current, rows, gens, (batch.seq_lens_cpu - 1).tolist())
    setattr(forward_batch, STEP_ATTR, Step(current, kind))


def _mirror(current: StridePlan, pool) -> RowMirror:
    mirror = _STATE["mirror"]
    if mirror is None or mirror.gen.shape[0] != len(current.groups):
        mirror = _STATE["mirror"] = RowMirror(len(current.groups), pool.req_to_token.shape[0])
    return mirror


def _ensure_store(model_runner, current: StridePlan) -> TopkStore:
    store = _STATE["store"]
    if store is None:
        req_to_token = model_runner.req_to_token_pool.req_to_token
        k = int(model_runner.model_config.hf_text_config.index_topk)
        store = _STATE["store"] = TopkStore(req_to_token.shape[0], k, req_to_token.device)
    new = store.ensure([i for layers in current.groups for i in layers])
    if new:
        logger.info("IndexCache: decode stride %s: top-k store for layers %s: %d layers x %d request slots x (%d + 1)"
                    " x 4 B = %.1f MB on %s", current.describe(), pat.layer_ranges(store.layers), len(store.layers),
                    store.rows, store.k, store.nbytes / 1e6, store.device)
    return store


# ------------------------------------------------------------------ indexer hooks ------------------

def _step(forward_batch) -> Step | None:
    current = _STATE["plan"]
    if current is None or not current.active:
        return None
    from sglang.srt.model_executor.runner import get_is_capture_mode

    if get_is_capture_mode():
        label = _STATE["capturing"] or compat.attention_variant()
        return Step(current, current.kind_of(label)) if label else None
    return getattr(forward_batch, STEP_ATTR, None)


def reuse_topk(indexer, x, positions, forward_batch, layer_id: int, act_quant, metadata, return_indices: bool):
    """``Indexer.forward_cuda``, after its metadata: on a reuse step of this layer, store the new
    token's index key and return the stored top-k merged with the newer positions; else None (the
    indexer runs as usual)."""
    step = _step(forward_batch)
    if (step is None or metadata is None or not return_indices or not forward_batch.forward_mode.is_decode()
            or step.plan.refreshes(layer_id, step.kind)):
        return None
    import torch

    from ..kernels.topk_reuse import merge_reused_topk

    compat.store_index_keys(indexer, x, positions, forward_batch, layer_id, act_quant, metadata)
    stored, refresh_pos = _STATE["store"].layers[layer_id]
    fused = compat.fused_topk(metadata)
    out = merge_reused_topk(stored, refresh_pos, forward_batch.req_pool_indices, forward_batch.seq_lens,
                            metadata.get_page_table_64() if fused else None,
                            metadata.attn_metadata.page_size if fused else 1)
    rows = (x[0] if isinstance(x, tuple) else x).shape[0]
    if rows > out.shape[0]:  # padded hidden states (attention TP / DP padding), as the stock path pads
        out = torch.cat([out, out.new_full((rows - out.shape[0], out.shape[1]), -1)])
    return out


def topk_transform(indexer, metadata, logits, forward_batch, layer_id: int):
    """``Indexer._get_topk_paged``'s ``metadata.topk_transform(logits, k)``: on a decode step of a
    layer with a stride, its refresh: the top-k sorted by score (best first), as SGLang's would be
    handed to the decode backend, written to the store with this step's positions."""
    step = _step(forward_batch)
    if step is None or not forward_batch.forward_mode.is_decode() or step.plan.group_of(layer_id) is None:
        return metadata.topk_transform(logits, indexer.index_topk)
    from ..kernels.topk_reuse import order_by_score, positions_to_slots

    unsorted = metadata.topk_backend.topk_func(logits, metadata.get_seqlens_expanded(), indexer.index_topk)
    out = order_by_score(unsorted, logits)
    if compat.fused_topk(metadata):
        out = positions_to_slots(out, metadata.get_page_table_64(), metadata.attn_metadata.page_size)
    stored, refresh_pos = _STATE["store"].layers[layer_id]
    n = out.shape[0]
    rows = forward_batch.req_pool_indices[:n].long()
    stored.index_copy_(0, rows, out)
    refresh_pos.index_copy_(0, rows, (forward_batch.seq_lens[:n] - 1).to(refresh_pos.dtype))
    return out


# ------------------------------------------------------------------ CUDA graphs --------------------

@dataclass(frozen=True)
class StrideGraphVariants:
    """SGLang 0.5.23's ``AttentionGraphVariants``: one decode graph per step kind."""

    capture_labels: tuple[str, ...]

    def select(self, forward_batch) -> str:
        step = getattr(forward_batch, STEP_ATTR, None)
        return step.label if step is not None else REFRESH  # a batch not from init_new: refresh (always safe)


def capture_labels(model_runner) -> tuple:
    """The step kinds to capture for each batch size (``(None,)``: no decode stride, stock capture).
    Allocates the store and freezes the groups: a run-time switch may then change strides only."""
    current = _STATE["plan"]
    if current is None or not current.active or getattr(model_runner, "is_draft_worker", False):
        return (None,)
    _ensure_store(model_runner, current)
    if _STATE["captured"] is None:
        logger.info("IndexCache: decode stride %s: capturing %d decode graphs per batch size (%s)", current.describe(),
                    current.kinds, ", ".join(current.labels()))
    _STATE["captured"] = current.groups
    return current.labels()


def graph_variants(model_runner, stock):
    """0.5.23: the decode runner's attention graph variants (``stock``: SGLang's own, None on CUDA)."""
    labels = capture_labels(model_runner)
    if labels == (None,):
        return stock
    if stock is not None:
        raise RuntimeError("IndexCache: the decode stride cannot be combined with SGLang's own attention graph"
                           f" variants {stock.capture_labels} (ROCm DSA / DSv4.1)")
    return StrideGraphVariants(labels)


@contextlib.contextmanager
def capturing(label):
    """0.5.17: the step kind being captured (read by the indexer hooks)."""
    _STATE["capturing"] = label
    try:
        yield
    finally:
        _STATE["capturing"] = None


def graph_label(label, kind_or_batch):
    """0.5.17's graph key label with the step kind joined (``label`` unchanged without a stride)."""
    kind = kind_or_batch
    if kind is not None and not isinstance(kind, str):
        step = getattr(kind, STEP_ATTR, None)
        current = _STATE["plan"]
        kind = step.label if step is not None else (REFRESH if current is not None and current.active else None)
    if kind is None:
        return label
    return kind if label is None else f"{label}+{kind}"
