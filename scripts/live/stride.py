"""Issue 22 on the live server: decode at several strides by run-time switch, the stored top-k on the GPU.

- :func:`sweep`: one server started with ``--index-cache-decode-stride 4`` (both step kinds
  captured) takes ``batch`` requests of ``length`` tokens; once they all decode, it switches the
  stride (``POST /index_cache/stride``) through :data:`STRIDES` while they keep decoding and takes
  each stride's steady state from SGLang's own decode lines between the switches (the prompts are
  prefilled once for every stride). Checks: every switch answered with its stride, none lost.
- :func:`topk_structure`: on a small server with ``--enable-return-indexer-topk``, the top-k each
  layer used at each decode step, as SGLang's capture returns it: at a reuse step ``d`` positions
  after a refresh, an F layer's first ``k - d`` entries are the refresh's first ``k - d`` (best first:
  the lowest-scored dropped), the last ``d`` are new and shift along from step to step; refreshes
  come every ``stride`` steps; S layers use their F layer's set. Then switched to stride 2, again.
- :func:`switches_under_load`: calibration mode (no CUDA graphs) switching patterns and strides every
  half second under 16 clients: every request completes.
- :func:`compare`: the sweeps against the no-stride every-4 and stock all-F servers of the same run.
"""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from array import array

from sglang_indexcache import pattern as pat
from sglang_indexcache.bench import serve_log
from sglang_indexcache.bench.serve import PromptMaker, Sample, run_concurrent

from . import checks, host, measure

STRIDES = (4, 1, 2, 8, 4)  # the last repeats the first: how far the measurement drifts meanwhile
# phase part -> (requests, prompt tokens, first-token offset); SGLang 0.5.17 runs 31 at --max-running-requests 32
SWEEPS = {"decode-8x200k-strides": (8, 200_000, 0), "decode-31x32k-strides": (31, 32768, 8)}
SWITCH_SECONDS = 25.0
SETTLE_LINES, MEASURE_LINES = 2, 16  # decode lines per stride (8 steps each at --decode-log-interval 8)
LOG_INTERVAL = 8
POLL_S = 0.1
# decode lines the requests last: each stride's lines, the lines that pass between a measurement's end
# and the next switch, and a margin (decode is cheap: 8 x 200K at every-4 is ~6 ms a step)


def stride_server(key: str, pattern: str, stride: int, batch: int = 32, checkpoint: str = "l32", extra=()):
    """A bench server (measure.BENCH_ARGS) with a decode stride, the admin key for switches, metrics."""
    return measure.bench_server(key, "patched", pattern, checkpoint=checkpoint, batch=batch,
                                extra=["--index-cache-decode-stride", str(stride), "--admin-api-key", host.ADMIN_KEY,
                                       "--enable-metrics", *extra])


def _switch(ctx, stride: int) -> dict:
    status, body = checks._http(ctx.server, "POST", "/index_cache/stride", {"decode_stride": stride},
                                key=host.ADMIN_KEY, timeout=60)
    ok = status == 200 and isinstance(body, dict) and body.get("decode_stride") == str(stride)
    ctx.check(f"{ctx.server.spec.key}: switched to decode stride {stride}", ok, [status, str(body)[:300]])
    return body if isinstance(body, dict) else {}


def _decode_lines(window) -> list[dict]:
    return [e for e in serve_log.parse_lines(window.read()) if e["kind"] == "decode"]


def _wait_all_decoding(ctx, window, asked: int, deadline: float) -> int | None:
    """``asked`` once every request decodes (two decode lines at that running count after the last
    prefill line); None at the deadline."""
    while time.monotonic() < deadline:
        events = serve_log.parse_lines(window.read())
        last_prefill = max((i for i, e in enumerate(events) if e["kind"] == "prefill"), default=-1)
        after = [e for e in events[last_prefill + 1:] if e["kind"] == "decode" and e["running"] == asked]
        if len(after) >= 2:
            return asked
        time.sleep(POLL_S)
    return None


def _measure(ctx, stride: int, running: int, deadline: float) -> dict:
    window = ctx.server.window()
    body = _switch(ctx, stride)
    lines: list[dict] = []
    while time.monotonic() < deadline and len(lines) < SETTLE_LINES + MEASURE_LINES:
        time.sleep(POLL_S)
        lines = _decode_lines(window)
    kept = [e for e in lines[SETTLE_LINES:] if e["running"] == running]
    rates = [e["tok_s"] for e in kept]
    median = statistics.median(rates) if rates else None
    return {"stride": stride, "effective_stride": body.get("effective_stride"), "lines": len(kept),
            "tok_s_median": median, "step_ms_median": 1e3 * running / median if median else None,
            "spread": ((max(rates) - min(rates)) / median) if median else None, "tok_s": rates,
            "cuda_graph": all(e["cuda_graph"] for e in kept) if kept else None}


def sweep(batch: int, length: int, offset: int = 0, strides=STRIDES):
    """Decode ``batch`` x ``length`` on a stride server and measure each stride by run-time switch."""
    def run(ctx) -> dict:
        server, key = ctx.server, ctx.server.spec.key
        steps = (2 * len(strides) * (SETTLE_LINES + MEASURE_LINES) + 30) * LOG_INTERVAL
        prompts = PromptMaker(0, key, 4000, batch, start=offset)
        jobs = []
        for index in range(batch):
            ids = prompts.make(f"strides{batch}x{length}", length, index)
            jobs.append((Sample(prompt_len=length, new_tokens=steps, first_token=ids[0]), ids))
        window = server.window()
        client = server.client(timeout_s=ctx.timeout())
        thread = threading.Thread(target=run_concurrent, args=(client, jobs), daemon=True)
        thread.start()
        deadline = time.monotonic() + max(60.0, ctx.left())
        running = _wait_all_decoding(ctx, window, batch, deadline)
        ctx.check(f"{key}: all {batch} requests decoding at once (or SGLang's most)", running is not None, running)
        rows = [_measure(ctx, s, running, deadline) for s in strides] if running else []
        thread.join(timeout=max(30.0, deadline - time.monotonic()))
        samples = [sample for sample, _ in jobs]
        lost = [s.error for s in samples if not s.ok]
        ctx.check(f"{key} {batch} x {length}: no request lost across {len(rows)} stride switches",
                  not thread.is_alive() and not lost, lost[:3])
        for row in rows:
            ctx.check(f"{key}: stride {row['stride']} has {MEASURE_LINES} steady decode lines on CUDA graphs",
                      row["lines"] >= MEASURE_LINES - 1 and row["cuda_graph"], row["lines"])
        logged = [line for line in server.log_text().splitlines() if "IndexCache: switched to decode stride" in line]
        ctx.check(f"{key}: the scheduler logged every switch", len(logged) >= len(rows), len(logged))
        by_stride = {r["stride"]: r for r in rows}
        base = by_stride.get(1, {}).get("step_ms_median")
        for row in rows:
            row["speedup_vs_stride1"] = base / row["step_ms_median"] if base and row["step_ms_median"] else None
        drift = (rows[-1]["step_ms_median"] / rows[0]["step_ms_median"] - 1) \
            if len(rows) > 1 and rows[0]["stride"] == rows[-1]["stride"] and rows[0]["step_ms_median"] \
            and rows[-1]["step_ms_median"] else None
        return {"server": key, "batch": batch, "length": length, "running": running, "strides": rows, "drift": drift,
                "startup": server.startup, "pattern": server.spec.pattern,
                "headline": "; ".join(f"stride {r['stride']}: {r['step_ms_median']:.2f} ms/step"
                                      for r in rows if r["step_ms_median"]) + f" at {running} running"}
    return run


def observability(stride: int):
    def check(ctx) -> None:
        text, key = ctx.server.log_text(), ctx.server.spec.key
        ctx.check(f"{key}: start-up line names the decode stride", f"; decode stride {stride} (effective" in text)
        ctx.check(f"{key}: the top-k store is allocated and logged", "top-k store for layers" in text)
        ctx.check(f"{key}: both step kinds captured", "capturing 2 decode graphs per batch size" in text)
        _, info = checks._http(ctx.server, "GET", "/server_info")
        entry = info.get("index_cache") if isinstance(info, dict) else None
        ctx.check(f"{key}: /server_info index_cache.decode_stride = {stride}",
                  bool(entry) and entry.get("decode_stride") == str(stride), entry)
        metrics = ctx.server.client(timeout_s=30).get_text("/metrics", timeout=30)
        gauge = [line for line in metrics.splitlines() if line.startswith("sglang:index_cache_decode_stride")]
        ctx.check(f"{key}: gauge sglang:index_cache_decode_stride", bool(gauge), gauge[:2])
    return check


# ------------------------------------------------------------------ the top-k each layer used (GPU)

TOPK_LAYERS, TOPK_PROMPT, TOPK_NEW, TOPK_K = 8, 2600, 33, 2048  # a prompt beyond index_topk: real selections
TOPK_SERVER = measure.ServerSpec(
    key="i22-topk-8", tree="patched", checkpoint="plain", pattern=pat.uniform(TOPK_LAYERS, 4),
    # the capture keeps a pinned host buffer of (KV tokens x layers x top-k) int32: 64 KiB per token here
    args=(*host.BF16_KV, "--index-cache-every", "4", "--index-cache-decode-stride", "4", "--enable-return-indexer-topk",
          "--admin-api-key", host.ADMIN_KEY, "--context-length", "8192", "--max-total-tokens", "16384",
          "--mem-fraction-static", "0.6", "--disable-radix-cache", "--skip-tokenizer-init",
          "--cuda-graph-max-bs-decode", "4", "--max-running-requests", "4"))


def _rows(meta: dict, layers: int, k: int) -> tuple[array, int]:
    values = array("i", base64.b64decode(meta["indexer_topk"]))
    return values, len(values) // (layers * k)


def structure(values, layers: int, k: int, first_decode: int, stride: int, pattern: str) -> list[str]:
    """What breaks the reuse rule in a captured top-k ``values`` (``[tokens, layers, k]`` flat; the
    decode steps are tokens ``first_decode ..``; one request alone, so it refreshes at its first decode
    step and every ``stride`` steps after). Empty: every step of every layer follows it."""
    rows = len(values) // (layers * k)

    def get(t, layer):
        return list(values[(t * layers + layer) * k:(t * layers + layer + 1) * k])

    problems = []
    for layer in pat.full_layers(pattern):
        refresh = None
        for j, t in enumerate(range(first_decode, rows)):
            row, d = get(t, layer), j % stride
            if min(row) < 0:
                problems.append(f"layer {layer} step {j}: -1 entries with {t + 1} keys")
            if d == 0:
                refresh = row
                continue
            if row[:k - d] != refresh[:k - d]:
                problems.append(f"layer {layer} step {j}: the first {k - d} entries are not the refresh's best")
            tail = row[k - d:]
            if len(set(tail)) != d or set(tail) & set(refresh):
                problems.append(f"layer {layer} step {j}: the {d} newest are not {d} new keys")
            if d >= 2 and row[k - d:k - 1] != get(t - 1, layer)[k - d + 1:]:
                problems.append(f"layer {layer} step {j}: the newest keys do not carry over from the step before")
    for layer, source in enumerate(pat.reuse_source(pattern)):
        if source != layer and any(get(t, layer) != get(t, source) for t in range(rows)):
            problems.append(f"S layer {layer} does not use layer {source}'s top-k")
    return problems


def topk_structure(ctx) -> dict:
    server, out = ctx.server, {}
    observability(4)(ctx)
    prompts = PromptMaker(0, server.spec.key, 4000, 2)
    for index, stride in enumerate((4, 2)):
        if stride != 4:
            _switch(ctx, stride)
        ids = prompts.make("topk", TOPK_PROMPT, index)
        status, body = checks._http(server, "POST", "/generate", {
            "input_ids": ids, "return_indexer_topk": True,
            "sampling_params": {"max_new_tokens": TOPK_NEW, "temperature": 0.0, "ignore_eos": True}}, timeout=300)
        meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
        if not ctx.check(f"stride {stride}: a request with its captured top-k", status == 200 and "indexer_topk" in meta,
                         [status, str(body)[:300]]):
            continue
        values, rows = _rows(meta, TOPK_LAYERS, TOPK_K)
        problems = structure(values, TOPK_LAYERS, TOPK_K, TOPK_PROMPT, stride, server.spec.pattern)
        (ctx.work / f"problems-stride{stride}.json").write_text(json.dumps(problems[:200], indent=1))
        ctx.check(f"stride {stride}: every decode step of every layer follows the reuse rule ({rows - TOPK_PROMPT}"
                  " steps)", rows == TOPK_PROMPT + TOPK_NEW - 1 and not problems, problems[:5] or rows)
        out[f"stride{stride}"] = {"rows": rows, "problems": len(problems)}
    _switch(ctx, 4)
    out["headline"] = ", ".join(f"{k}: {v['problems']} problems in {v['rows']} rows" for k, v in out.items())
    return out


# ------------------------------------------------------------------ switches under load (no graphs)

CALIBRATION_SERVER = measure.ServerSpec(
    key="i22-calibration-8", tree="patched", checkpoint="plain", start_kind="nograph", pattern="F" * 8,
    args=(*host.BF16_KV, "--index-cache-calibration", "--index-cache-decode-stride", "2", "--admin-api-key",
          host.ADMIN_KEY, "--context-length", "32768", "--max-total-tokens", "65536", "--mem-fraction-static", "0.6"))


def switches_under_load(ctx) -> dict:
    actions = []
    for stride, pattern in zip((4, 1, 8, 2), ("FSSSFSSS", "FFFFFFFF", "FSFSFSFS", "FSSSSSSS")):
        actions += [("/index_cache/stride", {"decode_stride": stride}, "decode_stride", str(stride)),
                    ("/index_cache/pattern", {"pattern": pattern}, "pattern", pattern)]
    result = checks.switch_under_load(ctx, seconds=SWITCH_SECONDS, clients=16, actions=actions, max_prompt=4096)
    logged = [line for line in ctx.server.log_text().splitlines() if "IndexCache: switched to decode stride" in line]
    ctx.check("stride switches under load logged by the scheduler", len(logged) >= result["switches"] // 2, len(logged))
    return {**result, "headline": f"{result['requests']} requests, {result['lost']} lost, {result['switches']} switches"}


# ------------------------------------------------------------------ the comparison (host only)

def _step_ms(ctx, phase: str) -> float | None:
    decode = (ctx.result(phase).get("serve") or {}).get("decode") or []
    return ((decode[0].get("server_log") or {}).get("step_ms_median")) if decode else None


def compare(sweep_phase: str, no_stride_phase: str, all_f_phase: str, target: float = 1.6, within: float = 0.03):
    """Stride 4 against stock all-F (issue 22's target), stride 1 (run-time) against no stride."""
    def run(ctx) -> dict:
        rows = {r["stride"]: r for r in ctx.result(sweep_phase)["strides"]}
        all_f, no_stride = _step_ms(ctx, all_f_phase), _step_ms(ctx, no_stride_phase)
        out = {"all_f_ms": all_f, "no_stride_ms": no_stride, "rows": []}
        for stride, row in sorted(rows.items()):
            ms = row["step_ms_median"]
            out["rows"].append({"stride": stride, "step_ms": ms, "vs_all_f": all_f / ms if ms and all_f else None,
                                "vs_no_stride": no_stride / ms if ms and no_stride else None})
        four, one = rows.get(4, {}).get("step_ms_median"), rows.get(1, {}).get("step_ms_median")
        ctx.check(f"every-4 + stride 4 decodes >= {target}x as fast as stock all-F (8 x 200K)",
                  four and all_f and all_f / four >= target, f"{all_f} / {four}")
        ctx.check(f"stride 1 (run-time, refresh graphs) within {within:.0%} of the server without a stride",
                  one and no_stride and abs(one / no_stride - 1) <= within, f"{one} vs {no_stride}")
        speed = f"{all_f / four:.2f}x" if four and all_f else "n/a"
        out["headline"] = f"stride 4 vs all-F {speed}; stride 1 {_f(one)} vs no stride {_f(no_stride)} ms/step"
        return out
    return run


def markdown(phases: dict) -> list[str]:
    """The report's decode-stride tables (sweeps, then the comparison)."""
    lines = []
    for name, entry in phases.items():
        result = entry.get("result") or {}
        if entry.get("status") != "done" or "strides" not in result:
            continue
        drift = "-" if result["drift"] is None else f"{result['drift']:+.1%}"
        lines += [f"{result['server']} ({result['pattern'] and pat.describe(result['pattern'])}), {result['batch']} x"
                  f" {result['length']:,} tokens, {result['running']} running; drift of the repeated stride: {drift}", "",
                  "| stride | ms/step | tok/s | vs stride 1 | steady lines | spread |", "|---|---|---|---|---|---|"]
        for row in result["strides"]:
            lines.append(f"| {row['stride']} | {_f(row['step_ms_median'])} | {_f(row['tok_s_median'], 0)} |"
                         f" {_f(row['speedup_vs_stride1'])}x | {row['lines']} | {_f(row['spread'], 3)} |")
        lines.append("")
    for entry in phases.values():
        result = entry.get("result") or {}
        if entry.get("status") == "done" and "vs_all_f" in json.dumps(result.get("rows", [])):
            lines += [f"stock all-F {_f(result['all_f_ms'])} ms/step, every-4 without a stride"
                      f" {_f(result['no_stride_ms'])} ms/step", "",
                      "| stride | ms/step | vs stock all-F | vs every-4 without a stride |", "|---|---|---|---|"]
            lines += [f"| {r['stride']} | {_f(r['step_ms'])} | {_f(r['vs_all_f'])}x | {_f(r['vs_no_stride'])}x |"
                      for r in result["rows"]]
    return lines


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
