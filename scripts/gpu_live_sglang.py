#!/usr/bin/env python3
"""The patched SGLang server live on one GPU host: every patched feature, and the paper's table.

Runs on an air-gapped GPU host with the offline bundle of ``indexcache gpu-bundle`` (docs/gpu.md)
carried in ``.gpu/bundle/`` of this checkout. One command per call, phases chosen with ``--phases``
(each phase records PASS/FAIL checks and writes everything it measured under ``--out``):

- ``setup``: install the bundle into /tmp/ic-site, lay out this package as installed (/tmp/ic-ours),
  copy SGLang and apply the patch series to the copy (/tmp/ic-patched), write the checkpoints
  (``indexcache make-checkpoint``, random bf16 weights) and the calibration data. Skipped parts
  that are already there (the host keeps /tmp between calls while it stays warm).
- ``checks``: each bad flag and the F-without-weights checkpoint stop the launcher with one line and
  exit 2; a calibration server: admin key required, ``/index_cache``, ``/server_info`` entry, gauge,
  pattern switches every second under 16 concurrent clients (none lost, every reply well-formed),
  an invalid pattern refused, ``/index_cache/overlap`` (shape, range, 1.0 on F layers), and
  ``indexcache calibrate --url`` writing a pattern file that validates against the checkpoint.
- ``bench``: servers for the paper's table, each measured by
  ``indexcache bench serve`` (TTFT at 32K-200K, batch 1; 8 concurrent 200K decodes, CUDA graphs on):
  stock all-F, stock with ``index_topk_pattern`` FSSSFSSS, patched without flags, patched
  ``--index-cache-every 4`` on a checkpoint whose config.json carries another pattern (the flag must
  win), and the calibrated pattern file through ``indexcache serve``; then ``bench serve-report``.

  python3 scripts/gpu_live_sglang.py --phases setup,checks --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE, OURS, PATCHED, CK = Path("/tmp/ic-site"), Path("/tmp/ic-ours"), Path("/tmp/ic-patched"), Path("/tmp/ic-ck")
PORT = 30000
URL = f"http://127.0.0.1:{PORT}"
KEY = "live-admin-key"
LAYERS = 8
# SGLang 0.5.17 on sm_90 without FA3 (docs/gpu.md): FlashMLA sparse for both phases, no dense prefill path.
DSA_ARGS = ["--dtype", "bfloat16", "--kv-cache-dtype", "bfloat16", "--dsa-prefill-backend", "flashmla_sparse",
            "--dsa-decode-backend", "flashmla_sparse", "--sampling-backend", "pytorch",
            "--host", "127.0.0.1", "--port", str(PORT)]
BENCH_ARGS = ["--context-length", "202752", "--mem-fraction-static", "0.8", "--chunked-prefill-size", "16384",
              "--disable-radix-cache", "--decode-log-interval", "8", "--cuda-graph-backend-prefill", "disabled",
              "--cuda-graph-max-bs-decode", "16", "--max-running-requests", "16", "--skip-tokenizer-init"]
RESULTS: dict = {"checks": [], "servers": {}}
DEADLINE = {"at": float("inf")}
PACK: dict = {}  # the packing function of this call, run after each bench server
SELECTED: dict = {"checkpoints": set()}  # which CHECKPOINTS setup writes (--checkpoints)
CALIBRATED_KEPT = REPO / "docs" / "results" / "live-h200-2026-12-02" / "calibrated.json"  # from `checks`  # stop starting servers this close to the call's limit


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def check(name: str, ok: bool, detail="") -> bool:
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {str(detail)[:300]}" if detail and not ok else ""))
    return bool(ok)


def env(tree: str) -> dict:
    """Environment of a host process: stock (the bundle) or patched SGLang (its copy, then our package)."""
    path = [str(PATCHED), str(OURS), str(SITE)] if tree == "patched" else [str(SITE), str(OURS)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", SGLANG_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD="0",
                TOKENIZERS_PARALLELISM="false")


def run(cmd, tree="patched", timeout=600, **kw) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the checkout's own
    # sglang_indexcache/ lacks the kernels/ and calibration/ that the laid-out package maps in
    return subprocess.run([str(c) for c in cmd], env=env(tree), capture_output=True, text=True, timeout=timeout,
                          cwd=str(OURS), **kw)


def indexcache(*args, tree="patched", timeout=900):
    return run([sys.executable, "-m", "sglang_indexcache", *args], tree=tree, timeout=timeout)


# ------------------------------------------------------------------ HTTP ----------------------------

def http(method: str, path: str, body=None, key: str | None = None, timeout: float = 600):
    """(status, parsed JSON or text) of one request; never raises for HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            raw, status = reply.read(), reply.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _gauge() -> list[str]:
    """The ``sglang:index_cache_kept_indexers`` lines of ``/metrics``."""
    _, metrics = http("GET", "/metrics")
    return [line for line in str(metrics).splitlines() if line.startswith("sglang:index_cache_kept_indexers")]


class Server:
    """One SGLang server in its own process session (killed as a group), logging to WORK/server_TAG.log."""

    def __init__(self, work: Path, tag: str, model: Path, args, tree="patched", via_serve=None):
        self.tag, self.log_path = tag, work / f"server_{tag}.log"
        if via_serve:  # indexcache serve --model M --pattern-file F -- ARGS
            cmd = [sys.executable, "-m", "sglang_indexcache", "serve", "--model", model, "--pattern-file", via_serve,
                   "--", *DSA_ARGS, *args]
        else:
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, *DSA_ARGS, *args]
        self.cmd = [str(c) for c in cmd]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env(tree),
                                     start_new_session=True, cwd=str(OURS))
        self.started = time.time()

    def wait_healthy(self, timeout: float = 420) -> bool:
        while time.time() - self.started < timeout:
            if self.proc.poll() is not None:
                break
            if http("GET", "/health", timeout=5)[0] == 200:
                RESULTS["servers"].setdefault(self.tag, {})["startup_s"] = round(time.time() - self.started, 1)
                log(f"server {self.tag} healthy after {time.time() - self.started:.0f} s")
                return True
            time.sleep(1)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        check(f"{self.tag}: server starts", False, tail)
        return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        for _ in range(30):  # the port and the GPU memory are free again
            if http("GET", "/health", timeout=2)[0] == 0:
                break
            time.sleep(1)


# ------------------------------------------------------------------ setup ---------------------------

def setup(work: Path) -> None:
    bundle = REPO / ".gpu" / "bundle"
    if not (SITE / ".installed").is_file():
        t = time.time()
        proc = subprocess.run([sys.executable, str(bundle / "install.py"), "--target", str(SITE)],
                              capture_output=True, text=True, timeout=600)
        (work / "install.log").write_text(proc.stdout + proc.stderr)
        if not check("bundle installs (checksums, pip --no-index)", proc.returncode == 0, proc.stderr[-2000:]):
            raise SystemExit(1)
        (SITE / ".installed").write_text("ok")
        log(f"bundle installed in {time.time() - t:.0f} s")
    _lay_out_package()
    if not (PATCHED / ".patched").is_file():
        import shutil

        shutil.rmtree(PATCHED, ignore_errors=True)
        PATCHED.mkdir(parents=True)
        shutil.copytree(SITE / "sglang", PATCHED / "sglang")
        applied = run([sys.executable, "-m", "sglang_indexcache.sglang_overlay.patchset", "apply", PATCHED])
        again = run([sys.executable, "-m", "sglang_indexcache.sglang_overlay.patchset", "apply", PATCHED])
        check("patch series applies to the bundle's SGLang 0.5.17", applied.returncode == 0,
              applied.stdout + applied.stderr)
        check("second apply says already applied", "already applied" in again.stdout, again.stdout + again.stderr)
        if applied.returncode != 0:
            raise SystemExit(1)
        (PATCHED / ".patched").write_text(applied.stdout)
    smoke = run([sys.executable, "-c", "import sglang, sgl_kernel, deep_gemm, flashinfer, transformers;"
                 " print(sglang.__version__, transformers.__version__)"])
    check("SGLang stack imports on the host", smoke.returncode == 0, smoke.stdout + smoke.stderr[-1500:])
    _checkpoints(work)


def _lay_out_package() -> None:
    """This checkout as the installed package (pyproject maps kernels/, calibration/ and, under data/,
    patches/, models/ and requirements/ into it)."""
    package = OURS / "sglang_indexcache"
    if (package / "data").is_dir():
        return
    package.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "sglang_indexcache").iterdir():
        if not (package / entry.name).is_symlink():
            (package / entry.name).symlink_to(entry)
    for name in ("kernels", "calibration"):
        if not (package / name).is_symlink():
            (package / name).symlink_to(REPO / name)
    (package / "data").mkdir()
    for name in ("patches", "models", "requirements"):
        (package / "data" / name).symlink_to(REPO / name)


# name -> make-checkpoint arguments; random weights from one seed, so the flavours share their weights
CHECKPOINTS = {
    "plain": ["--hidden", "2048", "--layers", str(LAYERS), "--flavour", "plain"],
    "own": ["--hidden", "2048", "--layers", str(LAYERS), "--flavour", "own-pattern", "--pattern", "FSFSFSFS"],
    "glm52": ["--hidden", "2048", "--layers", str(LAYERS), "--flavour", "glm52", "--pattern", "FSSSFSSS"],
    "glm5": ["--hidden", "6144", "--layers", "4", "--flavour", "plain"],
}


def _checkpoints(work: Path) -> None:
    for name, args in CHECKPOINTS.items():
        if name not in SELECTED["checkpoints"]:
            continue
        path = CK / name
        if (path / "config.json").is_file():
            continue
        t = time.time()
        proc = indexcache("make-checkpoint", path, *args, "--weights", "random", "--device", "cuda")
        (work / f"make_checkpoint_{name}.log").write_text(proc.stdout + proc.stderr)
        check(f"checkpoint {name} written ({' '.join(args)})", proc.returncode == 0, proc.stderr[-1500:])
        log(f"checkpoint {name}: {time.time() - t:.0f} s")
        valid = indexcache("validate", "F" * int(args[3]), "--model", path)
        check(f"checkpoint {name}: indexcache validate all-F", (valid.returncode == 0) == (name != "glm52"),
              valid.stdout + valid.stderr)


# ------------------------------------------------------------------ checks --------------------------

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


def bad_flags(work: Path) -> None:
    glm5_file = work / "glm5-all-f.json"  # a valid pattern file, made for another model
    proc = run([sys.executable, "-c", "import sys; from sglang_indexcache import pattern_file;"
                " from sglang_indexcache.model_info import load_model_info;"
                " pattern_file.write(sys.argv[2], pattern_file.make_document('FFFF', load_model_info(sys.argv[1])))",
                CK / "glm5", glm5_file])
    check("pattern file for the 6144 checkpoint written", proc.returncode == 0, proc.stderr[-800:])
    procs = []
    for name, ckpt, flags, _ in BAD_FLAGS:
        flags = [str(glm5_file) if f == "@glm5-file" else f for f in flags]
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(CK / ckpt), *DSA_ARGS, *flags]
        procs.append(subprocess.Popen(cmd, env=env("patched"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True, cwd=str(OURS)))
    rows = []
    for (name, _, _, expected), proc in zip(BAD_FLAGS, procs):
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        lines = [line for line in err.splitlines() if line.startswith("IndexCache: error:")]
        ok = proc.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err
        rows.append({"case": name, "exit": proc.returncode, "line": lines[0] if lines else err.strip()[-300:]})
        check(f"bad flag {name}: one line, exit 2", ok, f"exit {proc.returncode}: {err[-600:]}")
    (work / "bad_flags.json").write_text(json.dumps(rows, indent=1))


def _generate_ids(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1, 4000) for _ in range(length)]


def switch_under_load(work: Path, seconds: float = 25.0, clients: int = 16) -> None:
    patterns = ["FSSSFSSS", "FFFFFFFF", "FSSSSSSS", "FSFSFSFS", "FFSSFFSS"]
    stop, lock = threading.Event(), threading.Lock()
    replies, switches = [], []

    def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            rng = random.Random(1_000_003 * index + n)  # every prompt its own: no shared prefix
            ids = _generate_ids(rng, rng.randrange(256, 2048))
            t = time.time()
            status, body = http("POST", "/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 32, "temperature": 0.0, "ignore_eos": True}}, timeout=300)
            meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
            good = status == 200 and meta.get("completion_tokens") == 32 and meta.get("prompt_tokens") == len(ids)
            with lock:
                replies.append({"client": index, "status": status, "ok": good, "s": round(time.time() - t, 3),
                                "tokens": meta.get("completion_tokens"), "error": None if good else str(body)[:200]})
            n += 1

    def switcher() -> None:
        i = 0
        while not stop.is_set():
            t = time.time()
            status, body = http("POST", "/index_cache/pattern", {"pattern": patterns[i % len(patterns)]}, key=KEY)
            with lock:
                switches.append({"asked": patterns[i % len(patterns)], "status": status, "s": round(time.time() - t, 3),
                                 "now": body.get("pattern") if isinstance(body, dict) else str(body)[:200]})
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
    (work / "switch_under_load.json").write_text(json.dumps({"replies": replies, "switches": switches}, indent=1))
    RESULTS["switch_under_load"] = {"requests": len(replies), "lost": len(lost), "switches": len(switches),
                                    "switches_ok": sum(s["status"] == 200 and s["now"] == s["asked"] for s in switches),
                                    "clients": clients, "seconds": seconds}
    check(f"switch every second under {clients} clients: every request completes", replies and not lost,
          lost[:3])
    check("every switch answered 200 with the asked pattern",
          switches and all(s["status"] == 200 and s["now"] == s["asked"] for s in switches), switches[:5])


def calibration_checks(work: Path) -> None:
    server = Server(work, "calibration", CK / "plain",
                    # --enable-return-indexer-topk for /index_cache/overlap; --max-total-tokens: that capture
                    # keeps a pinned host buffer of (KV tokens x layers x top-k) int32, 64 KiB per token here
                    ["--index-cache-calibration", "--enable-return-indexer-topk", "--admin-api-key", KEY,
                     "--enable-metrics",
                     "--context-length", "32768", "--max-total-tokens", "65536", "--mem-fraction-static", "0.6"])
    try:
        if not server.wait_healthy():
            return
        logtext = server.log_text()
        check("calibration: start-up line", "IndexCache: pattern FFFFFFFF (8/8 indexers kept, 0 shared)" in logtext)
        check("calibration: CUDA graphs and radix cache off, logged", "IndexCache calibration mode" in logtext)
        status, _ = http("GET", "/index_cache")
        check("endpoints need the admin key (401 without)", status == 401, status)
        status, state = http("GET", "/index_cache", key=KEY)
        check("GET /index_cache", status == 200 and state.get("pattern") == "F" * LAYERS and state.get("calibration"),
              state)
        status, info = http("GET", "/server_info")
        entry = info.get("index_cache") if isinstance(info, dict) else None
        check("/server_info has index_cache", bool(entry) and entry.get("kept_indexers") == LAYERS, entry)
        gauge = _gauge()
        check("gauge sglang:index_cache_kept_indexers", bool(gauge) and gauge[0].rstrip().endswith(f"{LAYERS}.0"),
              gauge)
        status, body = http("POST", "/index_cache/pattern", {"pattern": "FSSSFSSS"}, key=KEY)
        check("POST /index_cache/pattern switches (idle)", status == 200 and body.get("pattern") == "FSSSFSSS", body)
        status, body = http("POST", "/index_cache/pattern", {"pattern": "SFFFFFFF"}, key=KEY)
        _, state = http("GET", "/index_cache", key=KEY)
        check("invalid pattern refused (400), state unchanged", status == 400 and state.get("pattern") == "FSSSFSSS",
              [status, body, state.get("pattern")])
        gauge = _gauge()
        check("gauge follows the switch (2 kept)", bool(gauge) and gauge[0].rstrip().endswith("2.0"), gauge)
        overlap(work)
        calibrate(work)
        switch_under_load(work)
        logtext = server.log_text()
        switched = [line for line in logtext.splitlines() if "IndexCache: switched to pattern" in line]
        retracted = [line for line in switched if "retracted" in line]
        RESULTS["switch_under_load"].update(logged=len(switched), retracted=len(retracted))
        check("switches under load logged by the scheduler, running requests retracted and recomputed",
              len(switched) >= RESULTS["switch_under_load"]["switches"] and retracted, len(switched))
        check("calibration server still healthy after the switches", http("GET", "/health", timeout=10)[0] == 200)
    finally:
        server.stop()


def overlap(work: Path) -> None:
    # ~3000 tokens of the embedded model's held-out text: beyond top-k 2048, so selections are real
    text = (REPO / "models" / "tiny-glm-dsa" / "data" / "evaluation.txt").read_text()[:12000]
    status, body = http("POST", "/index_cache/overlap", {"text": [text]}, key=KEY, timeout=900)
    (work / "overlap.json").write_text(json.dumps([status, body], indent=1))
    ok = status == 200 and isinstance(body, dict) and len(body.get("layers", [])) == LAYERS
    rows = body.get("layers", []) if ok else []
    full_ok = all(r["recall"] == 1.0 for r in rows if not r["shared"])
    range_ok = all(r["recall"] is not None and 0.0 <= r["recall"] <= 1.0 for r in rows)
    RESULTS["overlap"] = {"tokens": body.get("tokens") if ok else None, "mean_recall": body.get("mean_recall") if ok else None}
    check("overlap: one row per layer, recall in [0, 1], 1.0 where source == layer",
          ok and full_ok and range_ok and body.get("pattern") == "FSSSFSSS", [status, str(body)[:400]])
    _, state = http("GET", "/index_cache", key=KEY)
    check("overlap restores the pattern", state.get("pattern") == "FSSSFSSS", state.get("pattern"))


def calibrate(work: Path) -> None:
    out = work / "calibrated.json"
    t = time.time()
    proc = indexcache("calibrate", "--url", URL, "--api-key", KEY, "--model", CK / "plain",
                      "--data", REPO / "models" / "tiny-glm-dsa" / "data" / "calibration.txt",
                      "--seq-len", "4096", "--max-tokens", "16384", "--keep", "0.125", "--out", out)
    (work / "calibrate.log").write_text(proc.stdout + proc.stderr)
    RESULTS["calibrate_url_s"] = round(time.time() - t, 1)
    check("indexcache calibrate --url against the live server", proc.returncode == 0 and out.is_file(),
          proc.stderr[-1500:])
    if out.is_file():
        valid = indexcache("validate", out, "--model", CK / "plain")
        check("the calibrated pattern file validates against the checkpoint", valid.returncode == 0,
              valid.stdout + valid.stderr)
        RESULTS["calibrated"] = json.loads(out.read_text())["pattern"]


# ------------------------------------------------------------------ bench ---------------------------

def bench_server(work: Path, tag: str, model: Path, args, tree: str, via_serve=None, extra_checks=None,
                 decode: bool = True) -> None:
    if (work / f"bench_{tag}.done").is_file():  # measured in an earlier call on this machine
        log(f"{tag}: measured already")
        return
    left = DEADLINE["at"] - time.time()
    if left < 100:
        check(f"{tag}: not started, {left:.0f} s left in this call", False, "run this phase again")
        return
    server = Server(work, tag, model, [*BENCH_ARGS, *args], tree=tree, via_serve=via_serve)
    try:
        if not server.wait_healthy():
            return
        if extra_checks:
            extra_checks(server)
        t = time.time()
        proc = indexcache("bench", "serve", "--url", URL, "--tag", tag, "--lengths", "32k,64k,128k,200000",
                          "--prefill-repeats", "2", "--decode-batch", "8" if decode else "0", "--decode-length", "200000",
                          "--decode-tokens", "256", "--server-log", server.log_path, "--out", work / "bench",
                          tree=tree, timeout=900)
        (work / f"bench_{tag}.log").write_text(proc.stdout + proc.stderr)
        RESULTS["servers"].setdefault(tag, {})["bench_s"] = round(time.time() - t, 1)
        if check(f"{tag}: bench serve", proc.returncode == 0, proc.stderr[-1500:]):
            (work / f"bench_{tag}.done").write_text("ok")
    finally:
        server.stop()
        if PACK.get("fn"):
            PACK["fn"]()


def _observability(expected: str, source: str):
    def checks(server: Server) -> None:
        logtext = server.log_text()
        kept = expected.count("F")
        check(f"start-up line names {expected} from {source}",
              f"IndexCache: pattern {expected} ({kept}/{LAYERS} indexers kept" in logtext and source in logtext)
        _, info = http("GET", "/server_info")
        entry = info.get("index_cache") if isinstance(info, dict) else None
        check(f"/server_info index_cache = {expected}", bool(entry) and entry.get("pattern") == expected, entry)
        gauge = _gauge()
        check(f"gauge = {kept}", bool(gauge) and gauge[0].rstrip().endswith(f"{kept}.0"), gauge)
    return checks


def _no_index_cache(server: Server) -> None:
    _, info = http("GET", "/server_info")
    check("patched without flags: no IndexCache log line, no server_info entry",
          "IndexCache" not in server.log_text() and isinstance(info, dict) and "index_cache" not in info)


def _flag_wins(server: Server) -> None:
    check("the flag overrides the checkpoint's own index_topk_pattern, logged",
          "overrode the checkpoint's index_topk_pattern (FSFSFSFS) with FSSSFSSS" in server.log_text())
    _observability("FSSSFSSS", "--index-cache-every 4")(server)


def bench(work: Path) -> None:
    """The table's servers, most needed first (the call's deadline skips the rest)."""
    calibrated = work / "calibrated.json"
    if not calibrated.is_file() and CALIBRATED_KEPT.is_file():  # made by `checks` in an earlier call
        calibrated.write_text(CALIBRATED_KEPT.read_text())
    bench_server(work, "stock-all-F", CK / "plain", [], "stock")
    bench_server(work, "patched-every-4", CK / "own", ["--index-cache-every", "4", "--enable-metrics"], "patched",
                 extra_checks=_flag_wins)
    bench_server(work, "stock-FSSSFSSS", CK / "plain",
                 ["--json-model-override-args", json.dumps({"index_topk_pattern": "FSSSFSSS"})], "stock")
    if calibrated.is_file():
        pattern = json.loads(calibrated.read_text())["pattern"]
        bench_server(work, f"patched-calibrated-{pattern}", CK / "plain", ["--enable-metrics"], "patched",
                     via_serve=calibrated, extra_checks=_observability(pattern, "--index-cache-pattern-file"))
    else:
        check("calibrated pattern file from the checks phase", False, "run --phases checks first")
    bench_server(work, "patched-no-flags", CK / "plain", [], "patched", extra_checks=_no_index_cache, decode=False)


def report(work: Path) -> None:
    bench = work / "bench"
    if not bench.is_dir() or not list(bench.glob("serve_*.json")):
        return
    proc = indexcache("bench", "serve-report", bench, "--baseline", "stock-all-F", "--out", work / "table.md",
                      "--plot", work / "ttft.png", tree="patched")
    check("bench serve-report", proc.returncode == 0, proc.stderr[-800:])


# ------------------------------------------------------------------ main ----------------------------

PHASES = {"setup": setup, "checks": lambda w: (bad_flags(w), calibration_checks(w)),
          "bench": bench, "report": report}


def pack(out: Path, work: Path, phase_names) -> None:
    """Everything under WORK into one archive (the device returns at most 8 files), plus the summary."""
    name = "_".join(p.replace("-", "") for p in phase_names)
    (out / f"summary_{name}.json").write_text(json.dumps(RESULTS, indent=1))
    with tarfile.open(out / f"live_{name}.tar.gz", "w:gz") as archive:
        archive.add(work, arcname="live")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default="setup,checks", help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--out", required=True, help="results folder ($OUT on the device machine)")
    parser.add_argument("--work", default="/tmp/ic-work", help="logs and JSON (kept between calls)")
    parser.add_argument("--checkpoints", default=",".join(CHECKPOINTS),
                        help=f"which checkpoints setup writes, of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--budget", type=float, default=560, help="seconds this call may take (servers are not"
                        " started when less than 100 s are left)")
    args = parser.parse_args()
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        print(f"gpu_live_sglang: error: unknown phase {unknown[0]!r}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), phases=names)
    DEADLINE["at"] = time.time() + args.budget
    SELECTED["checkpoints"] = {c.strip() for c in args.checkpoints.split(",") if c.strip()}
    PACK["fn"] = lambda: pack(out, work, names)
    try:
        for name in names:
            t = time.time()
            log(f"phase {name}")
            PHASES[name](work)
            RESULTS.setdefault("phase_s", {})[name] = round(time.time() - t, 1)
            pack(out, work, names)
    finally:
        pack(out, work, names)
        failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
        log(f"{len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
