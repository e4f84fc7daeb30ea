#!/usr/bin/env python3
"""Calibration through a patched SGLang server on the GPU host (issue 23): where the time goes, and
whether the fast search commits the same flips as the plain one.

Two phases, each a function ``phase(work, budget_s) -> dict`` that the live runner can call (it
writes everything it measured under WORK and returns the summary; ``ESTIMATE_S`` gives the device
seconds of each on a warm machine, where a server starts in ~60 s; a fresh machine's first server
start adds ~190 s of JIT):

- ``timing``: a 78-layer GLM-5-attention stack (hidden 2048) written by ``indexcache
  make-checkpoint --weights none`` (config and tokenizer only) and served with ``--load-format
  dummy`` in calibration mode. If this tree refuses a checkpoint without safetensors, the phase
  adds one holding only the indexer tensors (zeros; the server still draws dummy weights) and
  says so in the results. Then: probes (pattern switches; one request with and without prompt
  log-probs), ``indexcache calibrate --url`` at keep 1/4 on 65,536 tokens with ``--max-seconds``
  twice on the same server (plain, then ``--in-flight 4``: the same first candidates, so their
  losses must agree), and after the server stops, the cost per forward of SGLang's indexer top-k
  capture at these sizes. ``scripts/calibration_timing_model.py`` turns the JSON into docs/perf.md.
- ``compare``: 8- and 16-layer checkpoints with random weights (``make-checkpoint --weights
  random``): the whole keep-1/4 search through the server, plain and ``--in-flight 4``, on 16,384
  tokens in blocks of 4,096, one block per request; the flips and every candidate's loss compared.

    python3 scripts/gpu_calibration_timing.py --phases timing,compare --out $OUT --budget 560

Uses the live runner's machinery (``gpu_live_sglang.py``: bundle set-up, servers, HTTP) and only the
standard library in this process; everything of ours runs in subprocesses of the bundle's Python.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_live_sglang as live  # noqa: E402  (servers, set-up, HTTP: one home for the live machinery)

REPO = live.REPO
DATA = REPO / "models" / "tiny-glm-dsa" / "data"  # calibration.txt + evaluation.txt: ~117K tokens
ESTIMATE_S = {"timing": 230, "compare": 300}
TIMING = {"layers": 78, "hidden": 2048, "keep": 0.25, "seq_len": 4096, "tokens": 65536, "batch_size": 4,
          "in_flight": 4, "min_run_s": 20}
COMPARE = {"layers": (8, 16), "hidden": 2048, "keep": 0.25, "seq_len": 4096, "tokens": 16384, "batch_size": 1,
           "in_flight": 4}
# one forward = one request of batch_size blocks in both runs (exact: the same rows per forward)
CAL_ARGS = ["--index-cache-calibration", "--admin-api-key", live.KEY, "--context-length", "8192",
            "--mem-fraction-static", "0.8", "--disable-radix-cache"]
PROBE_REPEATS = 3


def _forward_args(tokens_per_forward: int) -> list[str]:
    return ["--chunked-prefill-size", str(tokens_per_forward), "--max-prefill-tokens", str(tokens_per_forward)]


# ------------------------------------------------------------------ checkpoints ---------------------

INDEXER_TENSORS = """
import sys, torch
from safetensors.torch import save_file
from sglang_indexcache.checkpoint_writer import weight_shapes
from sglang_indexcache.model_info import INDEXER_MARK, read_config
path = sys.argv[1]
shapes = {n: s for n, s in weight_shapes(read_config(path)).items() if INDEXER_MARK in n}
save_file({n: torch.zeros(s, dtype=torch.bfloat16) for n, s in shapes.items()}, f"{path}/model.safetensors")
print(len(shapes))
"""


def config_only_checkpoint(work: Path, name: str, layers: int, hidden: int) -> dict:
    """``make-checkpoint --weights none``; the indexer tensors added if this tree needs safetensors."""
    path = live.CK / name
    record = {"path": str(path), "checkpoint": "config-only"}
    if not (path / "config.json").is_file():
        made = live.indexcache("make-checkpoint", path, "--layers", layers, "--hidden", hidden, "--weights", "none")
        live.check(f"{name}: config-only checkpoint written", made.returncode == 0, made.stderr[-800:])
    if (path / "model.safetensors").is_file():
        record["checkpoint"] = "indexer tensors only (this tree refused config-only)"
        return record
    valid = live.indexcache("validate", "F" * layers, "--model", path)
    record["config_only_validate"] = {"exit": valid.returncode, "output": (valid.stdout + valid.stderr)[-600:]}
    if valid.returncode != 0:
        add_indexer_tensors(work, path, record)
    return record


def add_indexer_tensors(work: Path, path: Path, record: dict) -> None:
    added = live.run([sys.executable, "-c", INDEXER_TENSORS, path], timeout=300)
    (work / f"indexer_tensors_{path.name}.log").write_text(added.stdout + added.stderr)
    live.check(f"{path.name}: indexer tensors written for a tree that needs safetensors", added.returncode == 0,
               added.stderr[-800:])
    record["checkpoint"] = "indexer tensors only (this tree refused config-only)"


def random_checkpoint(work: Path, name: str, layers: int, hidden: int) -> Path:
    """make-checkpoint with random weights (seed 0), or the live runner's identical one if written."""
    args = ["--hidden", str(hidden), "--layers", str(layers), "--flavour", "plain"]
    for other, other_args in live.CHECKPOINTS.items():
        if other_args == args and (live.CK / other / "model.safetensors.index.json").is_file():
            return live.CK / other
    path = live.CK / name
    if not (path / "model.safetensors.index.json").is_file():  # written last: the checkpoint is whole
        shutil.rmtree(path, ignore_errors=True)  # a half-written one from an interrupted call
        made = live.indexcache("make-checkpoint", path, *args, "--weights", "random", "--device", "cuda")
        (work / f"make_checkpoint_{name}.log").write_text(made.stdout + made.stderr)
        live.check(f"{name}: random-weight checkpoint written", made.returncode == 0, made.stderr[-800:])
    return path


# ------------------------------------------------------------------ measuring -----------------------

def probes(seq_len: int, batch_size: int, layers: int) -> dict:
    """Pattern switches and one request of ``batch_size`` blocks with and without prompt log-probs."""
    rng = random.Random(0)
    ids = [[rng.randrange(1, 4000) for _ in range(seq_len)] for _ in range(batch_size)]
    out = {"tokens": seq_len * batch_size, "switch": [], "forward_only": [], "logprob": []}
    patterns = ["F" + "S" * (layers - 1), "F" * layers]
    for i in range(2 * PROBE_REPEATS):
        t = time.perf_counter()
        status, _ = live.http("POST", "/index_cache/pattern", {"pattern": patterns[i % 2]}, key=live.KEY)
        out["switch"].append(round(time.perf_counter() - t, 4) if status == 200 else None)
    for name, logprob in (("forward_only", False), ("logprob", True)):
        for _ in range(PROBE_REPEATS):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
            if logprob:
                body.update(return_logprob=True, logprob_start_len=0)
            t = time.perf_counter()
            status, reply = live.http("POST", "/generate", body, timeout=600)
            client = time.perf_counter() - t
            ok = status == 200 and isinstance(reply, list) and len(reply) == batch_size
            server = max(r["meta_info"].get("e2e_latency", 0.0) for r in reply) if ok else None
            out[name].append({"client_s": round(client, 4), "server_s": server, "ok": ok})
    for name in ("forward_only", "logprob"):  # the median of the repeats after the first (warm-up)
        servers = sorted(r["server_s"] for r in out[name][1:] if r["server_s"] is not None)
        out[f"{name}_s"] = servers[len(servers) // 2] if servers else None
    switches = sorted(s for s in out["switch"] if s is not None)
    out["switch_s"] = switches[len(switches) // 2] if switches else None
    return out


def search(work: Path, tag: str, model: Path, cfg: dict, in_flight: int, max_seconds: float | None) -> dict:
    """``indexcache calibrate --url`` on the running server; the state or pattern file summarised."""
    out = work / f"{tag}.json"
    for stale in (out, out.with_name(out.name + ".state.json")):
        stale.unlink(missing_ok=True)
    args = ["calibrate", "--url", live.URL, "--api-key", live.KEY, "--model", model, "--data", DATA,
            "--seq-len", cfg["seq_len"], "--max-tokens", cfg["tokens"], "--batch-size", cfg["batch_size"],
            "--keep", cfg["keep"], "--out", out, "--in-flight", in_flight, "--no-plot"]
    if max_seconds is not None:
        args += ["--max-seconds", f"{max_seconds:.0f}"]
    t = time.time()
    proc = live.indexcache(*args, timeout=int(max_seconds or 3000) + 600)
    wall = round(time.time() - t, 1)
    (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    live.check(f"{tag}: calibrate --url exits 0", proc.returncode == 0, proc.stderr[-1500:])
    state_file = out.with_name(out.name + ".state.json")
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


CAPTURE_BENCH = """
import json, sys, time, torch
tokens, layers, topk, repeats = map(int, sys.argv[1:5])
# SGLang's BaseTopkCapturer (state_capturer/base.py), synchronous path: the forward's device slice
# [tokens, layers, topk] int32 copied to the host, then scattered into the pinned host cache.
cuda = torch.cuda.is_available()  # the CPU smoke test runs the same lines on the CPU
device = torch.zeros((tokens, layers, topk), dtype=torch.int32, device="cuda" if cuda else "cpu")
host = torch.zeros((tokens + 1024, layers, topk), dtype=torch.int32, pin_memory=cuda)
loc = torch.randperm(tokens + 1024, device=device.device)[:tokens]
times = []
for _ in range(repeats):
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    host[loc.cpu()] = device.cpu()
    times.append(time.perf_counter() - t)
print(json.dumps({"tokens": tokens, "layers": layers, "topk": topk, "gib": device.numel() * 4 / 2**30,
                  "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "times": times, "seconds": sorted(times)[len(times) // 2]}))
"""


def capture_cost(work: Path, tokens: int, layers: int, topk: int = 2048) -> dict:
    proc = live.run([sys.executable, "-c", CAPTURE_BENCH, tokens, layers, topk, PROBE_REPEATS], timeout=300)
    (work / "capture_bench.log").write_text(proc.stdout + proc.stderr)
    if not live.check("top-k capture cost measured", proc.returncode == 0, proc.stderr[-800:]):
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ phases --------------------------

def _server(work: Path, tag: str, model: Path, args) -> live.Server | None:
    server = live.Server(work, tag, model, [*CAL_ARGS, *args])
    if server.wait_healthy():
        return server
    server.stop()
    return None


def timing(work: Path, budget_s: float = ESTIMATE_S["timing"], cfg: dict = TIMING, start=None) -> dict:
    """The 78-layer stack: probes, a bounded prefix of the plain and the in-flight search, capture cost.

    ``start(work, tag, model, args)`` starts the server (default: the patched SGLang; the CPU smoke
    test passes a stand-in) and returns it, or None when it did not come up.
    """
    start, started = start or _server, time.time()
    work = work / "timing"
    work.mkdir(parents=True, exist_ok=True)
    result = {"setup": {k: cfg[k] for k in ("layers", "hidden", "keep", "seq_len", "tokens", "batch_size")}}
    result["setup"].update(config_only_checkpoint(work, "deep78", cfg["layers"], cfg["hidden"]))
    model = Path(result["setup"]["path"])
    server_args = ["--load-format", "dummy", *_forward_args(cfg["seq_len"] * cfg["batch_size"])]
    server = start(work, "deep78", model, server_args)
    log = work / "server_deep78.log"
    if server is None and not (model / "model.safetensors").is_file() and log.is_file() and \
            "IndexCache: error" in log.read_text(errors="replace"):
        add_indexer_tensors(work, model, result["setup"])  # the server refused what validate accepted
        server = start(work, "deep78", model, server_args)
    if server is None:
        return result
    try:
        result["setup"]["startup_s"] = round(time.time() - server.started, 1)
        result["probes"] = probes(cfg["seq_len"], cfg["batch_size"], cfg["layers"])
        # what is left, less the capture bench (~30 s) and two CLI start-ups (~15 s each), in halves
        left = budget_s - (time.time() - started) - 30 - 2 * 15
        each = max(cfg["min_run_s"], left / 2)
        result["runs"] = {"plain": search(work, "plain", model, cfg, 1, each),
                          "in_flight": search(work, "in_flight", model, cfg, cfg["in_flight"], each)}
    finally:
        server.stop()
    result["capture"] = capture_cost(work, cfg["seq_len"] * cfg["batch_size"], cfg["layers"])
    result.update(date=time.strftime("%Y-%m-%d %H:%M %Z"), device=result["capture"].get("device"),
                  command="python3 scripts/gpu_calibration_timing.py --phases timing --out $OUT")
    result["agree"] = same_candidates(result["runs"]["plain"], result["runs"]["in_flight"])
    live.check("timing: the in-flight run scored the plain run's candidates the same", result["agree"]["same"],
               result["agree"])
    result["phase_s"] = round(time.time() - started, 1)
    (work / "calibration_timing.json").write_text(json.dumps(result, indent=1))
    return result


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


def compare(work: Path, budget_s: float = ESTIMATE_S["compare"], cfg: dict = COMPARE, start=None,
            make_model=None) -> dict:
    """Plain against in-flight search on random-weight 8- and 16-layer checkpoints: the same flips?

    ``start`` as for :func:`timing`; ``make_model(work, name, layers, hidden)`` writes a checkpoint.
    """
    start, make_model, started = start or _server, make_model or random_checkpoint, time.time()
    work = work / "compare"
    work.mkdir(parents=True, exist_ok=True)
    result = {"setup": {k: cfg[k] for k in ("hidden", "keep", "seq_len", "tokens", "batch_size", "in_flight")},
              "models": {}}
    for layers in cfg["layers"]:
        if budget_s - (time.time() - started) < 100:
            live.check(f"compare {layers} layers: not started, the budget is spent", False, "run the phase again")
            continue
        model = make_model(work, f"cal{layers}", layers, cfg["hidden"])
        server = start(work, f"cal{layers}", model, _forward_args(cfg["seq_len"] * cfg["batch_size"]))
        if server is None:
            continue
        try:
            runs = {"plain": search(work, f"plain{layers}", model, cfg, 1, None),
                    "in_flight": search(work, f"in_flight{layers}", model, cfg, cfg["in_flight"], None)}
        finally:
            server.stop()
        result["models"][str(layers)] = {"runs": runs, **flips(runs["plain"], runs["in_flight"])}
        summary = {k: v for k, v in result["models"][str(layers)].items() if k != "runs"}
        live.check(f"compare {layers} layers: the in-flight search commits the plain search's flips",
                   summary["same_flips"], summary)
    result["phase_s"] = round(time.time() - started, 1)
    (work / "calibration_compare.json").write_text(json.dumps(result, indent=1))
    return result


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


PHASES = {"timing": timing, "compare": compare}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default="timing", help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--out", required=True, help="results folder ($OUT on the device machine)")
    parser.add_argument("--work", default="/tmp/ic-work", help="logs and JSON (kept between calls)")
    parser.add_argument("--budget", type=float, default=sum(ESTIMATE_S.values()),
                        help="seconds this call may take; each phase takes at most its ESTIMATE_S")
    args = parser.parse_args()
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not names or any(p not in PHASES for p in names):
        print(f"gpu_calibration_timing: error: --phases takes {', '.join(PHASES)}", file=sys.stderr)
        return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    live.RESULTS.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), phases=names)
    live.SELECTED["checkpoints"] = set()  # this script writes its own
    deadline = time.time() + args.budget
    try:
        live.setup(work)
        for name in names:
            left = deadline - time.time()
            live.RESULTS[name] = PHASES[name](work, min(left, ESTIMATE_S[name]))
            (out / f"calibration_{name}.json").write_text(json.dumps(live.RESULTS[name], indent=1))
    finally:
        live.pack(out, work, ["calibration", *names])
    failed = [c["name"] for c in live.RESULTS["checks"] if not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
