"""The live-server benchmark: warm-up, prefill TTFT per prompt length, concurrent decode (serve.py).

``run(spec, client)`` returns the ``indexcache-bench-serve/v2`` document; it never raises for a failed
request: each one is kept with its ``error`` and counted in ``lost``. v2 holds a list of decode runs
(``decode``: one entry per (batch, prompt length) setup); :func:`normalize` reads v1 documents
(one decode run or none) as v2. :func:`merge` joins the documents of several runs of one tag (the
parts of one server's measurement, each with its own ``first_offset``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from . import serve_log
from .serve import Client, PromptMaker, Sample, decode_stats, run_concurrent, summary

log = logging.getLogger(__name__)

FORMAT = "indexcache-bench-serve/v2"
LOG_SETTLE_S = 1.0  # after a decode run, for the scheduler's last lines to reach the log file
FORMAT_V1 = "indexcache-bench-serve/v1"
# server arguments worth keeping next to the numbers (from GET /server_info)
SERVER_KEYS = ("model_path", "version", "disable_radix_cache", "decode_log_interval", "chunked_prefill_size",
               "context_length", "cuda_graph_backend_decode", "cuda_graph_max_bs_decode", "cuda_graph_bs_decode",
               "json_model_override_args", "dsa_prefill_backend", "dsa_decode_backend", "kv_cache_dtype",
               "mem_fraction_static", "skip_tokenizer_init", "load_format", "index_cache")


@dataclass
class ServeSpec:
    tag: str
    lengths: list[int]
    prefill_repeats: int | list[int] = 2  # one count for every length, or one per length
    decodes: list[tuple[int, int]] = field(default_factory=lambda: [(8, 200_000)])  # (batch, prompt tokens)
    decode_tokens: int = 256
    warmup_length: int = 2048
    seed: int = 0
    vocab: int = 4000
    server_log: str | None = None
    pattern: str | None = None  # the pattern the server runs, recorded for the report's Amdahl bound
    first_offset: int = 0  # this run's prompts take first tokens [offset, offset + requests())

    def repeats(self) -> list[int]:
        if isinstance(self.prefill_repeats, int):
            return [self.prefill_repeats] * len(self.lengths)
        if len(self.prefill_repeats) != len(self.lengths):
            raise ValueError(f"{len(self.prefill_repeats)} repeat counts for {len(self.lengths)} lengths")
        return list(self.prefill_repeats)

    def requests(self) -> int:
        return 1 + sum(self.repeats()) + sum(batch for batch, _ in self.decodes)


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
    for length, repeats in zip(spec.lengths, spec.repeats()):
        samples = []
        for index in range(repeats):
            sample = _one(client, prompts, "prefill", length, index, 1)
            samples.append(sample)
            what = f"TTFT {sample.ttft:.3f} s" if sample.ok else f"LOST ({sample.error})"
            log.info("[%s] prefill %d tokens, run %d/%d: %s", spec.tag, length, index + 1, repeats, what)
        ttfts = [s.ttft for s in samples if s.ok]
        rows.append({"length": length, "ttft_s": summary(ttfts), "lost": sum(not s.ok for s in samples),
                     "samples": [s.to_json(origin) for s in samples]})
    return rows


def _decode(spec: ServeSpec, batch: int, length: int, client: Client, prompts: PromptMaker, origin: float,
            interval) -> dict:
    window = serve_log.LogWindow(spec.server_log) if spec.server_log else None
    if window:
        window.start()
    jobs = []
    for index in range(batch):
        sample = Sample(prompt_len=length, new_tokens=spec.decode_tokens, first_token=0)
        ids = prompts.make(f"decode{batch}x{length}", length, index)
        sample.first_token = ids[0]
        jobs.append((sample, ids))
    log.info("[%s] decode: %d concurrent requests of %d tokens, %d new tokens each", spec.tag, batch, length,
             spec.decode_tokens)
    t0 = time.perf_counter()
    samples = run_concurrent(client, jobs)
    wall = time.perf_counter() - t0
    stats = decode_stats(samples)
    server = concurrency = None
    if window:
        time.sleep(LOG_SETTLE_S)
        text = window.read()
        server, concurrency = serve_log.summarize(text, batch, interval), serve_log.concurrency(text)
    lost = sum(not s.ok for s in samples)
    log.info("[%s] decode %d x %d: client %s tok/s, server log %s tok/s (%s ms/step at %s running, %s steady"
             " lines), lost %d", spec.tag, batch, length, _fmt(stats["tok_s"]), _fmt(server and server["tok_s_median"]),
             _fmt(server and server["step_ms_median"]), server and server["running_reached"],
             server["steady_lines"] if server else "-", lost)
    if server is not None and server.get("note"):
        log.info("[%s] %s", spec.tag, server["note"])
    if server is not None and server["steady_lines"] < 3:
        log.warning("only %d steady decode lines in the server log: start the server with a smaller"
                    " --decode-log-interval (8) or pass more --decode-tokens", server["steady_lines"])
    return {"batch": batch, "length": length, "new_tokens": spec.decode_tokens, "wall_s": wall,
            "client": stats, "server_log": server, "concurrency": concurrency, "lost": lost,
            "samples": [s.to_json(origin) for s in samples]}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _all_samples(doc: dict) -> list[dict]:
    samples = list(doc["warmup"]["samples"])
    for row in doc["prefill"]:
        samples += row["samples"]
    for run_ in doc["decode"]:
        samples += run_["samples"]
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
    prompts = PromptMaker(spec.seed, spec.tag, spec.vocab, spec.requests(), start=spec.first_offset)
    origin = time.perf_counter()
    doc = {"format": FORMAT, "tag": spec.tag, "url": f"{client.scheme}://{client.host}:{client.port}",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device_name(), "server": _server_info(client),
           "settings": {"lengths": spec.lengths, "prefill_repeats": spec.repeats(),
                        "decodes": [list(d) for d in spec.decodes], "decode_tokens": spec.decode_tokens,
                        "warmup_length": spec.warmup_length, "seed": spec.seed, "vocab": spec.vocab,
                        "timeout_s": client.timeout_s, "server_log": bool(spec.server_log),
                        "pattern": spec.pattern, "first_offset": spec.first_offset},
           "warmup": {}, "prefill": [], "decode": []}
    warm = _one(client, prompts, "warmup", spec.warmup_length, 0, 4)
    log.info("[%s] warm-up (%d tokens): %s", spec.tag, spec.warmup_length,
             f"{warm.ttft:.3f} s" if warm.ok else f"LOST ({warm.error})")
    doc["warmup"] = {"samples": [warm.to_json(origin)]}
    doc["prefill"] = _prefill(spec, client, prompts, origin)
    doc["lost"] = _lost(doc)
    if on_update:
        on_update(doc)
    for batch, length in spec.decodes:
        doc["decode"].append(_decode(spec, batch, length, client, prompts, origin,
                                     doc["server"].get("decode_log_interval")))
        doc["lost"] = _lost(doc)
        if on_update:
            on_update(doc)
    return doc


def normalize(doc: dict) -> dict:
    """A v1 document (``decode``: one run or null, one ``prefill_repeats``) in the v2 layout.

    v1's server-log summary was taken at exactly the batch sent; its step time and spread are
    filled in from the recorded lines here (``running / tok/s``)."""
    if doc.get("format") != FORMAT_V1:
        return doc
    doc = dict(doc, format=FORMAT, settings=dict(doc["settings"]))
    old = doc.get("decode")
    doc["decode"] = [dict(old, server_log=_v1_server_log(old.get("server_log")))] if old else []
    settings = doc["settings"]
    settings["prefill_repeats"] = [settings["prefill_repeats"]] * len(settings["lengths"])
    settings["decodes"] = [[old["batch"], old["length"]]] if old else []
    return doc


def _v1_server_log(log_: dict | None) -> dict | None:
    if not log_ or log_.get("step_ms_median") is not None or not log_.get("tok_s_median"):
        return log_
    rates = sorted(log_.get("tok_s") or [])
    spread = (rates[min(len(rates) - 1, int(0.9 * len(rates)))] - rates[int(0.1 * len(rates))]) if rates else None
    return dict(log_, running_reached=log_["running"], running_asked=log_["running"],
                step_ms_median=1e3 * log_["running"] / log_["tok_s_median"],
                spread=None if spread is None else spread / log_["tok_s_median"])


def compact(doc: dict) -> dict:
    """The document without its per-request samples (what a report reads; ``merge`` still joins them)."""
    out = dict(doc, warmup={"samples": []}, compact=True)
    out["prefill"] = [{k: v for k, v in row.items() if k != "samples"} for row in doc["prefill"]]
    out["decode"] = [{k: v for k, v in run_.items() if k != "samples"} for run_ in doc["decode"]]
    return out


def merge(docs: list[dict]) -> dict:
    """One document from several runs of the same tag (prefill rows, decode runs and samples joined).

    Compact documents (no samples) merge when no prompt length appears in two of them; their lost
    counts add up."""
    docs = [normalize(d) for d in docs]
    tags = {d["tag"] for d in docs}
    if len(tags) != 1:
        raise ValueError(f"merge: documents of several tags {sorted(tags)}")
    out = dict(docs[0], settings=dict(docs[0]["settings"]), warmup={"samples": []}, prefill=[], decode=[])
    rows: dict[int, list[dict]] = {}
    for doc in docs:
        out["warmup"]["samples"] += doc["warmup"]["samples"]
        for row in doc["prefill"]:
            rows.setdefault(row["length"], []).append(row)
        out["decode"] += doc["decode"]
        if doc["settings"].get("pattern"):
            out["settings"]["pattern"] = doc["settings"]["pattern"]
    compacted = any(d.get("compact") for d in docs)
    for length in sorted(rows):
        if len(rows[length]) == 1:
            out["prefill"].append(rows[length][0])
            continue
        if compacted:
            raise ValueError(f"merge: length {length} appears in two compact documents")
        samples = [s for row in rows[length] for s in row["samples"]]
        ok = [s["ttft_s"] for s in samples if s["ok"]]
        out["prefill"].append({"length": length, "ttft_s": summary(ok), "lost": sum(not s["ok"] for s in samples),
                               "samples": samples})
    out["settings"]["lengths"] = [row["length"] for row in out["prefill"]]
    repeats = {length: n for d in docs for length, n in zip(d["settings"]["lengths"], d["settings"]["prefill_repeats"])}
    out["settings"]["prefill_repeats"] = [len(row["samples"]) if "samples" in row else repeats[row["length"]]
                                          for row in out["prefill"]]
    out["settings"]["decodes"] = [[d["batch"], d["length"]] for d in out["decode"]]
    out["parts"] = [d["date"] for d in docs]
    out["lost"] = _summed_lost(docs) if compacted else _lost(out)
    return out


def _summed_lost(docs: list[dict]) -> dict:
    lost = [d["lost"] for d in docs]
    return {"requests": sum(x["requests"] for x in lost), "lost": sum(x["lost"] for x in lost),
            "errors": sorted({e for x in lost for e in x.get("errors", [])}),
            "cached_hits": sum(x["cached_hits"] for x in lost)}
