"""PASS/FAIL checks of the patched server on the 8-layer checkpoints (the `checks` plan).

- ``bad_flags``: each bad flag, and an F layer without indexer weights, stops the real launcher with
  one ``IndexCache: error:`` line and exit 2 (no server stays up).
- ``calibration_checks`` (on a calibration-mode server): admin key required, ``/index_cache``,
  ``/server_info`` entry, the kept-indexer gauge, switches (idle, invalid, every second under 16
  concurrent clients: none lost), ``/index_cache/overlap``, ``indexcache calibrate --url`` writing a
  pattern file that validates.
- ``observability`` / ``no_index_cache`` / ``flag_wins``: start-up line, ``/server_info`` and gauge of
  a bench server (run first by the ``bench8`` plan's parts).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from sglang_indexcache.bench.serve import ServeError

from . import host
from .servers import ServerSpec

LAYERS = 8
BAD_FLAGS = [  # (id, checkpoint, flags, part of the one error line)
    ("short", "plain", ["--index-cache-pattern", "FSS"], "pattern has 3 layers but the model has 8"),
    ("layer0-shared", "plain", ["--index-cache-pattern", "SFFFFFFF"], "layer 0 must be F"),
    ("stray-char", "plain", ["--index-cache-pattern", "FxSSFSSS"], "'x' (U+0078) at position 2"),
    ("every-zero", "plain", ["--index-cache-every", "0"], "--index-cache-every must be a positive integer"),
    ("two-flags", "plain", ["--index-cache-pattern", "FSSSFSSS", "--index-cache-every", "4"], "give only one of"),
    ("f-without-weights", "glm52", ["--index-cache-pattern", "FFSSFSSS"], "layer 1 is F but"),
    ("calibration-without-weights", "glm52", ["--index-cache-calibration"], "no indexer weights for layers"),
    ("file-other-model", "plain", ["--index-cache-pattern-file", "@glm5-file"], "another model"),
    ("override-conflict", "plain", ["--index-cache-every", "4", "--json-model-override-args",
                                    '{"index_topk_pattern": "FSFSFSFS"}'], "conflicts with the IndexCache flag"),
]
CALIBRATION_SERVER = ServerSpec(
    key="calibration-8", tree="patched", checkpoint="plain", start_kind="nograph", pattern="F" * LAYERS,
    # --enable-return-indexer-topk for /index_cache/overlap; --max-total-tokens: that capture keeps a pinned
    # host buffer of (KV tokens x layers x top-k) int32, 64 KiB per token here
    args=(*host.BF16_KV, "--index-cache-calibration", "--enable-return-indexer-topk", "--admin-api-key",
          host.ADMIN_KEY, "--enable-metrics",
          "--context-length", "32768", "--max-total-tokens", "65536", "--mem-fraction-static", "0.6"))


def _http(server, method: str, path: str, body=None, key: str | None = None, timeout: float = 600):
    """(status, JSON or text) of one request; never raises for HTTP errors."""
    client = server.client(timeout_s=timeout, api_key=key)
    try:
        return 200, (client.get_json(path, timeout) if method == "GET" else client.post_json(path, body, timeout))
    except ServeError as exc:
        text = str(exc)
        status = int(text.split("HTTP ", 1)[1].split(":", 1)[0]) if "HTTP " in text else 0
        return status, text


def gauge(server) -> list[str]:
    """The ``sglang:index_cache_kept_indexers`` lines of ``/metrics``."""
    try:
        text = server.client(timeout_s=30).get_text("/metrics", timeout=30)
    except ServeError:
        return []
    return [line for line in text.splitlines() if line.startswith("sglang:index_cache_kept_indexers")]


def bad_flags(ctx) -> dict:
    glm5_file = ctx.work / "glm5-all-f.json"  # a valid pattern file, made for another model
    proc = host.run([sys.executable, "-c", "import sys; from sglang_indexcache import pattern_file;"
                     " from sglang_indexcache.model_info import load_model_info;"
                     " pattern_file.write(sys.argv[2], pattern_file.make_document('FFFF', load_model_info(sys.argv[1])))",
                     host.CK / "glm5", glm5_file])
    ctx.check("pattern file for the 6144 checkpoint written", proc.returncode == 0, proc.stderr[-800:])
    procs = []
    for name, ckpt, flags, _ in BAD_FLAGS:
        flags = [str(glm5_file) if f == "@glm5-file" else f for f in flags]
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(host.CK / ckpt),
                *host.COMMON_ARGS, *host.BF16_KV, *flags]
        procs.append(subprocess.Popen(argv, env=host.env("patched"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True, cwd=str(host.OURS)))
    rows = []
    for (name, _, _, expected), proc in zip(BAD_FLAGS, procs):
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        lines = [line for line in err.splitlines() if line.startswith("IndexCache: error:")]
        ok = proc.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err
        rows.append({"case": name, "exit": proc.returncode, "line": lines[0] if lines else err.strip()[-300:]})
        ctx.check(f"bad flag {name}: one line, exit 2", ok, f"exit {proc.returncode}: {err[-600:]}")
    return {"cases": rows, "headline": f"{sum(r['exit'] == 2 for r in rows)}/{len(rows)} refused with exit 2"}


def calibration_checks(ctx) -> dict:
    server, key, out = ctx.server, host.ADMIN_KEY, {}
    logtext = server.log_text()
    ctx.check("calibration: start-up line", "IndexCache: pattern FFFFFFFF (8/8 indexers kept, 0 shared)" in logtext)
    ctx.check("calibration: CUDA graphs and radix cache off, logged", "IndexCache calibration mode" in logtext)
    status, _ = _http(server, "GET", "/index_cache")
    ctx.check("endpoints need the admin key (401 without)", status == 401, status)
    status, state = _http(server, "GET", "/index_cache", key=key)
    ctx.check("GET /index_cache", status == 200 and state.get("pattern") == "F" * LAYERS and state.get("calibration"),
              state)
    _, info = _http(server, "GET", "/server_info")
    entry = info.get("index_cache") if isinstance(info, dict) else None
    ctx.check("/server_info has index_cache", bool(entry) and entry.get("kept_indexers") == LAYERS, entry)
    lines = gauge(server)
    ctx.check("gauge sglang:index_cache_kept_indexers", bool(lines) and lines[0].rstrip().endswith(f"{LAYERS}.0"), lines)
    status, body = _http(server, "POST", "/index_cache/pattern", {"pattern": "FSSSFSSS"}, key=key)
    ctx.check("POST /index_cache/pattern switches (idle)", status == 200 and body.get("pattern") == "FSSSFSSS", body)
    status, body = _http(server, "POST", "/index_cache/pattern", {"pattern": "SFFFFFFF"}, key=key)
    _, state = _http(server, "GET", "/index_cache", key=key)
    ctx.check("invalid pattern refused (400), state unchanged", status == 400 and state.get("pattern") == "FSSSFSSS",
              [status, body, state])
    lines = gauge(server)
    ctx.check("gauge follows the switch (2 kept)", bool(lines) and lines[0].rstrip().endswith("2.0"), lines)
    out["overlap"] = overlap(ctx)
    out["calibrated"] = calibrate(ctx)
    out["switch_under_load"] = switch_under_load(ctx)
    switched = [line for line in server.log_text().splitlines() if "IndexCache: switched to pattern" in line]
    retracted = [line for line in switched if "retracted" in line]
    out["switch_under_load"].update(logged=len(switched), retracted=len(retracted))
    ctx.check("switches under load logged by the scheduler, running requests retracted and recomputed",
              len(switched) >= out["switch_under_load"]["switches"] and retracted, len(switched))
    ctx.check("calibration server still healthy after the switches", _http(server, "GET", "/health", timeout=10)[0] == 200)
    return out


def overlap(ctx) -> dict:
    # ~3000 tokens of the embedded model's held-out text: beyond top-k 2048, so selections are real
    text = (host.REPO / "models" / "tiny-glm-dsa" / "data" / "evaluation.txt").read_text()[:12000]
    status, body = _http(ctx.server, "POST", "/index_cache/overlap", {"text": [text]}, key=host.ADMIN_KEY, timeout=900)
    (ctx.work / "overlap.json").write_text(json.dumps([status, body], indent=1))
    ok = status == 200 and isinstance(body, dict) and len(body.get("layers", [])) == LAYERS
    rows = body.get("layers", []) if ok else []
    full_ok = all(r["recall"] == 1.0 for r in rows if not r["shared"])
    range_ok = all(r["recall"] is not None and 0.0 <= r["recall"] <= 1.0 for r in rows)
    ctx.check("overlap: one row per layer, recall in [0, 1], 1.0 where source == layer",
              ok and full_ok and range_ok and body.get("pattern") == "FSSSFSSS", [status, str(body)[:400]])
    _, state = _http(ctx.server, "GET", "/index_cache", key=host.ADMIN_KEY)
    ctx.check("overlap restores the pattern", state.get("pattern") == "FSSSFSSS", state)
    return {"tokens": body.get("tokens") if ok else None, "mean_recall": body.get("mean_recall") if ok else None}


def calibrate(ctx) -> str | None:
    out = ctx.work / "calibrated.json"
    proc = host.indexcache("calibrate", "--url", ctx.server.url, "--api-key", host.ADMIN_KEY, "--model", host.CK / "plain",
                           "--data", host.REPO / "models" / "tiny-glm-dsa" / "data" / "calibration.txt",
                           "--seq-len", "4096", "--max-tokens", "16384", "--keep", "0.125", "--out", out)
    (ctx.work / "calibrate.log").write_text(proc.stdout + proc.stderr)
    ctx.check("indexcache calibrate --url against the live server", proc.returncode == 0 and out.is_file(),
              proc.stderr[-1500:])
    if not out.is_file():
        return None
    valid = host.indexcache("validate", out, "--model", host.CK / "plain")
    ctx.check("the calibrated pattern file validates against the checkpoint", valid.returncode == 0,
              valid.stdout + valid.stderr)
    return json.loads(out.read_text())["pattern"]


def switch_under_load(ctx, seconds: float = 25.0, clients: int = 16, actions=None, max_prompt: int = 2048) -> dict:
    """Clients decoding while a switcher runs ``actions`` in turn, one a second: (path, body, reply
    field, expected value); pattern switches by default."""
    if actions is None:
        actions = [("/index_cache/pattern", {"pattern": p}, "pattern", p)
                   for p in ("FSSSFSSS", "FFFFFFFF", "FSSSSSSS", "FSFSFSFS", "FFSSFFSS")]
    stop, lock = threading.Event(), threading.Lock()
    replies, switches = [], []

    def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            rng = random.Random(1_000_003 * index + n)  # every prompt its own: no shared prefix
            ids = [rng.randrange(1, 4000) for _ in range(rng.randrange(256, max_prompt))]
            t = time.time()
            status, body = _http(ctx.server, "POST", "/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 32, "temperature": 0.0, "ignore_eos": True}}, timeout=300)
            meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
            good = status == 200 and meta.get("completion_tokens") == 32 and meta.get("prompt_tokens") == len(ids)
            with lock:
                replies.append({"client": index, "status": status, "ok": good, "s": round(time.time() - t, 3),
                                "error": None if good else str(body)[:200]})
            n += 1

    def switcher() -> None:
        i = 0
        while not stop.is_set():
            t = time.time()
            path, request, field, asked = actions[i % len(actions)]
            status, body = _http(ctx.server, "POST", path, request, key=host.ADMIN_KEY)
            with lock:
                switches.append({"asked": asked, "status": status, "s": round(time.time() - t, 3),
                                 "now": body.get(field) if isinstance(body, dict) else str(body)[:200]})
            i += 1
            time.sleep(max(0.0, 1.0 - (time.time() - t)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=switcher)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    lost = [r for r in replies if not r["ok"]]
    (ctx.work / "switch_under_load.json").write_text(json.dumps({"replies": replies, "switches": switches}, indent=1))
    ctx.check(f"switch every second under {clients} clients: every request completes", replies and not lost, lost[:3])
    good = [s for s in switches if s["status"] == 200 and s["now"] == s["asked"]]
    ctx.check("every switch answered 200 with what it asked for", switches and len(good) == len(switches), switches[:5])
    return {"requests": len(replies), "lost": len(lost), "switches": len(switches), "switches_ok": len(good),
            "clients": clients, "seconds": seconds}


# ------------------------------------------------------------------ bench servers' own checks

def observability(expected: str, source: str):
    def checks(ctx) -> None:
        logtext, kept = ctx.server.log_text(), expected.count("F")
        ctx.check(f"start-up line names {expected} from {source}",
                  f"IndexCache: pattern {expected} ({kept}/{len(expected)} indexers kept" in logtext and source in logtext)
        _, info = _http(ctx.server, "GET", "/server_info")
        entry = info.get("index_cache") if isinstance(info, dict) else None
        ctx.check(f"/server_info index_cache = {expected}", bool(entry) and entry.get("pattern") == expected, entry)
        lines = gauge(ctx.server)
        ctx.check(f"gauge = {kept}", bool(lines) and lines[0].rstrip().endswith(f"{kept}.0"), lines)
    return checks


def no_index_cache(ctx) -> None:
    _, info = _http(ctx.server, "GET", "/server_info")
    ctx.check("patched without flags: no IndexCache log line, no server_info entry",
              "IndexCache" not in ctx.server.log_text() and isinstance(info, dict) and "index_cache" not in info)


def flag_wins(ctx) -> None:
    ctx.check("the flag overrides the checkpoint's own index_topk_pattern, logged",
              "overrode the checkpoint's index_topk_pattern (FSFSFSFS) with FSSSFSSS" in ctx.server.log_text())
    observability("FSSSFSSS", "--index-cache-every 4")(ctx)
