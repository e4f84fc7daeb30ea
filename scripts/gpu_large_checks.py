#!/usr/bin/env python3
"""Our indexer kernels past 2**31 elements on a GPU, against the exact top-k (issue 24).

    python3 scripts/gpu_large_checks.py --out FILE.json [--rows 16384,32768] [--keys 200000]

On the H200 a prefill chunk of 16,384 queries x 200,000 keys (3.3e9 scores) got a silently wrong
top-k (recall 0.63): an int32 offset wrapped. For each ``rows`` x ``keys`` this checks, as sets
(recall of the exact top-k per row, over rows whose k-th and (k+1)-th scores differ):

- ``topk``: ``topk.topk_rows`` and ``topk_sampled.topk_rows_sampled`` on one ``[rows, keys]`` fp32
  tile of random scores, with the lengths of the last chunk of a causal prefill (row r: ``keys -
  rows + 1 + r`` candidates), against ``torch.topk`` of every row (in blocks of rows below 2**31);
- ``prefill``: ``indexer_scores.prefill_scores`` writing that tile (32 index heads x 128, bf16
  queries and keys of one ``keys``-token request, the chunk's queries at positions ``keys - rows ..``)
  then the sampled top-k, against the fp32 reference scores (``reference.index_scores``) of 24 rows
  (the first, those around row 2**31 / keys where an int32 offset would wrap, the last); the tile's
  values at those rows are compared too.

Pass: every checked row's recall >= 0.999 (and tile values within 1e-3 of the largest reference
score). The JSON (rewritten after every case) holds the recalls and errors; exit 1 if a case fails.
``--smoke`` runs the same code on the CPU (Triton's interpreter) at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TOPK, HEADS, D = 2048, 32, 128
MIN_RECALL = 0.999


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def exact_topk(scores, lengths, topk: int, block_rows: int):
    """``(indices [R, topk] int64, tie_free [R] bool)``: ``torch.topk`` of each row's first
    ``lengths[r]`` scores, in blocks of rows (each block below 2**31 elements)."""
    import torch

    rows, n = scores.shape
    cols = torch.arange(n, device=scores.device)
    idx = torch.empty(rows, topk, dtype=torch.long, device=scores.device)
    tie_free = torch.empty(rows, dtype=torch.bool, device=scores.device)
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        blk = scores[r0:r1].masked_fill(cols[None, :] >= lengths[r0:r1, None], float("-inf"))
        vals, top = blk.topk(topk + 1, dim=1)
        idx[r0:r1] = top[:, :topk]
        tie_free[r0:r1] = vals[:, topk - 1] > vals[:, topk]
        del blk
    return idx, tie_free


def _recall_summary(got, exact, tie_free) -> dict:
    from sglang_indexcache.kernels.reference import set_overlap

    rec = set_overlap(exact, got.long())[tie_free]
    worst = int(tie_free.nonzero()[rec.argmin()]) if rec.numel() else -1
    return {"recall_min": round(float(rec.min()), 6) if rec.numel() else None,
            "recall_mean": round(float(rec.mean()), 6) if rec.numel() else None,
            "worst_row": worst, "rows_checked": int(rec.numel()), "rows_compared": int(exact.shape[0]),
            "ok": bool(rec.numel() > 0.99 * exact.shape[0] and float(rec.min()) >= MIN_RECALL)}


def check_topk(dev, rows: int, keys: int, topk: int = TOPK, block_rows: int = 4096) -> dict:
    """Both selectors on one ``[rows, keys]`` random tile with causal-chunk lengths."""
    import torch

    from sglang_indexcache.kernels.topk import topk_rows
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    scores = torch.empty(rows, keys, device=dev)
    for r0 in range(0, rows, block_rows):
        scores[r0:r0 + block_rows].normal_()
    lengths = (keys - rows + 1 + torch.arange(rows, device=dev)).int()
    exact, tie_free = exact_topk(scores, lengths.long(), topk, block_rows)
    out = {"elements": rows * keys}
    for name, select in (("radix", topk_rows), ("sampled", topk_rows_sampled)):
        got = select(scores, topk, lengths=lengths)
        out[name] = _recall_summary(got, exact, tie_free)
        del got
    out["ok"] = out["radix"]["ok"] and out["sampled"]["ok"]
    return out


def check_prefill(dev, rows: int, keys: int, topk: int = TOPK, heads: int = HEADS, block_rows: int = 4096) -> dict:
    """``prefill_scores`` into one ``[rows, keys]`` tile, then the sampled top-k; 24 rows against fp32."""
    import torch

    from sglang_indexcache.kernels.indexer_scores import prefill_scores
    from sglang_indexcache.kernels.reference import index_scores
    from sglang_indexcache.kernels.topk_sampled import topk_rows_sampled

    p0 = keys - rows
    q = torch.randn(keys, heads, D, device=dev).bfloat16()
    k = torch.randn(keys, D, device=dev).bfloat16()
    w = torch.randn(keys, heads, device=dev) * heads ** -0.5
    cu = torch.tensor([0, keys], dtype=torch.int32, device=dev)
    tile = torch.empty(1, rows, keys, device=dev)
    prefill_scores(q, w, k, cu, 1.0, tile, p0, rows)
    lengths = (p0 + 1 + torch.arange(rows, device=dev)).int()
    got = topk_rows_sampled(tile[0], topk, lengths=lengths)
    wrap = (1 << 31) // keys                                        # first row whose int32 offset wraps
    picks = sorted({*range(8), *range(max(0, wrap - 4), min(rows, wrap + 4)), *range(rows - 8, rows)})
    sel = torch.tensor(picks, device=dev)
    k32 = k.float()
    ref = torch.stack([index_scores(q[p0 + r:p0 + r + 1].float(), w[p0 + r:p0 + r + 1], k32, 1.0)[0]
                       for r in picks])                             # [24, keys] fp32
    cols = torch.arange(keys, device=dev)
    ref = ref.masked_fill(cols[None, :] >= lengths[sel].long()[:, None], float("-inf"))
    exact, tie_free = exact_topk(ref, lengths[sel].long(), topk, block_rows)
    valid = torch.isfinite(ref)
    err = (tile[0, sel][valid] - ref[valid]).abs().max() / ref[valid].abs().max()
    out = {"elements": rows * keys, "heads": heads, "checked_rows": picks, "wrap_row": wrap,
           "tile_max_rel_error": round(float(err), 8), **_recall_summary(got[sel], exact, tie_free)}
    out["ok"] = out["ok"] and float(err) <= 1e-3
    return out


def run(args) -> dict:
    import torch

    dev = torch.device("cpu" if args.smoke else "cuda")
    doc = {"command": "scripts/gpu_large_checks.py " + " ".join(args.argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
           "topk": args.topk, "min_recall": MIN_RECALL, "cases": []}
    for rows in args.rows:
        for kind, fn in (("topk", check_topk), ("prefill", check_prefill)):
            torch.manual_seed(rows)
            t0 = time.monotonic()
            try:
                case = fn(dev, rows, args.keys, args.topk, block_rows=args.block_rows)
            except Exception as exc:                                # noqa: BLE001 - record it, go on
                case = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            case = {"kind": kind, "rows": rows, "keys": args.keys, **case, "seconds": round(time.monotonic() - t0, 2)}
            doc["cases"].append(case)
            _save(args.out, doc)
            print(f"{'PASS' if case['ok'] else 'FAIL'} {kind} {rows} x {args.keys}: "
                  + json.dumps({k: v for k, v in case.items() if k not in ("kind", "rows", "keys", "checked_rows")}),
                  flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    doc["ok"] = all(c["ok"] for c in doc["cases"])
    _save(args.out, doc)
    return doc


def _save(path: str, doc: dict):
    from sglang_indexcache.atomic import atomic_write_json

    atomic_write_json(path, doc)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file, rewritten after every case")
    p.add_argument("--rows", type=_ints, default=[16384, 32768], help="tile rows (default 16384,32768)")
    p.add_argument("--keys", type=int, default=200000, help="tile columns (default 200000)")
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--block-rows", type=int, default=4096, help="rows per block of the exact torch.topk")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, toy sizes (plumbing only)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.keys, args.topk, args.block_rows = [40], 600, 16, 16
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"                        # before triton is first imported
    return 0 if run(args)["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
