"""SGLang's own KV-pool sizing and DSA pool on the CPU (0.5.17 and 0.5.23), for driver.py's ``pool`` cases.

:func:`run` builds the release's real ``KVCacheConfigurator`` (the object ``ModelRunner`` builds)
for the resolved server args, asks the release's ``create_memory_pool_configurator`` for the cell
size (bytes per token) and ``max_total_num_tokens`` at a fixed byte budget (what
``--mem-fraction-static`` turns into on a GPU), then builds the DSA pool through the release's
``_build_dsa_kv_pool`` at a small token count and reads its index-K buffers. Every S layer's
buffer is asked for once (it must raise), every F layer's once (reading must answer; writing runs
SGLang's Triton store, which needs a GPU, so an F layer's write may fail here, but never with the
S-layer error).
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace


def _configurator(server_args, model_config, draft_layers: int, layers: tuple[int, int] | None,
                  draft_worker: bool = False):
    import torch
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo
    from sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state import SpecAuxHiddenStateConfig
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    start, end = layers or (0, model_config.hf_config.num_hidden_layers)
    fp8 = getattr(server_args, "kv_cache_dtype", "auto") == "fp8_e4m3"
    values = dict(
        device="cpu", gpu_id=0, ps=SimpleNamespace(pp_size=1, attn_dp_size=1, tp_rank=0), attn_dp_size=1, pp_size=1,
        pp_group=None, model=None, model_config=model_config, server_args=server_args,
        kv_cache_dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16,
        kv_cache_dtype_str="fp8_e4m3" if fp8 else "auto", model_dtype=torch.bfloat16, page_size=64,
        sliding_window_size=None,
        spec_algorithm=SpeculativeAlgorithm.EAGLE if draft_layers or draft_worker else SpeculativeAlgorithm.NONE,
        is_draft_worker=draft_worker, post_capture_kv_active=False,
        spec_aux_config=SpecAuxHiddenStateConfig(eagle_draft_num_layers=draft_layers or None),
        is_hybrid_swa=False, is_hybrid_swa_compress=False, use_mla_backend=True,
        layer_info=ModelLayerInfo(start_layer=start, end_layer=end, num_effective_layers=end - start),
        forward_stream=None, req_to_token_pool=None, token_to_kv_pool_allocator=None, memory_pool_config=None)
    fields = {f.name for f in dataclasses.fields(KVCacheConfigurator) if f.init}
    return KVCacheConfigurator(**{k: v for k, v in values.items() if k in fields})


def _build_pool(kvc, tokens: int):
    from sglang.srt.mem_cache.memory_pool import DSATokenToKVPool

    params = inspect.signature(kvc._build_dsa_kv_pool).parameters
    extra = {}
    if "max_running_requests" in params:  # 0.5.23
        extra = {"max_running_requests": 8, "dsa_pool_class": DSATokenToKVPool}
    return kvc._build_dsa_kv_pool(max_total_num_tokens=tokens, **extra)


def _ask(call) -> list[str] | None:
    """None when ``call`` answers, else ``[exception type, message]``."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return [type(exc).__name__, str(exc)]
    return None


def run(server_args, model_config, spec: dict) -> dict:
    """``spec``: ``budget`` (bytes), ``tokens`` (pool size to build), ``draft_layers`` (EAGLE/MTP layers
    sized with the target), ``layers`` ([start, end], a pipeline stage), ``draft_worker`` (the MTP
    draft's own one-layer pool, built from the target's config)."""
    import torch
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator

    layers = tuple(spec["layers"]) if spec.get("layers") else None
    kvc = _configurator(server_args, model_config, spec.get("draft_layers", 0), layers,
                        spec.get("draft_worker", False))
    sizing = create_memory_pool_configurator(kvc)
    result = {"cell": sizing._cell_size,
              "max_total_num_tokens": sizing.calculate_pool_sizes(spec["budget"], 64).max_total_num_tokens}
    pool = _build_pool(kvc, spec["tokens"])
    buffers = pool.index_k_with_scale_buffer
    result.update(
        index_k_shapes=[list(b.shape) for b in buffers],
        index_k_bytes=[b.numel() * b.element_size() for b in buffers],
        kv_bytes=[b.numel() * b.element_size() for b in pool.kv_buffer],
        skips=list(getattr(pool, "skip_topk_layers", None) or []),
        pool_type=type(pool).__name__)
    start = kvc.layer_info.start_layer
    loc = torch.arange(64, 128, dtype=torch.int64)
    key, scale = torch.zeros(64, 128, dtype=torch.float8_e4m3fn), torch.ones(64, 1, dtype=torch.float32)
    result["get_errors"] = [_ask(lambda i=i: pool.get_index_k_with_scale_buffer(i))
                            for i in range(start, start + len(buffers))]
    result["set_errors"] = [_ask(lambda i=i: pool.set_index_k_scale_buffer(i, loc, key, scale))
                            for i in range(start, start + len(buffers))]
    return result
