#!/usr/bin/env python3
"""The two kernel interfaces added for serving, checked on the GPU against their references.

- ``topk_reuse.merge_reused_topk`` (decode stride, issue 22): serving sizes (top-k 2048, batch 64,
  200K-token rows mapped through a shuffled page table), eager and replayed from a CUDA graph, equal
  to ``merge_reused_topk_ref`` element for element; its graph-replay time beside the indexer's
  measured cost per layer and step (~95 us at 8 x 200K on the 32-layer stack).
- ``sparse_mla_decode.plan_sparse_mla`` / ``run_sparse_mla`` (issue 24): one plan, an F layer and two
  S layers with their own queries and caches, each equal to ``sparse_mla_decode_ref`` within bf16.

    python3 scripts/gpu_new_kernels.py --out DIR            # on the GPU host
    TRITON_INTERPRET=1 python3 scripts/gpu_new_kernels.py --smoke --out DIR   # plumbing, CPU

Writes DIR/new_kernels.json; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIZES = {  # (batch, top-k, context, request slots) / (batch, heads, top-k, context)
    "gpu": {"merge": (64, 2048, 200_000, 256), "mla": (16, 64, 2048, 32_768)},
    "smoke": {"merge": (3, 16, 300, 8), "mla": (2, 16, 32, 200)},
}


def import_kernels():
    """``sglang_indexcache.kernels`` from this checkout: installed, or laid out as the live runner does."""
    try:
        from sglang_indexcache import kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "scripts"))
        from live import host

        host.lay_out_package()
        sys.path.insert(0, str(host.OURS))
    import importlib

    import torch

    from sglang_indexcache.kernels import reference, testing, topk_reuse
    mla = importlib.import_module("sglang_indexcache.kernels.sparse_mla_decode")  # the package exports the function
    return torch, reference, mla, testing, topk_reuse


def check_merge(torch, topk_reuse, testing, device, size) -> dict:
    batch, k, context, slots = size
    gen = torch.Generator().manual_seed(22)
    seq_lens = torch.randint(k // 2, context, (batch,), generator=gen)
    rows = torch.randperm(slots, generator=gen)[:batch]
    refresh = torch.zeros(slots, dtype=torch.int32)
    refresh[rows] = (seq_lens - 1 - torch.randint(0, 9, (batch,), generator=gen)).clamp(min=0).to(torch.int32)
    stored = torch.randint(0, context, (slots, k), generator=gen, dtype=torch.int32)
    stored[rows[0], k // 3:] = -1                                          # a store that never filled
    _, table = testing.make_paged_cache(seq_lens.tolist(), 1)
    args = [t.to(device) for t in (stored, refresh, rows, seq_lens.to(torch.int32), table)]
    want = topk_reuse.merge_reused_topk_ref(*args)
    eager = topk_reuse.merge_reused_topk(*args)
    result = {"batch": batch, "k": k, "context": context, "eager_equal": bool(torch.equal(eager, want))}
    if device == "cuda":
        out = torch.full_like(want, -7)
        topk_reuse.merge_reused_topk(*args, out=out)                          # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            topk_reuse.merge_reused_topk(*args, out=out)
        out.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        result["graph_equal"] = bool(torch.equal(out, want))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["graph_replay_us"] = round(start.elapsed_time(end) / 200 * 1000, 2)
    return result


def check_mla(torch, reference, mla, testing, device, size) -> dict:
    batch, heads, topk, context = size
    gen = torch.Generator().manual_seed(24)
    d_qk, d_v, scale = 576, 512, 576 ** -0.5
    seq_lens = torch.randint(topk, context, (batch,), generator=gen).tolist()
    base, table = testing.make_paged_cache(seq_lens, d_qk, dtype=torch.bfloat16)  # NaN where no request owns a slot
    indices = torch.stack([torch.randperm(n, generator=gen)[:topk] for n in seq_lens]).to(torch.int32)
    indices[0, topk // 2:] = -1                                            # a request with fewer keys
    table, indices = table.to(device), indices.to(device)
    layers, worst = [], 0.0
    plan = None
    for layer in range(3):                                                 # F layer, then two S layers
        fresh = torch.randn(base.shape, generator=gen).to(torch.bfloat16)     # this layer's own latents
        cache = torch.where(torch.isnan(base), base, fresh).to(device)
        q = torch.randn(batch, heads, d_qk, generator=gen).to(torch.bfloat16).to(device)
        if plan is None:
            plan = mla.plan_sparse_mla(q, cache, table, indices, d_v)
        out = mla.run_sparse_mla(plan, q, cache, scale)
        want = reference.sparse_mla_decode_ref(q.float(), cache.float(), table, indices, scale, d_v)
        err = float(((out.float() - want).norm() / want.norm()).item())
        worst = max(worst, err)
        layers.append({"layer": layer, "relative_error": err, "finite": bool(torch.isfinite(out).all())})
    return {"batch": batch, "heads": heads, "topk": topk, "context": context, "layers": layers,
            "ok": worst < 1e-2 and all(x["finite"] for x in layers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for new_kernels.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    torch, reference, mla, testing, topk_reuse = import_kernels()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_new_kernels: error: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    sizes = SIZES["smoke" if args.smoke else "gpu"]
    t = time.time()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device,
              "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "merge": check_merge(torch, topk_reuse, testing, device, sizes["merge"]),
              "mla": check_mla(torch, reference, mla, testing, device, sizes["mla"])}
    result["seconds"] = round(time.time() - t, 1)
    merge = result["merge"]
    result["ok"] = merge["eager_equal"] and merge.get("graph_equal", True) and result["mla"]["ok"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "new_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
