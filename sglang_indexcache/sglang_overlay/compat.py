"""The few places where SGLang releases differ for the overlay (one adapter, no second copy of logic).

Supported releases are listed in ``patches/sglang-version``. What differs:

| | 0.5.17 | 0.5.23 |
|---|---|---|
| argument resolution | ``ServerArgs.__post_init__`` mutates the fields; a declaration overlay is read through ``overrides.resolved_view`` | lazy: ``overrides.resolving_view`` / ``declare_resolution`` |
| CUDA graphs off | set ``cuda_graph_config.<phase>.backend`` on the fields | ``with_phase`` declared as a resolution |
| config keys that select the pattern | ``cli_factor`` (the model class), then ``index_topk_pattern``, then the frequency | ``indexer_types`` first, then ``index_topk_pattern`` and the frequency |
| S layers' indexer module (stock) | built (and loaded where weights exist), not run | not built |
| S layers' index-K buffer (stock) | allocated and counted in the pool sizing, never used | 0-row, not counted |

With a pattern flag both releases build neither (``shared_layers``; 0.5.17 through patch 0006).
The decode stride (patch 0007) needs a few more: the request's pool row, the capture label, how a
decode step stores index keys without its top-k (:func:`store_index_keys`).
Everything else (flags, validation, endpoints, runtime switch) is the same code for both.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def release() -> str:
    """The SGLang version this process imports (``"0.5.17"``, ``"0.5.23"``...)."""
    from sglang.version import __version__

    return str(__version__)


def _lazy_resolution() -> bool:
    """0.5.23-style lazy resolution (``resolving_view``/``declare_resolution``) is available."""
    try:
        from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view  # noqa: F401
    except ImportError:
        return False
    return True


def resolving_view(server_args):
    """A read-only view of the arguments as resolved so far (mid-resolution reads)."""
    if _lazy_resolution():
        from sglang.srt.arg_groups.overrides import resolving_view as view
    else:
        from sglang.srt.arg_groups.overrides import resolved_view as view
    return view(server_args)


# Whether ``dsa_layer_skips_topk`` reads ``indexer_types`` before ``index_topk_pattern`` (read in
# each release's srt/configs/model_config.py).
READS_INDEXER_TYPES = {"0.5.17": False, "0.5.23": True}


# Whether the DeepSeek/GLM model class reads ``cli_factor`` (before ``dsa_layer_skips_topk``); read in
# each release's srt/models/deepseek_v2.py.
READS_CLI_FACTOR = {"0.5.17": True, "0.5.23": False}


def reads_indexer_types() -> bool:
    """Whether this release's ``dsa_layer_skips_topk`` reads ``indexer_types`` before the pattern."""
    return READS_INDEXER_TYPES.get(release(), True)


def reads_cli_factor() -> bool:
    """Whether this release's model class picks S layers from ``cli_factor`` first."""
    return READS_CLI_FACTOR.get(release(), False)


def calibration_adjustments(server_args, cfg, source: str) -> None:
    """Calibration mode: no CUDA graph in any phase, no radix cache.

    The radix cache goes because a prefix cached under one pattern lacks the index keys of the
    layers another pattern makes F; with it off, a switch under load retracts the running requests
    and they recompute their whole KV under the new pattern (``runtime.handle_request``). SGLang's
    indexer top-k capture is left as the user set it (``--enable-return-indexer-topk``, needed by
    ``/index_cache/overlap`` only): once on, every forward copies every layer's top-k of every
    token to a pinned host buffer of ``max_total_tokens x layers x index_topk`` int32, which
    ``calibrate --url`` does not need.
    """
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase

    if _lazy_resolution():
        from sglang.srt.arg_groups.overrides import declare_resolution
        from sglang.srt.model_executor.cuda_graph_config import with_phase

        graphs = cfg.cuda_graph_config
        for phase in Phase.ALL:
            graphs = with_phase(graphs, phase, backend=Backend.DISABLED)
        declare_resolution(server_args, source, cuda_graph_config=graphs, disable_radix_cache=True)
        return
    # 0.5.17: __post_init__ has already parsed cuda_graph_config into per-phase objects; the
    # runtime reads the fields once resolution ends, and no model declaration touches them.
    for phase in Phase.ALL:
        getattr(server_args.cuda_graph_config, phase).backend = Backend.DISABLED
    server_args.disable_cuda_graph = True
    server_args.disable_radix_cache = True


# ------------------------------------------------------------------ decode stride (0007) -----------

def is_hip() -> bool:
    """Whether this process runs on ROCm (the decode stride is built for CUDA only)."""
    import torch

    return getattr(torch.version, "hip", None) is not None


def req_row(req) -> int | None:
    """The request's row of the ``ReqToTokenPool`` (0.5.23 keeps it in ``req.kv``)."""
    kv = getattr(req, "kv", None)
    return kv.req_pool_idx if kv is not None and hasattr(kv, "req_pool_idx") else req.req_pool_idx


def attention_variant() -> str | None:
    """0.5.23: the attention graph variant being captured (our step-kind label while capturing a
    decode graph); None on 0.5.17, whose capture loop sets the label through ``decode_stride``."""
    try:
        from sglang.srt.model_executor.runner_utils.capture_mode import get_capture_attention_variant
    except ImportError:
        return None
    return get_capture_attention_variant()


def fused_topk(metadata) -> bool:
    """Whether the indexer's top-k is fused with the page-table transform, i.e. hands the decode
    backend physical KV slots (both releases' ``DSATopKBackend.topk_transform``), else positions."""
    from sglang.srt.environ import envs

    return bool(envs.SGLANG_DSA_FUSE_TOPK.get()) and not getattr(metadata, "force_unfused_topk", False)


def store_index_keys(indexer, x, positions, forward_batch, layer_id: int, act_quant, metadata) -> None:
    """Write this step's index keys of layer ``layer_id`` (what a reuse step still has to do).

    0.5.23's ``_forward_cuda_k_only`` takes decode batches (``return_indices=False``: keys only);
    0.5.17's asserts prefill, so its two store paths are called as it calls them."""
    if release() != "0.5.17":
        indexer._forward_cuda_k_only(x, positions, forward_batch, layer_id, act_quant, metadata, return_indices=False)
        return
    if indexer.use_dsa_indexer_fusion:
        key_raw, _ = indexer._fused_k_weights(x)
        indexer._fused_k_prepare_and_store(key_raw, positions, forward_batch, layer_id, act_quant)
    else:
        key = indexer._get_k_bf16(x, positions)
        indexer._store_index_k_cache(forward_batch=forward_batch, layer_id=layer_id, key=key, act_quant=act_quant)


def decode_graph_backend(cfg) -> str | None:
    """The decode CUDA-graph backend asked for (``--cuda-graph-backend-decode``, else the resolved
    ``cuda_graph_config``): ``full`` (both releases' default), ``breakable``, ``tc_piecewise``, ``disabled``."""
    asked = getattr(cfg, "cuda_graph_backend_decode", None)
    if asked:
        return str(getattr(asked, "value", asked))
    graphs = getattr(cfg, "cuda_graph_config", None)
    phase = getattr(graphs, "decode", None) if graphs is not None and not isinstance(graphs, dict) else (
        (graphs or {}).get("decode"))
    backend = phase.get("backend") if isinstance(phase, dict) else getattr(phase, "backend", None)
    return None if backend is None else str(getattr(backend, "value", backend))
