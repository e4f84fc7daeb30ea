"""Calibration through a patched SGLang server (issue 23), as the live runner's ``issue23`` plan.

Where the time goes at GLM-5's depth, on one calibration-mode server (``cal-l78``) of a 78-layer
GLM-5-attention stack (hidden 2048; checkpoint ``l78-indexers``: ``make-checkpoint --weights
indexer``, i.e. config, tokenizer and the indexer tensors, which ``calibrate --url`` reads for the
pattern file's fingerprint and without which it refuses the checkpoint; served with
``--load-format dummy``):

- ``cal-l78:probes``: pattern switches; one request of 4 x 4,096 tokens with and without prompt log-probs;
- ``cal-l78:plain``, ``cal-l78:in-flight``: ``indexcache calibrate --url`` at keep 1/4 on 65,536
  tokens, stopped by ``--max-seconds``, with ``--in-flight`` 1 then 4 (the same first candidates,
  whose losses must agree bit for bit);
- ``topk-capture`` (no server: after it stopped): the per-forward cost of SGLang's indexer top-k
  capture at these sizes (``scripts/topk_capture_bench.py``);
- ``calibration-timing`` (host only): all of it as ``calibration_timing.json``, returned beside
  summary.json; ``scripts/calibration_timing_model.py`` turns it into docs/perf.md.

Plain against in-flight, the whole search: ``cal-8:compare`` and ``cal-16:compare`` on the runner's
random-weight 8- and 16-layer checkpoints (16,384 tokens in blocks of 4,096, one block per request
and per forward in both runs), then ``calibration-compare``: the same flips, every shared candidate's
loss, the closest call of each step (``calibration_compare.json``).
"""

from __future__ import annotations

import json
import random
import sys
import time

from sglang_indexcache.bench.serve import ServeError

from . import host
from .runner import Phase
from .servers import ServerSpec

DATA = host.REPO / "models" / "tiny-glm-dsa" / "data"  # calibration.txt + evaluation.txt: ~117K tokens
TIMING = {"checkpoint": "l78-indexers", "keep": 0.25, "seq_len": 4096, "tokens": 65536, "batch_size": 4,
          "in_flight": 4, "search_s": 50}
COMPARE = {"checkpoints": ("plain", "l16"), "keep": 0.25, "seq_len": 4096, "tokens": 16384, "batch_size": 1,
           "in_flight": 4}
COMPARE_S = {8: 60, 16: 120}  # device seconds of both whole searches (CLI start-ups included), per depth
CLI_S = 35  # a calibrate --url run's start (torch, tokenizer, data) and the evaluation that outlasts --max-seconds
PROBE_REPEATS = 3
COMMAND = "python3 scripts/gpu_live.py --plan issue23 --out $OUT --budget 560"


def search_server(key: str, checkpoint: str, cfg: dict, extra=(), start_kind: str = "nograph") -> ServerSpec:
    """Calibration mode, radix cache off; a forward holds one request (chunk = its tokens) in both runs."""
    tokens = str(cfg["seq_len"] * cfg["batch_size"])
    args = (*host.BF16_KV, "--index-cache-calibration", "--admin-api-key", host.ADMIN_KEY, "--context-length", "8192",
            "--mem-fraction-static", "0.8", "--disable-radix-cache", "--chunked-prefill-size", tokens,
            "--max-prefill-tokens", tokens, *extra)
    return ServerSpec(key=key, tree="patched", checkpoint=checkpoint, args=args, start_kind=start_kind,
                      pattern="F" * host.layers(checkpoint))


def phases() -> list[Phase]:
    deep = search_server(f"cal-l{host.layers(TIMING['checkpoint'])}", TIMING["checkpoint"], TIMING,
                         ("--load-format", "dummy"), start_kind="deep-nograph")
    timing = [f"{deep.key}:probes", f"{deep.key}:plain", f"{deep.key}:in-flight", "topk-capture"]
    search_s = TIMING["search_s"] + CLI_S
    out = [Phase(timing[0], probes, 30, server=deep),
           Phase(timing[1], timing_search(1), search_s, server=deep, kind="search-deep"),
           Phase(timing[2], timing_search(TIMING["in_flight"]), search_s, server=deep, kind="search-deep"),
           Phase(timing[3], capture(host.layers(TIMING["checkpoint"])), 40),
           Phase("calibration-timing", timing_summary(*timing), 1, gpu=False, needs=tuple(timing))]
    compared = []
    for checkpoint in COMPARE["checkpoints"]:
        layers = host.layers(checkpoint)
        compared.append(Phase(f"cal-{layers}:compare", compare_model(checkpoint), COMPARE_S.get(layers, 8 * layers),
                              server=search_server(f"cal-{layers}", checkpoint, COMPARE)))
    names = tuple(p.name for p in compared)
    return [*out, *compared, Phase("calibration-compare", compare_summary(names), 1, gpu=False, needs=names)]


def _config(checkpoint: str) -> dict:
    return json.loads((host.CK / checkpoint / "config.json").read_text())


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


# ------------------------------------------------------------------ timing at depth ----------------

def probes(ctx) -> dict:
    """Pattern switches and one request of ``batch_size`` blocks with and without prompt log-probs."""
    cfg, server = TIMING, ctx.server
    config = _config(server.spec.checkpoint)
    admin, client = server.client(timeout_s=600, api_key=host.ADMIN_KEY), server.client(timeout_s=ctx.timeout())
    layers = len(admin.get_json("/index_cache", timeout=30)["pattern"])
    rng = random.Random(0)
    ids = [[rng.randrange(1, 4000) for _ in range(cfg["seq_len"])] for _ in range(cfg["batch_size"])]
    out = {"tokens": cfg["seq_len"] * cfg["batch_size"], "switch": [], "forward_only": [], "logprob": [],
           "startup_s": server.startup.get("startup_s"), "model": {"path": str(host.CK / server.spec.checkpoint),
           "layers": config["num_hidden_layers"], "hidden": config["hidden_size"]}}
    patterns = ["F" + "S" * (layers - 1), "F" * layers]
    for i in range(2 * PROBE_REPEATS):
        t = time.perf_counter()
        try:
            admin.post_json("/index_cache/pattern", {"pattern": patterns[i % 2]})
            out["switch"].append(round(time.perf_counter() - t, 4))
        except ServeError:
            out["switch"].append(None)
    for name, logprob in (("forward_only", False), ("logprob", True)):
        for _ in range(PROBE_REPEATS):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
            if logprob:
                body.update(return_logprob=True, logprob_start_len=0)
            t = time.perf_counter()
            try:
                reply = client.post_json("/generate", body)
            except ServeError:
                reply = None
            client_s = time.perf_counter() - t
            ok = isinstance(reply, list) and len(reply) == cfg["batch_size"]
            server_s = max(r["meta_info"].get("e2e_latency", 0.0) for r in reply) if ok else None
            out[name].append({"client_s": round(client_s, 4), "server_s": server_s, "ok": ok})
    for name in ("forward_only", "logprob"):  # the median of the repeats after the first (warm-up)
        out[f"{name}_s"] = _median(r["server_s"] for r in out[name][1:])
    out["switch_s"] = _median(out["switch"])
    answered = [s is not None for s in out["switch"]] + [r["ok"] for n in ("forward_only", "logprob") for r in out[n]]
    ctx.check("probes: every switch and request answered", all(answered), out)
    seconds = {k: "–" if out[k] is None else f"{out[k]:.3f}" for k in ("switch_s", "forward_only_s", "logprob_s")}
    out["headline"] = (f"switch {seconds['switch_s']} s; {out['tokens']:,} tokens: {seconds['forward_only_s']} s"
                       f" forward, {seconds['logprob_s']} s with log-probs")
    return out


def timing_search(in_flight: int):
    def run(ctx) -> dict:
        cfg = TIMING
        tag = "plain" if in_flight == 1 else "in_flight"
        result = search(ctx, tag, cfg["checkpoint"], cfg, in_flight, cfg["search_s"])
        done = len(result.get("candidates") or {}) if not result["finished"] else result.get("evaluations")
        return dict(result, headline=f"--in-flight {in_flight}: {done} candidates scored in {result['wall_s']} s"
                    + (" (finished)" if result["finished"] else f" (stopped by --max-seconds {cfg['search_s']})"))
    return run


def search(ctx, tag: str, checkpoint: str, cfg: dict, in_flight: int, max_seconds: float | None) -> dict:
    """``indexcache calibrate --url`` on the running server; the state or pattern file summarised."""
    out, model = ctx.work / f"{tag}.json", host.CK / checkpoint
    state_file = out.with_name(out.name + ".state.json")
    for stale in (out, state_file):
        stale.unlink(missing_ok=True)
    args = ["calibrate", "--url", ctx.server.url, "--api-key", host.ADMIN_KEY, "--model", model, "--data", DATA,
            "--seq-len", cfg["seq_len"], "--max-tokens", cfg["tokens"], "--batch-size", cfg["batch_size"],
            "--keep", cfg["keep"], "--out", out, "--in-flight", in_flight, "--no-plot"]
    if max_seconds is not None:
        args += ["--max-seconds", f"{max_seconds:.0f}"]
    t = time.time()
    proc = host.indexcache(*args, timeout=ctx.timeout())
    wall = round(time.time() - t, 1)
    (ctx.work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    ctx.check(f"{tag}: calibrate --url exits 0", proc.returncode == 0, proc.stderr[-1500:])
    if out.is_file():
        doc = json.loads(out.read_text())
        cal = doc["calibration"]
        return {"finished": True, "wall_s": wall, "pattern": doc["pattern"], "steps": cal["steps"],
                "evaluations": cal["evaluations"], "server_timings": cal.get("server_timings"),
                "seconds": cal["seconds"], "baseline_loss": cal["baseline_loss"], "candidates": {}}
    if not state_file.is_file():
        return {"finished": False, "wall_s": wall, "error": proc.stderr[-800:]}
    state = json.loads(state_file.read_text())
    return {"finished": False, "wall_s": wall, "pattern": state["pattern"], "steps": state["steps"],
            "evaluations": state.get("evaluations", 0), "reset_s": state.get("reset_seconds"),
            "server_timings": state.get("server_timings"), "baseline_loss": state["baseline_loss"],
            "candidates": state["partial"]["results"]}


def capture(layers: int):
    """The top-k capture's cost per forward of ``seq_len x batch_size`` tokens through ``layers`` layers."""
    def run(ctx) -> dict:
        tokens = TIMING["seq_len"] * TIMING["batch_size"]
        proc = host.run([sys.executable, host.REPO / "scripts" / "topk_capture_bench.py", tokens, layers, 2048,
                         PROBE_REPEATS], timeout=300)
        (ctx.work / "capture_bench.log").write_text(proc.stdout + proc.stderr)
        if not ctx.check("top-k capture cost measured", proc.returncode == 0, proc.stderr[-800:]):
            return {"headline": "not measured"}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        return dict(result, headline=f"{result['seconds']:.3f} s per forward of {tokens:,} tokens x {layers} layers"
                    f" ({result['gib']:.1f} GiB) on {result['device']}")
    return run


def _plain(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "headline"}


def timing_summary(probes_phase: str, plain_phase: str, fast_phase: str, capture_phase: str):
    """``calibration_timing.json``: what the report generator (calibration_timing_model.py) reads."""
    def run(ctx) -> dict:
        probed, plain, fast = (_plain(ctx.result(n)) for n in (probes_phase, plain_phase, fast_phase))
        cap = _plain(ctx.result(capture_phase))
        model = probed.pop("model")
        setup = {"layers": model["layers"], "hidden": model["hidden"], "path": model["path"],
                 "checkpoint": "config, tokenizer and indexer tensors (make-checkpoint --weights indexer)",
                 "startup_s": probed.pop("startup_s"), **{k: TIMING[k] for k in ("keep", "seq_len", "tokens",
                                                                                "batch_size")}}
        result = {"setup": setup, "probes": probed, "runs": {"plain": plain, "in_flight": fast}, "capture": cap,
                  "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": cap.get("device"), "command": COMMAND,
                  "agree": same_candidates(plain, fast)}
        ctx.check("timing: the in-flight run scored the plain run's candidates the same", result["agree"]["same"],
                  result["agree"])
        entries = [ctx.state.phase(n) for n in (probes_phase, plain_phase, fast_phase, capture_phase)]
        result["phase_s"] = round(sum(e.get("seconds", 0) + (e.get("server_start_s") or 0) for e in entries), 1)
        ctx.publish("calibration_timing.json", result)
        agree = result["agree"]
        return {"file": "calibration_timing.json", "agree": agree, "phase_s": result["phase_s"],
                "headline": f"{agree['common']} candidates scored by both runs, the same: {agree['same']}"}
    return run


def same_candidates(a: dict, b: dict) -> dict:
    """Losses of the candidates both runs scored (same pattern, same data): equal bit for bit?"""
    la, lb = _losses(a), _losses(b)
    common = sorted(set(la) & set(lb))
    diffs = [abs(la[k] - lb[k]) for k in common]
    return {"common": len(common), "same": bool(common) and max(diffs) == 0.0, "max_abs_diff": max(diffs, default=None)}


def _losses(run: dict) -> dict:
    """(pattern the step started from, candidate) -> mean loss, from the steps and the partial step."""
    out, before = {}, None
    for step in run.get("steps", []):
        before = before or "F" * len(step["pattern"])  # every search here starts from all F
        for j, loss in (step.get("candidates") or {}).items():
            out[(before, j)] = loss
        before = step["pattern"]
    for key, entry in (run.get("candidates") or {}).items():  # "j:batches" (no screening here: all)
        out[(run["pattern"], key.split(":")[0])] = entry[0]
    if run.get("baseline_loss") is not None:
        out[("baseline",)] = run["baseline_loss"]
    return out


# ------------------------------------------------------------------ plain against in-flight --------

def compare_model(checkpoint: str):
    """The whole keep-1/4 search, plain then ``--in-flight``, on one checkpoint: the same flips?"""
    def run(ctx) -> dict:
        cfg = COMPARE
        runs = {"plain": search(ctx, "plain", checkpoint, cfg, 1, None),
                "in_flight": search(ctx, "in_flight", checkpoint, cfg, cfg["in_flight"], None)}
        config = _config(checkpoint)
        layers = config["num_hidden_layers"]
        result = {"layers": layers, "hidden": config["hidden_size"], "runs": runs, **flips(runs["plain"], runs["in_flight"])}
        summary = {k: v for k, v in result.items() if k != "runs"}
        ctx.check(f"compare {layers} layers: the in-flight search commits the plain search's flips",
                  summary["same_flips"], summary)
        return dict(result, headline=f"same flips: {result['same_flips']}; {result['candidates_compared']}"
                    f" candidates compared, largest loss difference {result['max_abs_loss_diff']}")
    return run


def flips(plain: dict, fast: dict) -> dict:
    """Same committed flips? Every shared candidate's loss difference, and the closest call of each step."""
    removed = [[s["removed"] for s in run.get("steps", [])] for run in (plain, fast)]
    margins = []
    for step in plain.get("steps", []):
        losses = sorted((step.get("candidates") or {}).values())
        if len(losses) > 1:
            margins.append(losses[1] - losses[0])
    agree = same_candidates(plain, fast)
    return {"same_flips": plain.get("finished", False) and removed[0] == removed[1], "removed": removed,
            "patterns": [plain.get("pattern"), fast.get("pattern")], "candidates_compared": agree["common"],
            "max_abs_loss_diff": agree["max_abs_diff"], "smallest_margin": min(margins, default=None),
            "seconds": [plain.get("seconds"), fast.get("seconds")]}


def compare_summary(names: tuple):
    """``calibration_compare.json``: every model's runs and verdict."""
    def run(ctx) -> dict:
        models = {str(r["layers"]): r for r in (_plain(ctx.result(n)) for n in names)}
        hidden = sorted({r.pop("hidden") for r in models.values()})
        setup = {k: COMPARE[k] for k in ("keep", "seq_len", "tokens", "batch_size", "in_flight")}
        entries = [ctx.state.phase(n) for n in names]
        result = {"setup": dict(setup, hidden=hidden[0] if len(hidden) == 1 else hidden), "models": models,
                  "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": COMMAND,
                  "phase_s": round(sum(e.get("seconds", 0) + (e.get("server_start_s") or 0) for e in entries), 1)}
        ctx.publish("calibration_compare.json", result)
        same = [k for k, r in models.items() if r["same_flips"]]
        return {"file": "calibration_compare.json", "same_flips": same,
                "headline": f"same flips on {len(same)}/{len(models)} depths ({', '.join(models)} layers)"}
    return run
