"""HTTP side of the IndexCache endpoints (the routes in ``http_server.py`` only call these).

``GET /index_cache``: the state of every data-parallel rank's scheduler.
``POST /index_cache/pattern {"pattern": P}``: validate, wait until the schedulers are idle (between
batches), switch, flush the prefix cache. Needs ``--index-cache-calibration``.
``POST /index_cache/stride {"decode_stride": N or [one per layer]}``: switch the decode stride between
batches (a server started with ``--index-cache-decode-stride`` above 1, or in calibration mode).
``POST /index_cache/overlap {"text": [...]}``: run the texts with every indexer (all-F), capture
each layer's top-k, restore the pattern, and report per shared layer the recall of the reused
top-k against the layer's own (:mod:`.overlap`). Needs SGLang's ``--enable-return-indexer-topk``
(calibration mode leaves the capture off: it costs every forward a copy of all top-k to the host).
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from .. import pattern as pat
from . import overlap as overlap_mod
from . import runtime, settings as settings_mod

logger = logging.getLogger("sglang_indexcache.sglang")
SWITCH_TIMEOUT_S = 120.0
RETRY_S = 0.05


def _response(status: int, content: dict):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=content)


async def _ask(tokenizer_manager, action: str, pattern: str | None = None, decode_stride=None):
    from sglang.srt.managers.io_struct import IndexCacheReqInput

    extra = {} if decode_stride is None else {"decode_stride": decode_stride}
    return await tokenizer_manager.index_cache(IndexCacheReqInput(action=action, pattern=pattern, **extra))


async def get_route(tokenizer_manager):
    if settings_mod.resolve(tokenizer_manager.server_args) is None:
        return _response(404, {"error": "IndexCache is off: start the server with an --index-cache-* flag"})
    results = await _ask(tokenizer_manager, "get")
    failed = [r.message for r in results if not r.success]
    if failed:
        return _response(400, {"error": failed[0]})
    return _response(200, {**results[0].state, "ranks": [r.state for r in results]})


async def switch_pattern(tokenizer_manager, pattern: str, timeout_s: float = SWITCH_TIMEOUT_S):
    """Switch every rank to ``pattern``; returns (http status, body). Retries while ranks are busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = await _ask(tokenizer_manager, "set", pattern)
        errors = [r.message for r in results if not r.success and not r.busy]
        if errors:
            return 400, {"error": errors[0]}
        if not any(r.busy for r in results):
            runtime.remember_pattern(results[0].state["pattern"], results[0].state.get("decode_strides"))
            return 200, results[0].state
        if time.monotonic() >= deadline:
            return 503, {"error": f"requests still in flight after {timeout_s:.0f} s; pattern not switched everywhere"}
        await asyncio.sleep(RETRY_S)


async def pattern_route(tokenizer_manager, body):
    if not isinstance(body, dict) or not isinstance(body.get("pattern"), str):
        return _response(400, {"error": 'body must be {"pattern": "FSS..."}'})
    status, content = await switch_pattern(tokenizer_manager, body["pattern"])
    return _response(status, content)


async def stride_route(tokenizer_manager, body):
    """Switch every rank's decode strides; 400 with the message when a rank refuses (nothing switched
    there; a refusal is the same on every rank, as they share the flags and the pattern)."""
    value = body.get("decode_stride") if isinstance(body, dict) else None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not values:
        return _response(400, {"error": 'body must be {"decode_stride": N} or {"decode_stride": [one per layer]}'})
    if settings_mod.resolve(tokenizer_manager.server_args) is None:
        return _response(404, {"error": "IndexCache is off: start the server with an --index-cache-* flag"})
    results = await _ask(tokenizer_manager, "stride", decode_stride=values)
    errors = [r.message for r in results if not r.success]
    if errors:
        return _response(400, {"error": errors[0]})
    runtime.remember_pattern(results[0].state["pattern"], results[0].state["decode_strides"])
    return _response(200, results[0].state)


async def _capture_topk(tokenizer_manager, texts: list[str]) -> np.ndarray:
    """Prefill ``texts`` (one new token each) and return the captured top-k ``[t, l, k]``."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.state_capturer.indexer_topk import extract_indexer_topk_from_meta_info

    config = tokenizer_manager.model_config.hf_text_config
    layers, k = config.num_hidden_layers, config.index_topk
    obj = GenerateReqInput(text=texts, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                           return_indexer_topk=True)
    outputs = []
    async for out in tokenizer_manager.generate_request(obj, None):
        outputs.extend(out if isinstance(out, list) else [out])
    arrays = [extract_indexer_topk_from_meta_info(o).reshape(-1, layers, k) for o in outputs]
    return np.concatenate(arrays, axis=0)  # [t, l, k]


async def overlap_route(tokenizer_manager, body):
    texts = body.get("text") if isinstance(body, dict) else None
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        return _response(400, {"error": 'body must be {"text": ["...", ...]} with non-empty strings'})
    results = await _ask(tokenizer_manager, "get")
    if not results[0].success or not results[0].state.get("calibration"):
        return _response(400, {"error": "/index_cache/overlap needs --index-cache-calibration"})
    if not all(r.state.get("topk_capture") for r in results):
        return _response(400, {"error": "/index_cache/overlap needs the indexer top-k capture: start the server"
                                        " with --enable-return-indexer-topk too"})
    current = results[0].state["pattern"]
    status, state = await switch_pattern(tokenizer_manager, pat.FULL * len(current))
    if status != 200:
        return _response(status, state)
    try:
        topk = await _capture_topk(tokenizer_manager, texts)
    finally:
        status, state = await switch_pattern(tokenizer_manager, current)
    if status != 200:
        return _response(status, {"error": f"measured, but restoring {current} failed: {state['error']}"})
    return _response(200, overlap_mod.shared_layer_recall(topk, current))
