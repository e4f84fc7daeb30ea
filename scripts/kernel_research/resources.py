"""What the compiler gave a Triton kernel: registers, spills, shared memory, CTAs per SM (GPU).

``compiled(jit_fn)`` lists the kernels compiled so far for one ``@triton.jit`` function;
``new_since(jit_fn, before)`` the ones compiled after a snapshot, so that a benchmark can tie each
launch variant to its binary. ``occupancy(...)`` is the CTAs-per-SM bound of an SM90 multiprocessor
(64K registers, 228 KiB shared memory, 64 warps), the first thing to read when a latency-bound
kernel is slow: one CTA per SM means nothing overlaps its loads but its own pipeline stages.
"""

from __future__ import annotations

SM90 = {"regs": 65536, "smem": 233472, "smem_per_cta_reserved": 1024, "warps": 64, "ctas": 32}


def _kernel_caches(jit_fn):
    for entry in getattr(jit_fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cache, dict):
            yield cache


def snapshot(jit_fn) -> set[int]:
    """Ids of the kernels compiled so far for ``jit_fn``."""
    return {id(k) for cache in _kernel_caches(jit_fn) for k in cache.values()}


def occupancy(n_regs: int, num_warps: int, shared: int, limits: dict = SM90) -> dict:
    """CTAs per SM allowed by registers, shared memory and warps (registers allocated per warp in
    units of 256), and which of the three binds."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by = {
        "regs": limits["regs"] // (regs_per_warp * num_warps),
        "smem": limits["smem"] // (shared + limits["smem_per_cta_reserved"]),
        "warps": limits["warps"] // num_warps,
    }
    ctas = min(min(by.values()), limits["ctas"])
    return {"ctas_per_sm": ctas, "limited_by": min(by, key=by.get), **{f"ctas_by_{k}": v for k, v in by.items()}}


def describe(kernel) -> dict:
    """Registers, spills, shared bytes, warps, stages and occupancy of one compiled kernel."""
    meta = kernel.metadata
    info = {"num_warps": meta.num_warps, "num_stages": getattr(meta, "num_stages", None),
            "shared": int(meta.shared)}
    try:
        if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
            kernel._init_handles()
        info["n_regs"], info["n_spills"] = int(kernel.n_regs), int(kernel.n_spills)
        info.update(occupancy(info["n_regs"], info["num_warps"], info["shared"]))
    except Exception as exc:                                        # noqa: BLE001 - Triton internals move
        info["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return info


def new_since(jit_fn, before: set[int]) -> list[dict]:
    """``describe`` of every kernel of ``jit_fn`` compiled after ``snapshot`` returned ``before``."""
    return [describe(k) for cache in _kernel_caches(jit_fn) for k in cache.values() if id(k) not in before]
