"""The measurements of issue 21 as phases: bench-serve parts, chunked prefill, KV memory, saturation.

Every phase returns what it measured (the runner keeps it in the state and the summary); keys that
start with ``_`` (log-probability arrays) go to ``arrays.json`` beside the summary.
"""

from __future__ import annotations

import json
import time

from sglang_indexcache import pattern as pat
from sglang_indexcache.atomic import atomic_write_json
from sglang_indexcache.bench import serve_run

from . import chunked, host, memory
from .runner import Blocked
from .servers import ServerSpec

DECODE_TOKENS = 512  # 512 steps: 64 log lines at --decode-log-interval 8
# the bench servers: chunked prefill 16384, radix cache off, CUDA graphs for decode, SGLang's decode log
BENCH_ARGS = ["--context-length", "202752", "--chunked-prefill-size", "16384", "--disable-radix-cache",
              "--decode-log-interval", "8", "--cuda-graph-backend-prefill", "disabled", "--skip-tokenizer-init"]
# part -> (prompt lengths, requests per length, decode setups); the order fixes each part's prompts
PARTS = {
    "prefill": ([32768, 65536, 131072, 200_000], [2, 2, 1, 1], []),
    "decode-8x200k": ([], [], [(8, 200_000)]),
    "decode-32x32k": ([], [], [(32, 32768)]),
    "prefill-deep": ([32768, 200_000], [1, 1], []),
}
# device seconds of each part's own work on the 32-layer stack (H200, 2026-12-04: TTFT 200K 8.99 s at
# every-4, 15.71 s all-F; 31 x 32K and 8 x 200K prefills dominate the decode parts)
ESTIMATES = {("prefill", "every-4"): 25, ("prefill", "all-F"): 38, ("prefill", "every-8"): 22,
             ("decode-8x200k", "every-4"): 80, ("decode-8x200k", "all-F"): 135, ("decode-8x200k", "every-8"): 72,
             ("decode-32x32k", "every-4"): 42, ("decode-32x32k", "all-F"): 50, ("decode-32x32k", "every-8"): 40,
             ("prefill-deep", "every-4"): 40, ("chunk40k", "every-4"): 8, ("chunk40k", "all-F"): 10,
             ("prefill", "8 layers"): 12, ("decode-8x200k", "8 layers"): 40}
SATURATION = {"n": 4, "new_tokens": 256, "target_length": 180_000, "length_range": (128 * 1024, 200_000)}


def pattern_class(pattern: str) -> str:
    share = pattern.count("F") / len(pattern)
    return "all-F" if share == 1 else ("every-8" if share <= 0.15 else "every-4")


def first_offset(part: str) -> int:
    """Where a part's prompts start in the server's first-token permutation (disjoint per part)."""
    total = 0
    for name, (lengths, repeats, decodes) in PARTS.items():
        if name == part:
            return total
        total += 1 + sum(repeats) + sum(b for b, _ in decodes)
    raise KeyError(part)


def pattern_flags(tree: str, pattern: str) -> list[str]:
    """The flags that make a server run ``pattern``: stock through the override, patched through our flag."""
    if pattern == "F" * len(pattern):
        return []
    if tree == "stock":
        return ["--json-model-override-args", json.dumps({"index_topk_pattern": pattern})]
    every = next((n for n in (2, 4, 8, 16) if pat.uniform(len(pattern), n) == pattern), None)
    return ["--index-cache-every", str(every)] if every else ["--index-cache-pattern", pattern]


def bench_server(key: str, tree: str, pattern: str, checkpoint: str = "l32", kv: str = "bf16", batch: int = 32,
                 mem: float | None = 0.8, extra=(), resolve=None, start_kind: str = "graphs") -> ServerSpec:
    args = [*(host.BF16_KV if kv == "bf16" else host.FP8_KV), *BENCH_ARGS, "--cuda-graph-max-bs-decode", str(batch),
            "--max-running-requests", str(batch), *pattern_flags(tree, pattern),
            *(["--mem-fraction-static", str(mem)] if mem else []), *extra]
    return ServerSpec(key=key, tree=tree, checkpoint=checkpoint, args=tuple(args), resolve=resolve,
                      start_kind=start_kind, pattern=pattern)


def calibrated_file(candidates):
    """A ServerSpec ``resolve``: ``--index-cache-pattern-file`` of the first existing candidate file."""
    def resolve(state) -> list[str]:
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise Blocked("no calibrated pattern file for this checkpoint: " + ", ".join(map(str, candidates)))
        return ["--index-cache-pattern-file", str(found)]
    return resolve


def startup_of(state, key: str) -> dict | None:
    """A server's start-up memory lines: from this machine's record, else from a (seeded) phase result."""
    record = state.data["servers"].get(key, {}).get("startup")
    if record:
        return record
    for entry in state.data["phases"].values():
        result = entry.get("result") or {}
        if entry.get("status") == "done" and result.get("server") == key and result.get("startup"):
            return result["startup"]
    return None


# ------------------------------------------------------------------ bench serve parts

def serve_part(part: str):
    lengths, repeats, decodes = PARTS[part]

    def run(ctx) -> dict:
        server = ctx.server
        key = server.spec.key
        spec = serve_run.ServeSpec(tag=key, lengths=lengths, prefill_repeats=repeats or 1, decodes=decodes,
                                   decode_tokens=DECODE_TOKENS, server_log=str(server.log_path),
                                   pattern=server.spec.pattern, first_offset=first_offset(part))
        folder = ctx.root / "serve"
        path = folder / f"{key}__{part}.json"
        client = server.client(timeout_s=ctx.timeout())
        doc = serve_run.run(spec, client, on_update=lambda d: atomic_write_json(path, d))
        _merge_server_docs(ctx, folder, key)
        lost = doc["lost"]
        ctx.check(f"{key} {part}: no request lost", lost["lost"] == 0, "; ".join(lost["errors"]))
        for run_ in doc["decode"]:
            log = run_["server_log"] or {}
            ctx.check(f"{key} {part}: SGLang's decode lines give a steady state", log.get("running_reached"),
                      {k: log.get(k) for k in ("decode_lines", "steady_lines", "running_asked")})
        return {"server": key, "part": part, "serve": serve_run.compact(doc), "startup": server.startup,
                "headline": headline(doc)}
    return run


def _merge_server_docs(ctx, folder, key: str) -> None:
    parts = sorted(folder.glob(f"{key}__*.json"))
    try:
        merged = serve_run.merge([json.loads(p.read_text()) for p in parts])
    except (ValueError, AssertionError) as exc:
        ctx.log(f"{key}: parts not merged: {exc}")
        return
    atomic_write_json(folder / f"serve_{key}.json", merged)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def headline(doc: dict) -> str:
    bits = [f"TTFT {_tokens(row['length'])} {row['ttft_s']['min']:.2f} s" for row in doc["prefill"]
            if row["ttft_s"]["min"] is not None]
    for run_ in doc["decode"]:
        log = run_["server_log"] or {}
        if log.get("tok_s_median"):
            bits.append(f"{run_['batch']} x {_tokens(run_['length'])}: {log['tok_s_median']:.0f} tok/s,"
                        f" {log['step_ms_median']:.2f} ms/step at {log['running_reached']} running")
    return "; ".join(bits)


def bench_phases(spec: ServerSpec, parts) -> list:
    from .runner import Phase

    cls = pattern_class(spec.pattern) if spec.pattern else "every-8"  # a pattern file's: known once it runs
    layers = len(spec.pattern) if spec.pattern else host.layers(spec.checkpoint)
    phases = []
    for part in parts:
        run = chunk_part if part == "chunk40k" else serve_part(part)
        estimate = ESTIMATES.get((part, "8 layers")) if layers <= 8 else None
        phases.append(Phase(name=f"{spec.key}:{part}", run=run, estimate_s=estimate or ESTIMATES[(part, cls)],
                            server=spec, kind=f"{part}:{cls}:{layers}"))
    return phases


# ------------------------------------------------------------------ chunked prefill

def chunk_part(ctx) -> dict:
    """The fixed prompt's log-probabilities on a bench server (chunk 16384)."""
    server = ctx.server
    t = time.monotonic()
    logprobs = chunked.prompt_logprobs(server.client(timeout_s=ctx.timeout()), chunked.prompt())
    return {"server": server.spec.key, "tree": server.spec.tree, "calibration": False,
            "chunk": server.startup.get("chunked_prefill_size"), "request_s": round(time.monotonic() - t, 2),
            "startup": server.startup, "_logprobs": {server.spec.pattern: logprobs},
            "headline": f"{len(logprobs)} log-probabilities, chunk {server.startup.get('chunked_prefill_size')}"}


def calibration_server(key: str, chunk: int, checkpoint: str = "l32") -> ServerSpec:
    """A calibration-mode server (every buffer kept, pattern switchable) for the chunked-prefill check.

    Calibration mode keeps a pinned host buffer of (KV tokens x layers x top-k) int32 for the top-k
    capture (256 KiB per token at 32 layers): the pool is capped at 45,056 tokens (11.8 GB)."""
    args = [*host.BF16_KV, "--index-cache-calibration", "--admin-api-key", host.ADMIN_KEY, "--context-length", "45056",
            "--max-total-tokens", "45056", "--mem-fraction-static", "0.7", "--chunked-prefill-size", str(chunk),
            "--max-prefill-tokens", str(max(chunk, 16384))]
    return ServerSpec(key=key, tree="patched", checkpoint=checkpoint, args=tuple(args), start_kind="nograph",
                      pattern="F" * host.layers(checkpoint))


def calibration_logprobs(patterns: list[str]):
    def run(ctx) -> dict:
        server = ctx.server
        admin = server.client(api_key=host.ADMIN_KEY)
        out = {}
        for pattern in patterns:
            if admin.get_json("/index_cache", timeout=30).get("pattern") != pattern:
                reply = admin.post_json("/index_cache/pattern", {"pattern": pattern}, timeout=300)
                ctx.check(f"{server.spec.key}: switched to {pat.describe(pattern)}", reply.get("pattern") == pattern,
                          reply)
            out[pattern] = chunked.prompt_logprobs(server.client(timeout_s=ctx.timeout()), chunked.prompt())
        chunk = server.startup.get("chunked_prefill_size")
        return {"server": server.spec.key, "tree": "patched", "calibration": True, "chunk": chunk,
                "startup": server.startup, "_logprobs": out,
                "headline": f"{len(out)} patterns, chunk {chunk}"}
    return run


def chunk_compare(reference_phase: str, layers: int = 32):
    """Every chunked measurement against the unchunked reference of its pattern, with the control."""
    def run(ctx) -> dict:
        rows, control = compare_logprobs(ctx.state.data["phases"], reference_phase, layers)
        ctx.check("control: every-4 against all-F (both unchunked) moves the log-probabilities",
                  control is not None and control["mean_abs"] >= chunked.CONTROL_FLOOR, control)
        for row in rows:
            ctx.check(f"chunked prefill ({row['phase']}, {row['label']}) equals the unchunked reference",
                      row["verdict"] == "pass", row["why"])
        passed = sum(r["verdict"] == "pass" for r in rows)
        return {"control": control, "rows": rows, "headline": f"{passed}/{len(rows)} chunked equal the reference"}
    return run


def compare_logprobs(phases: dict, reference_phase: str, layers: int = 32) -> tuple[list[dict], dict | None]:
    """``phases``: the state's (or a summary's) phase entries, results with their ``_logprobs``."""
    reference = (((phases.get(reference_phase) or {}).get("result") or {}).get("_logprobs")) or {}
    if not reference:
        raise Blocked(f"no reference log-probabilities from {reference_phase}")
    all_f, every4 = "F" * layers, pat.uniform(layers, 4)
    control = chunked.difference(reference[every4], reference[all_f]) if {all_f, every4} <= set(reference) else None
    rows = []
    for name, entry in phases.items():
        result = entry.get("result") or {}
        if name == reference_phase or entry.get("status") != "done" or not result.get("_logprobs"):
            continue
        for pattern, logprobs in result["_logprobs"].items():
            if pattern not in reference:
                continue
            diff = chunked.difference(reference[pattern], logprobs, chunk=result.get("chunk") or 16384)
            verdict, why = chunked.verdict(diff, control)
            rows.append({"phase": name, "server": result.get("server"), "tree": result.get("tree"),
                         "calibration": result.get("calibration"), "chunk": result.get("chunk"),
                         "label": "all-F" if pattern == all_f else pattern_class(pattern), "pattern": pattern,
                         "diff": diff, "verdict": verdict, "why": why})
    return rows, control
