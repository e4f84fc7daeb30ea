"""Run-time side of the patched server: per-layer F/S switch, calibration state, scheduler handler.

The layers of SGLang's DeepSeek/GLM DSA models (``model.model.layers[i].self_attn``) carry
``skip_topk`` (this layer reuses the carried top-k instead of running its indexer) and
``next_skip_topk`` (this layer hands its top-k to the next one). :func:`apply_pattern` sets both
from a pattern, validating first so that an invalid pattern leaves the model untouched.

State is per process: the scheduler process registers its model when loaded
(:func:`on_model_loaded`); the HTTP process remembers the last pattern it switched to for the
server info.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import pattern as pat
from ..validation import require_indexers
from ..errors import UsageError
from . import decode_stride
from . import settings as settings_mod

logger = logging.getLogger("sglang_indexcache.sglang")

_STATE: dict[str, Any] = {"model": None, "settings": None, "pattern": None, "gauge": None, "stride_gauge": None,
                          "strides": None}


def attention_layers(model) -> list:
    """``self_attn`` of every main-model decoder layer (MTP/NextN draft layers are separate models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UsageError(f"{type(model).__name__} has no model.layers: not a DeepSeek/GLM DSA model")
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    bad = [i for i, a in enumerate(attns) if a is None or getattr(a, "skip_topk", None) is None]
    if bad:
        raise UsageError(f"layers {pat.layer_ranges(bad)} of {type(model).__name__} are not DSA layers on this rank")
    return attns


def model_pattern(model) -> str:
    """The pattern the model's layers run now (F where ``skip_topk`` is False)."""
    return "".join(pat.SHARED if a.skip_topk else pat.FULL for a in attention_layers(model))


def check_pattern(model, pattern: str) -> str:
    """Validate ``pattern`` for the loaded model: length, layer 0 F, an indexer on every F layer."""
    attns = attention_layers(model)
    pattern = pat.validate(pattern, len(attns))
    require_indexers(pattern, [i for i, a in enumerate(attns) if a.indexer is not None], "the loaded model",
                     hint="; start the server with --index-cache-calibration to keep every indexer")
    decode_stride.check_pattern(pattern)
    return pattern


def apply_pattern(model, pattern: str) -> str:
    """Set ``skip_topk``/``next_skip_topk`` of every layer from ``pattern``; all or nothing.

    Layer i: ``skip_topk = pattern[i] == "S"``, ``next_skip_topk = pattern[i + 1] == "S"`` (False
    for the last layer), exactly what SGLang builds for ``indexer_types`` of that pattern.
    """
    pattern = check_pattern(model, pattern)
    attns = attention_layers(model)
    for i, attn in enumerate(attns):
        attn.skip_topk = pattern[i] == pat.SHARED
        attn.next_skip_topk = i + 1 < len(pattern) and pattern[i + 1] == pat.SHARED
    decode_stride.on_pattern(pattern)
    return pattern


def on_model_loaded(model_runner) -> None:
    """ModelRunner.load_model hook: register the main model; in calibration mode set its pattern."""
    if getattr(model_runner, "is_draft_worker", False):
        return
    settings = settings_mod.resolve(model_runner.server_args)
    if settings is None:
        return
    model = model_runner.model
    if settings.calibration:  # built all-F; now run the start pattern (pp_size 1 is enforced)
        apply_pattern(model, settings.pattern)
    # Without calibration the layers were built from the pattern itself; they are not read here
    # (with pipeline parallelism a rank holds only some of them).
    decode_stride.configure(settings, model_runner.server_args)
    _STATE.update(model=model, settings=settings, pattern=settings.pattern)
    logger.info("IndexCache: model loaded with pattern %s", pat.describe(settings.pattern))


def make_gauge(gauge_cls, labels: dict, server_args) -> None:
    """SchedulerMetricsCollector hook: ``sglang:index_cache_kept_indexers`` (F layers running)."""
    settings = settings_mod.resolve(server_args)
    if settings is None:
        return
    gauge = gauge_cls(name="sglang:index_cache_kept_indexers",
                      documentation="IndexCache: number of DSA layers that run their own indexer (F layers).",
                      labelnames=labels.keys(), multiprocess_mode="mostrecent")
    _STATE["gauge"] = gauge.labels(**labels)
    _STATE["gauge"].set(settings.kept)
    stride = gauge_cls(name="sglang:index_cache_decode_stride",
                       documentation="IndexCache: effective decode stride of the F layers (harmonic mean; 1 = every"
                                     " F layer runs its indexer at every decode step).",
                       labelnames=labels.keys(), multiprocess_mode="mostrecent")
    _STATE["stride_gauge"] = stride.labels(**labels)
    _STATE["stride_gauge"].set(settings_mod.describe_strides(settings.pattern, settings.layer_strides(), None)
                               ["effective_stride"])


def state(settings=None) -> dict:
    settings = settings or _STATE["settings"]
    if settings is None:
        return {"enabled": False}
    current = _STATE["pattern"] or settings.pattern
    strides = _STATE["strides"] or settings.layer_strides()
    return {**settings.describe(), "enabled": True, "pattern": current, "kept_indexers": current.count(pat.FULL),
            "start_pattern": settings.pattern,
            **settings_mod.describe_strides(current, strides, settings.stride_source),
            **decode_stride.state()}


def server_info(server_args) -> dict | None:
    """The ``index_cache`` entry of /server_info (None when IndexCache is off: no entry at all)."""
    settings = settings_mod.resolve(server_args)
    return None if settings is None else state(settings)


def handle_request(scheduler, req):
    """Scheduler handler of ``IndexCacheReqInput``: ``get`` the state or ``set`` a pattern.

    A switch is validated first (an invalid pattern changes nothing) and runs between batches, so
    no batch ever mixes two patterns. When the scheduler is idle it switches and flushes the prefix
    cache (cached prefixes lack the index keys of layers that were S). With requests in flight it
    pauses generation in SGLang's retract mode (the running requests go back to the waiting queue
    and free their KV), switches, and continues: the retracted requests recompute their KV under
    the new pattern, none is lost. A scheduler paused by someone else answers ``busy`` (the HTTP
    side retries).
    """
    from sglang.srt.managers.io_struct import IndexCacheReqOutput

    model, settings = _STATE["model"], _STATE["settings"]
    if settings is None:
        return IndexCacheReqOutput(success=False, message="IndexCache is off (no --index-cache-* flag)")
    if req.action == "get":
        return IndexCacheReqOutput(success=True, state={**state(), "topk_capture": topk_capture_on()})
    if req.action == "stride":
        return _switch_stride(req)
    if req.action != "set":
        return IndexCacheReqOutput(success=False, message=f"unknown IndexCache action {req.action!r}")
    if not settings.calibration:
        return IndexCacheReqOutput(success=False, message="switching the pattern needs --index-cache-calibration")
    try:
        pattern = check_pattern(model, req.pattern or "")
    except UsageError as exc:
        return IndexCacheReqOutput(success=False, message=str(exc))
    if scheduler.is_fully_idle():
        apply_pattern(model, pattern)
        how = "prefix cache flushed" if scheduler.flush_cache() else "prefix cache flush failed"
    elif getattr(scheduler, "_engine_paused", False):
        return IndexCacheReqOutput(success=False, busy=True, message="generation is paused by another request")
    else:
        retracted = _switch_in_flight(scheduler, model, pattern)
        how = f"{retracted} running requests retracted, their KV recomputed under the new pattern"
    _STATE["pattern"] = pattern
    if _STATE["gauge"] is not None:
        _STATE["gauge"].set(pattern.count(pat.FULL))
    logger.info("IndexCache: switched to pattern %s; %s", pat.describe(pattern), how)
    return IndexCacheReqOutput(success=True, state=state())


def _switch_stride(req):
    """``stride``: new decode strides, between batches (no retraction: a stride changes no KV; every
    request refreshes its top-k at its next decode step)."""
    from sglang.srt.managers.io_struct import IndexCacheReqOutput

    current = _STATE["pattern"] or _STATE["settings"].pattern
    try:
        new = decode_stride.switch(getattr(req, "decode_stride", None), len(current))
    except UsageError as exc:
        return IndexCacheReqOutput(success=False, message=str(exc))
    _STATE["strides"] = decode_stride.state()["decode_strides"]
    if _STATE["stride_gauge"] is not None:
        _STATE["stride_gauge"].set(state()["effective_stride"])
    logger.info("IndexCache: switched to decode stride %s (effective %.2f); every request refreshes its top-k at its"
                " next decode step", new.describe(), state()["effective_stride"])
    return IndexCacheReqOutput(success=True, state=state())


def topk_capture_on() -> bool:
    """Whether this scheduler captures the indexer top-k (SGLang's --enable-return-indexer-topk)."""
    from sglang.srt.state_capturer.indexer_topk import get_global_indexer_capturer

    return get_global_indexer_capturer() is not None


def _switch_in_flight(scheduler, model, pattern: str) -> int:
    """Pause (retract mode), switch, continue; returns how many requests were retracted."""
    from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

    running = len(scheduler.running_batch.reqs) + (scheduler.chunked_req is not None)
    scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
    try:
        apply_pattern(model, pattern)
    finally:
        scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))
    return running


def remember_pattern(pattern: str, strides=None) -> None:
    """HTTP-process side: the pattern (and decode strides) the scheduler now runs (for /server_info)."""
    _STATE["pattern"] = pattern
    if strides is not None:
        _STATE["strides"] = list(strides)
