"""KV tokens stock against patched, and throughput when the pool is full (issue 21, part 2, live).

- ``memory_compare``: ``max_total_num_tokens`` of a stock and a patched server at the same
  ``--mem-fraction-static`` (from their start-up lines) against the pool formula with the freed
  indexer weights (memory.py), and at equal bytes against the index keys alone.
- ``fp8_fraction``: the fp8 servers' memory fraction, chosen from a bf16 32-layer server's start-up
  lines so that the stock pool holds about n - 1 prompts of ~180K tokens and the patched pool n.
- ``saturation``: n concurrent requests of R prompt + 256 new tokens (ignore_eos); R from the stock
  fp8 server's real pool; the decode log says how many ran at once, queued or were retracted.
"""

from __future__ import annotations

import time

from sglang_indexcache.bench import serve_log, serve_run
from sglang_indexcache.bench.serve import PromptMaker, Sample, run_concurrent

from . import host, memory
from .measure import SATURATION, startup_of
from .runner import Blocked


def _kept(pattern: str) -> int:
    return pattern.count("F")


def _hidden(startup: dict) -> int:
    """The hidden size of the checkpoint a server ran (its start-up record names it)."""
    return host.hidden(startup["checkpoint"]) if startup.get("checkpoint") in host.CHECKPOINTS else 2048


def memory_compare(stock: str, patched: str, kv: str, pattern: str):
    """``stock`` / ``patched``: server keys; their start-up lines are in the state or a phase result."""
    def run(ctx) -> dict:
        s, p = startup_of(ctx.state, stock), startup_of(ctx.state, patched)
        if not s or not p:
            raise Blocked(f"needs the start-up lines of {stock} and {patched}")
        layers, kept = len(pattern), _kept(pattern)
        fractions = (s["mem_fraction_static"], p["mem_fraction_static"])
        ctx.check(f"{stock} and {patched} ran at the same --mem-fraction-static", fractions[0] == fractions[1],
                  fractions)
        verdict = memory.token_gain(layers, kept, kv, s["max_total_num_tokens"], p["max_total_num_tokens"],
                                    _hidden(s))
        gain, expected = verdict["gain"], verdict["expected_gain"]
        ctx.check(f"{kv} KV tokens: the gain is what the freed index keys and indexer weights predict",
                  verdict["ok"], verdict)
        # bytes per token from the logged KV size: the gain at equal bytes, whatever memory the starts found
        per_token = [x["kv_size_gb"] * memory.GIB / x["kv_tokens"] if x.get("kv_size_gb") and x.get("kv_tokens")
                     else None for x in (s, p)]
        return {"kv": kv, "stock": stock, "patched": patched, "layers": layers, "kept": kept,
                "mem_fraction_static": s["mem_fraction_static"],
                "stock_tokens": s["max_total_num_tokens"], "patched_tokens": p["max_total_num_tokens"],
                "stock_kv_gb": s["kv_size_gb"], "patched_kv_gb": p["kv_size_gb"],
                "stock_weights_gb": s["weights_gb"], "patched_weights_gb": p["weights_gb"],
                "gain": gain, "expected_gain": expected, "expected_gain_index_k": verdict["expected_gain_index_k"],
                "freed_weight_bytes": verdict["freed_weight_bytes"],
                "stock_bytes_per_token": per_token[0], "patched_bytes_per_token": per_token[1],
                "gain_equal_bytes": per_token[0] / per_token[1] - 1 if all(per_token) else None,
                "stock_avail_before_gb": s["avail_before_load_gb"], "patched_avail_before_gb": p["avail_before_load_gb"],
                "headline": f"{kv} KV: {s['max_total_num_tokens']:,} -> {p['max_total_num_tokens']:,} tokens"
                            f" ({gain:+.1%}; formula {expected:+.1%}, index keys alone {verdict['expected_gain_index_k']:+.1%})"}
    return run


def fp8_fraction(reference: str, stock_fp8: str, pattern: str):
    """A ServerSpec ``resolve``: ``--mem-fraction-static`` for the fp8 saturation servers."""
    def resolve(state) -> list[str]:
        earlier = startup_of(state, stock_fp8)
        if earlier and earlier.get("mem_fraction_static"):  # the patched one runs at the stock one's
            return ["--mem-fraction-static", f"{earlier['mem_fraction_static']:.4f}"]
        start = startup_of(state, reference)
        if not start or start.get("avail_before_load_gb") is None or start.get("avail_after_load_gb") is None:
            raise Blocked(f"needs the start-up memory lines of {reference} (same checkpoint, bf16)")
        layers, kept = len(pattern), _kept(pattern)
        pool = None  # the gain with the freed weights depends on the pool it is asked for: two rounds settle it
        for _ in range(3):
            gain = memory.expected_gain(layers, kept, "fp8", pool, _hidden(start))
            pool = memory.pool_for_saturation(SATURATION["target_length"], SATURATION["new_tokens"],
                                              SATURATION["n"], gain)
        fraction = memory.mem_fraction_for(pool, memory.cell_bytes(layers, kept, "fp8", False),
                                           start["avail_before_load_gb"], start["avail_after_load_gb"])
        return ["--mem-fraction-static", f"{fraction:.4f}"]
    return resolve


def saturation(role: str, stock_phase: str | None = None):
    """``role`` "stock" picks R from its own pool; "patched" reuses the stock phase's plan."""
    def run(ctx) -> dict:
        server = ctx.server
        pattern = server.spec.pattern
        pool = server.startup["max_total_num_tokens"]
        if role == "stock":
            gain = memory.expected_gain(len(pattern), _kept(pattern), "fp8", pool, _hidden(server.startup))
            plan = memory.saturation_plan(pool, gain, SATURATION["n"], SATURATION["new_tokens"])
        else:
            stock = ctx.result(stock_phase)
            plan = dict(stock["plan"], stock_max_running=stock["max_running"], stock_tok_s=stock["tok_s"])
        low, high = SATURATION["length_range"]
        ctx.check(f"saturation prompt length within {low:,}-{high:,}", low <= plan["length"] <= high, plan)
        result = _concurrent(ctx, server, plan)
        result.update(plan=plan, pool=pool, startup=server.startup, server=server.spec.key, role=role)
        ctx.check(f"{server.spec.key}: saturation, no request lost", result["lost"] == 0, result["errors"])
        if role == "patched":
            ctx.check("patched runs more requests at once than stock", (result["max_running"] or 0) >
                      (plan["stock_max_running"] or 0), (result["max_running"], plan["stock_max_running"]))
            ctx.check("patched throughput above stock's", result["tok_s"] > plan["stock_tok_s"],
                      (result["tok_s"], plan["stock_tok_s"]))
        result["headline"] = (f"pool {pool:,}, {plan['n']} x {plan['length']:,}: {result['max_running']} at once,"
                              f" {result['retractions']} retractions, {result['wall_s']:.0f} s,"
                              f" {result['tok_s']:.0f} tok/s")
        return result
    return run


def _concurrent(ctx, server, plan: dict) -> dict:
    n, length, new = plan["n"], plan["length"], plan["new_tokens"]
    prompts = PromptMaker(0, f"saturation-{server.spec.key}", 4000, n)
    jobs = []
    for index in range(n):
        ids = prompts.make("saturation", length, index)
        jobs.append((Sample(prompt_len=length, new_tokens=new, first_token=ids[0]), ids))
    window = server.window()
    t0 = time.perf_counter()
    samples = run_concurrent(server.client(timeout_s=ctx.timeout()), jobs)
    wall = time.perf_counter() - t0
    time.sleep(serve_run.LOG_SETTLE_S)
    text = window.read()
    crowd = serve_log.concurrency(text)
    decode = serve_log.summarize(text, n)
    decode.pop("tok_s", None)
    lost = [s for s in samples if not s.ok]
    return {"n": n, "length": length, "new_tokens": new, "wall_s": wall, "tok_s": n * new / wall,
            "max_running": crowd["max_running"], "max_queue": crowd["max_queue"],
            "retractions": crowd["retractions"], "retracted_requests": crowd["retracted_requests"],
            "decode": decode, "lost": len(lost), "errors": sorted({s.error for s in lost}),
            "requests": [{"ttft_s": s.ttft, "finished_s": (s.chunks[-1][0] - t0) if s.chunks else None,
                          "ok": s.ok, "error": s.error} for s in samples]}
