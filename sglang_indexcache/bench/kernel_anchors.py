"""Stock anchor kernels for ``bench kernels``, loaded when present, with the reason when not.

- FlashMLA (``sgl-flash-mla==1.0.0``, the wheel SGLang 0.5.23 pins): ``flash_mla_sparse_fwd`` with
  ``use_legacy=True`` (its SM90 sparse kernel), called with one query row per decode request.
- SGLang 0.5.23's own Triton sparse MLA decode (``sglang/kernels/ops/attention/dsa/
  triton_sparse_mla{,_decode}.py``), loaded from a folder holding those two files as shipped in the
  wheel (``scripts/fetch_kernel_anchors.sh`` extracts them; they are never committed). Its few
  imports from the rest of SGLang (device queries, an fp8 helper) are answered by small stubs.
- DeepGEMM (``fp8_mqa_logits``): import attempted only, to report why it is absent.

Each loader returns ``(callable or None, status string)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

SGLANG_DSA = "sglang.kernels.ops.attention.dsa"


@functools.lru_cache(maxsize=None)
def load_flash_mla():
    """``fn(q [s_q,h,576], kv_flat [n,1,576], rows [s_q,1,topk] int32, sm_scale) -> out`` or None."""
    try:
        import flash_mla
    except Exception as exc:                                       # noqa: BLE001 - report any failure
        return None, f"flash_mla not importable: {type(exc).__name__}: {exc}"

    def run(q, kv_flat, rows, sm_scale):
        return flash_mla.flash_mla_sparse_fwd(q, kv_flat, rows, sm_scale, d_v=512, use_legacy=True,
                                              return_log2_lse=False)[0]

    return run, f"flash_mla {getattr(flash_mla, '__version__', '?')} (flash_mla_sparse_fwd, use_legacy=True)"


def _real_sglang() -> bool:
    try:
        return importlib.util.find_spec("sglang") is not None
    except ValueError:                                             # our own stub package (no spec)
        return False


def _stub(name: str, **attrs):
    mod = sys.modules.get(name) or types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    sys.modules[name] = mod
    return mod


@functools.lru_cache(maxsize=None)
def load_sglang_triton(folder: str | None):
    """``fn(q_nope, q_rope, kv_flat [n,1,576], rows [b,1,topk], sm_scale) -> out`` or None."""
    if _real_sglang():                                             # a real SGLang install: use it as is
        try:
            decode = importlib.import_module(f"{SGLANG_DSA}.triton_sparse_mla_decode").triton_sparse_mla_decode
        except Exception as exc:                                   # noqa: BLE001
            return None, f"SGLang installed but its Triton sparse MLA failed to import: {exc}"
        return (lambda qn, qr, kv, rows, scale: decode(qn, qr, kv, rows, scale, 512)), "installed SGLang"
    if not folder:
        return None, "SGLang Triton sparse MLA: no source folder given (--sglang-triton-dir)"
    src = Path(folder)
    files = [src / "triton_sparse_mla.py", src / "triton_sparse_mla_decode.py"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        return None, f"SGLang Triton sparse MLA: {', '.join(missing)} not in {folder}"
    try:
        import torch

        def core_count(device_index=0):
            return torch.cuda.get_device_properties(device_index).multi_processor_count

        for pkg in ("sglang", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.attention",
                    SGLANG_DSA, "sglang.kernels.ops.quantization", "sglang.srt"):
            _stub(pkg).__path__ = []
        _stub("sglang.kernels.ops.attention.metadata",
              q8kv8_topk_length_from_indices=lambda indices: (indices >= 0).sum(-1).int())
        _stub("sglang.kernels.ops.quantization.fp8_kernel", is_fp8_fnuz=lambda: False)
        _stub("sglang.srt.utils", get_device_core_count=core_count, is_gfx95_supported=lambda: False)
        for f in files:
            name = f"{SGLANG_DSA}.{f.stem}"
            spec = importlib.util.spec_from_file_location(name, f)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        decode = sys.modules[f"{SGLANG_DSA}.triton_sparse_mla_decode"].triton_sparse_mla_decode
    except Exception as exc:                                       # noqa: BLE001
        return None, f"SGLang Triton sparse MLA failed to load: {type(exc).__name__}: {exc}"

    def run(q_nope, q_rope, kv_flat, rows, sm_scale):
        return decode(q_nope, q_rope, kv_flat, rows, sm_scale, 512)

    return run, "SGLang 0.5.23 triton_sparse_mla_decode (source from the wheel)"


def probe_deep_gemm() -> str:
    """Why DeepGEMM's indexer logits cannot be the anchor here (or that it loads)."""
    try:
        dg = importlib.import_module("deep_gemm")
    except Exception as exc:                                       # noqa: BLE001
        return f"deep_gemm not available: {type(exc).__name__}: {str(exc)[:160]}"
    return f"deep_gemm {getattr(dg, '__version__', '?')} imports (not wired: compare with the FLOP floor)"
