#!/usr/bin/env python3
"""Our Triton DSA kernels against the ones SGLang 0.5.17 ships, side by side on one GPU (issue 18).

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_kernel_compare.py --out OUT_DIR

``/tmp/site`` holds SGLang 0.5.17's stack (sgl-deep-gemm 0.1.5.post1, sglang-kernel 0.4.5, ...).
Cases (a time limit skips the rest, recorded as skipped), the most wanted first (``FIRST``: indexer
prefill at 200K, decode at 200K with 64 heads, MLA decode at 128K with 128 heads, prefill at 128K and
64K), then the rest of:

1. indexer prefill, the last chunk of ``--chunk`` queries against 200K, 128K, 64K, 32K keys (64 and
   32 index heads);
2. indexer decode, batch 1/16/64 at 200K and 32K cached keys (CUDA-graph replay both sides);
3. sparse MLA decode, batch 16/64 at 32K/128K (128 and 64 heads), and prefill (4096 queries of a
   128K request);
4. whole prefills of 200K (32 heads) and 128K (64 heads).

SGLang's side is the functions its DSA backend calls, with its layouts (``scripts/kernel_research/
sglang_ops.py``; the cases are ``kernel_research/sglang_compare.py``): DeepGEMM ``fp8_mqa_logits`` / ``fp8_paged_mqa_logits`` + sgl-kernel's top-k, and
sgl-kernel's FlashMLA ``flash_mla_sparse_fwd``. Ours: the same fp8 inputs, and bf16. Every case
records medians with p10/p90 of CUDA-event timings (L2 flushed), the FLOP/byte floors on ceilings
measured in the same run, top-k set overlaps (ours vs SGLang, both vs the exact fp32 top-k of a few
rows) and MLA output differences. ``OUT_DIR/kernel_compare.json`` is rewritten after every case.

``--smoke``: CPU only, Triton's interpreter, tiny shapes; SGLang's kernels are replaced by PyTorch
references (labelled so in the JSON) to check the comparison plumbing; exits 1 if any check fails.
A real run never substitutes: if SGLang's stack does not load it exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("indexer_prefill", "indexer_decode", "mla_decode", "mla_prefill", "whole_prefill")
K128, K200 = 131072, 200000
FIRST = (                                    # most wanted first: a time limit cuts the tail
    [("indexer_prefill", (K200, h)) for h in (64, 32)]                 # was wrong (issue 24); target range
    + [("indexer_decode", (b, K200, 64)) for b in (1, 16, 64)]         # the decode selection's launches
    + [("mla_decode", (b, K128, 128, False)) for b in (16, 64)]        # target: batch >= 16
    + [("indexer_prefill", (n, h)) for n in (K128, 65536) for h in (64, 32)]
)
PLAN = FIRST + [c for c in (
    [("indexer_decode", (b, n, h)) for n in (K200, 32768) for h in (64, 32) for b in (1, 16, 64)]
    + [("mla_decode", (b, n, h, False)) for n in (32768, K128) for h in (128, 64) for b in (16, 64)]
    + [("mla_prefill", (4096, K128, h, True)) for h in (128, 64)]
    + [("indexer_prefill", (32768, h)) for h in (64, 32)]
    + [("whole_prefill", (K200, 32)), ("whole_prefill", (K128, 64))]
) if c not in FIRST]
SMOKE_PLAN = [("indexer_prefill", (160, 32)), ("indexer_decode", (2, 200, 32)), ("mla_decode", (2, 256, 16, False)),
              ("mla_prefill", (3, 256, 16, True)), ("whole_prefill", (80, 16))]


class _Parser(argparse.ArgumentParser):
    def error(self, message):                                       # one line on stderr, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv):
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder; kernel_compare.json is rewritten after every case")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the plumbing: Triton interpreter, tiny shapes, PyTorch stand-ins for SGLang")
    p.add_argument("--only", default="", help="comma-separated case kinds: " + ", ".join(KINDS))
    p.add_argument("--time-limit", type=float, default=230.0,
                   help="seconds after which remaining cases are skipped (default 230)")
    p.add_argument("--chunk", type=int, default=16384,
                   help="prefill chunk (query tokens), SGLang's --chunked-prefill-size (default 16384)")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of timed calls per implementation")
    args = p.parse_args(argv)
    kinds = {k.strip() for k in args.only.split(",") if k.strip()}
    if kinds - set(KINDS):
        p.error(f"unknown --only kind(s) {', '.join(sorted(kinds - set(KINDS)))}; choose from {', '.join(KINDS)}")
    args.kinds = kinds or set(KINDS)
    if args.chunk <= 0 or args.time_limit <= 0 or args.budget <= 0:
        p.error("--chunk, --time-limit and --budget must be positive")
    return args


def _import_package():
    """``sglang_indexcache.kernels`` from an installed package, else mapped from ``kernels/`` as
    pyproject.toml maps it (an uninstalled checkout on the GPU host)."""
    import importlib
    import importlib.util

    sys.path.insert(0, str(ROOT))
    try:
        importlib.import_module("sglang_indexcache.kernels")
    except ModuleNotFoundError:
        import sglang_indexcache

        spec = importlib.util.spec_from_file_location("sglang_indexcache.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        sglang_indexcache.kernels = mod


def imports():
    """Every module a run uses, smoke or GPU, imported here and nowhere else in this script: the CPU
    smoke test (tests/test_kernel_compare.py) runs this same block, so an import that breaks shows
    in CI and not on the GPU. (SGLang's own kernels are the exception by design: they load only on
    a GPU host, in ``sglang_ops.load_sglang_ops``; the smoke test substitutes PyTorch references.)"""
    import torch
    import triton

    import sglang_indexcache.kernels as kernels
    from kernel_research import compare_common, sglang_compare, sglang_ops
    from sglang_indexcache import atomic
    from sglang_indexcache.bench import timing

    return types.SimpleNamespace(torch=torch, triton=triton, kernels=kernels, common=compare_common,
                                 cases=sglang_compare, ops=sglang_ops, timing=timing, atomic=atomic)


def ceilings(mods, device) -> dict:
    """bf16 and fp8 matmul TFLOP/s and copy GB/s measured now (``timing.measure_ceilings``)."""
    c = mods.timing.measure_ceilings(device, mods.torch.bfloat16, fp8=True)
    out = {"bf16_tflops": round(c["matmul_flops"] / 1e12, 3), "copy_gbps": round(c["copy_bytes"] / 1e9, 2)}
    if "fp8_matmul_flops" in c:
        out["fp8_tflops"] = round(c["fp8_matmul_flops"] / 1e12, 3)
    else:                                                           # fp8 matmul did not run: say so
        out["fp8_tflops"], out["fp8_note"] = 2 * out["bf16_tflops"], f"not measured ({c['fp8_error']}): 2 x bf16"
    return out


def _environment(args, mods):
    torch = mods.torch
    if args.smoke:
        dev = torch.device("cpu")
        bench = mods.timing.Bench(dev, 0.01, min_reps=1, max_reps=1, warmup=False)
        ceil = {**ceilings(mods, dev), "placeholder": "smoke: CPU rates, not a GPU's"}
        return mods.cases.Env(dev, mods.ops.reference_ops(), bench, ceil, topk=32, chunk=32, exact_rows=4)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU (use --smoke on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    try:
        ops = mods.ops.load_sglang_ops()
    except Exception as exc:                                        # noqa: BLE001 - report why, exit 2
        print(f"error: SGLang 0.5.17's kernels do not load ({type(exc).__name__}: {exc}); "
              "is the bundle's site folder on PYTHONPATH?", file=sys.stderr)
        raise SystemExit(2)
    dev = torch.device("cuda")
    bench = mods.timing.Bench(dev, args.budget, min_reps=5, max_reps=30)
    return mods.cases.Env(dev, ops, bench, ceilings(mods, dev), chunk=args.chunk)


def _versions(mods, env) -> dict:
    torch = mods.torch
    out = {"torch": torch.__version__, "triton": mods.triton.__version__}
    for name in ("deep_gemm", "sgl_kernel"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    if env.device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(env.device)
        out["sms"] = torch.cuda.get_device_properties(env.device).multi_processor_count
    return out


def _run_case(mods, env, kind, params):
    sc = mods.cases
    fn = {"indexer_prefill": sc.indexer_prefill, "indexer_decode": sc.indexer_decode,
          "mla_decode": sc.sparse_mla, "mla_prefill": sc.sparse_mla, "whole_prefill": sc.whole_prefill}[kind]
    return fn(env, *params)


def run(args) -> dict:
    mods = imports()
    torch = mods.torch
    env = _environment(args, mods)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel_compare.json"
    doc = {"command": "scripts/gpu_kernel_compare.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": _versions(mods, env),
           "sglang_side": env.ops.name, "sglang_side_real": env.ops.real, "ceilings": env.ceil,
           "settings": {"topk": env.topk, "prefill_chunk": env.chunk, "budget_s": args.budget},
           "cases": [], "skipped": []}
    start = time.monotonic()
    for kind, params in (SMOKE_PLAN if args.smoke else PLAN):
        if kind not in args.kinds:
            continue
        if not args.smoke and time.monotonic() - start > args.time_limit:
            doc["skipped"].append({"kind": kind, "params": list(params), "reason": "time limit"})
            continue
        t0 = time.monotonic()
        torch.manual_seed(0)
        try:
            case = _run_case(mods, env, kind, params).as_dict()
            case["status"] = "ok"
        except Exception as exc:                                    # noqa: BLE001 - keep the other cases
            logging.exception("%s %s failed", kind, params)
            case = {"kind": kind, "params": list(params), "status": "failed",
                    "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        case["seconds"] = round(time.monotonic() - t0, 2)
        doc["cases"].append(case)
        mods.atomic.atomic_write_json(path, doc)
        print(f"[{time.monotonic() - start:6.1f}s] {case.get('id', kind)}: {case['status']}", flush=True)
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    doc["wall_seconds"] = round(time.monotonic() - start, 1)
    mods.atomic.atomic_write_json(path, doc)
    return doc


def table(doc: dict) -> str:
    """One line per (case, implementation): median ms (p10-p90), share of its floor, time vs SGLang."""
    lines = [f"{doc['versions'].get('device', 'cpu')}  {doc['date']}  SGLang side: {doc['sglang_side']}"]
    for case in doc["cases"]:
        if case["status"] != "ok":
            lines.append(f"{case.get('id', case['kind'])}: FAILED {case.get('error')}")
            continue
        ratios = case["checks"].get("time_ratio_ours_over_sglang", {})
        for name, r in case["impls"].items():
            cell = (f"{r['ms']:.4f} ms ({r['p10']:.4f}-{r['p90']:.4f})" if "ms" in r else f"error {r['error'][:60]}")
            extra = f" {100 * r['of_floor']:.0f}% of {r['floor']} floor" if "of_floor" in r else ""
            extra += f" {ratios[name]:.2f}x sglang" if name in ratios else ""
            lines.append(f"{case['id']:<44} {name:<48} {cell}{extra}")
        for name, c in case["checks"].items():
            if name != "time_ratio_ours_over_sglang":
                lines.append(f"{'':<44}   check {name}: {json.dumps(c)}")
    if doc["skipped"]:
        lines.append(f"skipped (time limit): {len(doc['skipped'])} cases")
    return "\n".join(lines)


def smoke_failures(doc: dict) -> list[str]:
    """What a smoke run must show: every case and impl ran, every check ran and agrees."""
    bad = []
    for case in doc["cases"]:
        name = case.get("id", case["kind"])
        if case["status"] != "ok":
            bad.append(f"{name}: {case.get('error')}")
            continue
        bad += [f"{name} / {i}: {r['error']}" for i, r in case["impls"].items() if "error" in r]
        for check, c in case["checks"].items():
            if "error" in c:
                bad.append(f"{name} / {check}: {c['error']}")
            elif check.startswith("overlap ours fp8") or check.startswith("overlap ours top-k"):
                bad += [f"{name} / {check}: mean {c['mean']}"] if c["mean"] < 0.99 else []
            elif "exact" in check and not check.startswith("fp8 cost") and c["within_tol"] < 0.99:
                bad.append(f"{name} / {check}: {c}")
            elif "within_bf16_tol_1e-2" in c and not c["within_bf16_tol_1e-2"]:
                bad.append(f"{name} / {check}: {c}")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"                        # before triton is first imported
    logging.basicConfig(level=logging.INFO if not args.smoke else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _import_package()
    doc = run(args)
    print(table(doc))
    if args.smoke:
        bad = smoke_failures(doc)
        print("smoke ok" if not bad else "smoke FAILED:\n" + "\n".join(bad))
        return 1 if bad else 0
    return 1 if any(c["status"] != "ok" for c in doc["cases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
