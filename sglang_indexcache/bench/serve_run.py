"""The live-server benchmark: warm-up, prefill TTFT per prompt length, concurrent decode (serve.py).

``run(spec, client)`` returns the ``indexcache-bench-serve/v1`` document; it never raises for a failed
request: each one is kept with its ``error`` and counted in ``lost``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

from . import serve_log
from .serve import Client, PromptMaker, Sample, decode_stats, run_concurrent, summary

log = logging.getLogger(__name__)

FORMAT = "indexcache-bench-serve/v1"
# server arguments worth keeping next to the numbers (from GET /server_info)
SERVER_KEYS = ("model_path", "version", "disable_radix_cache", "decode_log_interval", "chunked_prefill_size",
               "context_length", "cuda_graph_backend_decode", "cuda_graph_max_bs_decode", "cuda_graph_bs_decode",
               "json_model_override_args", "dsa_prefill_backend", "dsa_decode_backend", "kv_cache_dtype",
               "mem_fraction_static", "skip_tokenizer_init", "index_cache")


@dataclass
class ServeSpec:
    tag: str
    lengths: list[int]
    prefill_repeats: int = 2
    decode_batch: int = 8
    decode_length: int = 200_000
    decode_tokens: int = 256
    warmup_length: int = 2048
    seed: int = 0
    vocab: int = 4000
    server_log: str | None = None


def device_name() -> str | None:
    """The GPU's name from nvidia-smi on this host (the client runs next to the server), else None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if names else None


def _server_info(client: Client) -> dict:
    try:
        info = client.get_json("/server_info")
    except Exception as exc:  # noqa: BLE001 - provenance only; a server without it still benchmarks
        return {"error": str(exc)}
    if not isinstance(info, dict):
        return {"error": f"unexpected answer {str(info)[:100]}"}
    return {k: info[k] for k in SERVER_KEYS if k in info}


def _one(client: Client, prompts: PromptMaker, phase: str, length: int, index: int, new: int) -> Sample:
    sample = Sample(prompt_len=length, new_tokens=new, first_token=0)
    ids = prompts.make(phase, length, index)
    sample.first_token = ids[0]
    return client.generate(sample, ids)


def _prefill(spec: ServeSpec, client: Client, prompts: PromptMaker, origin: float) -> list[dict]:
    rows = []
    for length in spec.lengths:
        samples = []
        for index in range(spec.prefill_repeats):
            sample = _one(client, prompts, "prefill", length, index, 1)
            samples.append(sample)
            what = f"TTFT {sample.ttft:.3f} s" if sample.ok else f"LOST ({sample.error})"
            log.info("[%s] prefill %d tokens, run %d/%d: %s", spec.tag, length, index + 1,
                     spec.prefill_repeats, what)
        ttfts = [s.ttft for s in samples if s.ok]
        rows.append({"length": length, "ttft_s": summary(ttfts), "lost": sum(not s.ok for s in samples),
                     "samples": [s.to_json(origin) for s in samples]})
    return rows


def _decode(spec: ServeSpec, client: Client, prompts: PromptMaker, origin: float, interval) -> dict:
    window = serve_log.LogWindow(spec.server_log) if spec.server_log else None
    if window:
        window.start()
    jobs = []
    for index in range(spec.decode_batch):
        sample = Sample(prompt_len=spec.decode_length, new_tokens=spec.decode_tokens, first_token=0)
        ids = prompts.make("decode", spec.decode_length, index)
        sample.first_token = ids[0]
        jobs.append((sample, ids))
    log.info("[%s] decode: %d concurrent requests of %d tokens, %d new tokens each", spec.tag,
             spec.decode_batch, spec.decode_length, spec.decode_tokens)
    samples = run_concurrent(client, jobs)
    stats = decode_stats(samples)
    server = None
    if window:
        time.sleep(1.0)  # let the scheduler's last lines reach the file
        server = serve_log.summarize(window.read(), spec.decode_batch, interval)
    lost = sum(not s.ok for s in samples)
    log.info("[%s] decode: client %s tok/s, server log %s tok/s (%s steady lines), lost %d", spec.tag,
             _fmt(stats["tok_s"]), _fmt(server and server["tok_s_median"]),
             server["steady_lines"] if server else "-", lost)
    if server is not None and server["steady_lines"] < 3:
        log.warning("only %d steady decode lines in the server log: start the server with a smaller"
                    " --decode-log-interval (8) or pass more --decode-tokens", server["steady_lines"])
    return {"batch": spec.decode_batch, "length": spec.decode_length, "new_tokens": spec.decode_tokens,
            "client": stats, "server_log": server, "lost": lost,
            "samples": [s.to_json(origin) for s in samples]}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _all_samples(doc: dict) -> list[dict]:
    samples = list(doc["warmup"]["samples"])
    for row in doc["prefill"]:
        samples += row["samples"]
    if doc.get("decode"):
        samples += doc["decode"]["samples"]
    return samples


def _lost(doc: dict) -> dict:
    samples = _all_samples(doc)
    bad = [s for s in samples if not s["ok"]]
    cached = [s for s in samples if s["ok"] and s["cached_tokens"]]
    firsts = [s["first_token"] for s in samples]
    if len(set(firsts)) != len(firsts):
        raise AssertionError("two requests of this run began with the same token")
    return {"requests": len(samples), "lost": len(bad), "errors": sorted({s["error"] for s in bad}),
            "cached_hits": len(cached)}


def run(spec: ServeSpec, client: Client, on_update=None) -> dict:
    """Measure the server behind ``client``; ``on_update(doc)`` after each phase (e.g. to save it)."""
    capacity = 1 + len(spec.lengths) * spec.prefill_repeats + spec.decode_batch
    prompts = PromptMaker(spec.seed, spec.tag, spec.vocab, capacity)
    origin = time.perf_counter()
    doc = {"format": FORMAT, "tag": spec.tag, "url": f"{client.scheme}://{client.host}:{client.port}",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device_name(), "server": _server_info(client),
           "settings": {"lengths": spec.lengths, "prefill_repeats": spec.prefill_repeats,
                        "decode_batch": spec.decode_batch, "decode_length": spec.decode_length,
                        "decode_tokens": spec.decode_tokens, "warmup_length": spec.warmup_length,
                        "seed": spec.seed, "vocab": spec.vocab, "timeout_s": client.timeout_s,
                        "server_log": bool(spec.server_log)},
           "warmup": {}, "prefill": [], "decode": None}
    warm = _one(client, prompts, "warmup", spec.warmup_length, 0, 4)
    log.info("[%s] warm-up (%d tokens): %s", spec.tag, spec.warmup_length,
             f"{warm.ttft:.3f} s" if warm.ok else f"LOST ({warm.error})")
    doc["warmup"] = {"samples": [warm.to_json(origin)]}
    doc["prefill"] = _prefill(spec, client, prompts, origin)
    doc["lost"] = _lost(doc)
    if on_update:
        on_update(doc)
    if spec.decode_batch > 0:
        doc["decode"] = _decode(spec, client, prompts, origin, doc["server"].get("decode_log_interval"))
    doc["lost"] = _lost(doc)
    if on_update:
        on_update(doc)
    return doc
