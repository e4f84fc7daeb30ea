"""SGLang's own per-step decode timing, read from the server's log (no measurement here).

SGLang 0.5.17's scheduler (``srt/managers/scheduler_components/metrics_reporter.py``,
``report_decode_stats``) logs every ``--decode-log-interval`` decode steps (default 40)::

    [2026-12-02 10:11:12] Decode batch, #running-req: 8, #token: 1601024, token usage: 0.45, cuda graph: True, gen throughput (token/s): 311.52, #queue-req: 0

(``Decode batch [ITER]`` when ``SGLANG_LOG_FORWARD_ITERS`` is set; `` DP0``/`` TP0`` after the time
with several ranks). ``gen throughput`` is the tokens decoded since the previous decode line over the
wall time since it, so a line's window holds whatever ran in between: the first decode line after a
prefill (``Prefill batch, #new-seq: ...``) also counts that prefill's time, and the first line read at
all has a window that started before it. Only decode lines whose previous logged line is a decode line
with the same ``#running-req`` are steady-state; :func:`steady_decode_lines` keeps those.

SGLang may run fewer requests at once than were sent (0.5.17 with ``--max-running-requests 32`` ran
31): :func:`summarize` takes the steady state at the largest running count it actually reached and
says so (``running_asked`` / ``running_reached``). A line's step time is ``#running-req / gen
throughput``. :func:`startup` reads the start-up lines (weights, KV pool, ``max_total_num_tokens``)
and :func:`concurrency` how many requests ran at once, queued or were retracted.
"""

from __future__ import annotations

import re
import statistics

_DECODE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (?P<running>\d+), (?P<rest>.*)")
_PREFILL = re.compile(r"Prefill batch(?: \[\d+\])?, #new-seq: (?P<new>\d+)")
_RUNNING = re.compile(r"#running-req: (?P<running>\d+)")
_QUEUE = re.compile(r"#queue-req: (?P<queue>\d+)")
_RETRACT = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (?P<n>\d+)")
_THROUGHPUT = re.compile(r"gen throughput \(token/s\): (?P<tps>[0-9.]+)")
_GRAPH = re.compile(r"(?:cuda|cpu|npu|musa) graph: (?P<graph>True|False)")
_TIME = re.compile(r"^\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)")


def parse_lines(text: str) -> list[dict]:
    """The prefill and decode lines of an SGLang log, in order: ``{"kind", "running", "tok_s", ...}``."""
    events = []
    for line in text.splitlines():
        time = _TIME.match(line)
        stamp = time.group("time") if time else None
        prefill = _PREFILL.search(line)
        if prefill:
            running, queue = _RUNNING.search(line), _QUEUE.search(line)
            events.append({"kind": "prefill", "time": stamp, "new": int(prefill.group("new")),
                           "running": int(running.group("running")) if running else None,
                           "queue": int(queue.group("queue")) if queue else None})
            continue
        decode = _DECODE.search(line)
        if not decode:
            continue
        tps = _THROUGHPUT.search(decode.group("rest"))
        if not tps:
            continue
        graph, queue = _GRAPH.search(decode.group("rest")), _QUEUE.search(decode.group("rest"))
        events.append({"kind": "decode", "time": stamp, "running": int(decode.group("running")),
                       "tok_s": float(tps.group("tps")), "queue": int(queue.group("queue")) if queue else None,
                       "cuda_graph": None if graph is None else graph.group("graph") == "True"})
    return events


def steady_decode_lines(events: list[dict], running: int) -> list[dict]:
    """Decode lines with ``#running-req == running`` whose whole window was decode at that batch size."""
    kept, previous = [], None
    for event in events:
        if (event["kind"] == "decode" and event["running"] == running and previous is not None
                and previous["kind"] == "decode" and previous["running"] == running):
            kept.append(event)
        previous = event
    return kept


MIN_STEADY_LINES = 3  # a running count needs this many steady lines to count as reached (else: the most lines)


def reached_running(events: list[dict], asked: int | None = None) -> int | None:
    """The largest ``#running-req`` (at most ``asked``) with steady lines: the batch SGLang really ran.

    Prefers counts with at least :data:`MIN_STEADY_LINES` steady lines (a count seen for one line
    while requests were finishing is no steady state); ``None`` if no decode line is steady.
    """
    counts: dict[int, int] = {}
    for event in events:
        if event["kind"] == "decode":
            counts.setdefault(event["running"], 0)
    for running in counts:
        counts[running] = len(steady_decode_lines(events, running))
    eligible = {r: n for r, n in counts.items() if n and (asked is None or r <= asked)}
    if not eligible:
        return None
    full = [r for r, n in eligible.items() if n >= MIN_STEADY_LINES]
    return max(full) if full else max(eligible)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(text: str, running: int | None, log_interval: int | None = None) -> dict:
    """SGLang's steady-state decode in a log excerpt, at the running count it actually reached.

    ``running`` is the batch that was asked for (``None``: whatever ran most). Returns the median
    ``gen throughput`` (tok/s) of the steady lines at ``running_reached``, the step time
    (``running_reached / tok_s``) and the spread of the lines (``(p90 - p10) / median`` of tok/s).
    """
    events = parse_lines(text)
    reached = reached_running(events, running)
    kept = steady_decode_lines(events, reached) if reached is not None else []
    rates = [e["tok_s"] for e in kept]
    graphs = [e["cuda_graph"] for e in kept if e["cuda_graph"] is not None]
    median = statistics.median(rates) if rates else None
    out = {
        "decode_lines": sum(e["kind"] == "decode" for e in events),
        "prefill_lines": sum(e["kind"] == "prefill" for e in events),
        "steady_lines": len(kept),
        "running": reached,
        "running_asked": running,
        "running_reached": reached,
        "decode_log_interval": log_interval,
        "tok_s_median": median,
        "tok_s_min": min(rates) if rates else None,
        "tok_s_max": max(rates) if rates else None,
        "tok_s": rates,
        "step_ms_median": 1e3 * reached / median if median else None,
        "spread": (_quantile(rates, 0.9) - _quantile(rates, 0.1)) / median if median else None,
        "cuda_graph": (all(graphs) if graphs else None),
        "first_time": kept[0]["time"] if kept else None,
        "last_time": kept[-1]["time"] if kept else None,
    }
    if reached is not None and running is not None and reached < running:
        out["note"] = f"SGLang ran at most {reached} of the {running} requests at once"
    return out


def concurrency(text: str) -> dict:
    """How many requests decoded at once, the longest queue, and the retractions in a log excerpt.

    Retractions: 0.5.17's scheduler warns ``KV cache pool is full. Retract requests. #retracted_reqs:
    N, ...`` when running requests no longer fit (``scheduler.py``, after ``retract_decode``)."""
    events = parse_lines(text)
    decodes = [e for e in events if e["kind"] == "decode"]
    queues = [e["queue"] for e in events if e.get("queue") is not None]
    retracted = [int(m.group("n")) for m in _RETRACT.finditer(text)]
    return {"max_running": max((e["running"] for e in decodes), default=None),
            "max_queue": max(queues, default=None),
            "retractions": len(retracted), "retracted_requests": sum(retracted),
            "decode_lines": len(decodes), "prefill_lines": len(events) - len(decodes)}


_STARTUP = {  # key -> (pattern, converter); the last match wins (a post-capture resize logs again)
    "avail_before_load_gb": (r"Load weight begin\. avail mem=(?P<v>[0-9.]+) GB", float),
    "avail_after_load_gb": (r"Load weight end\..*?avail mem=(?P<v>[0-9.]+) GB", float),
    "weights_gb": (r"Load weight end\..*?mem usage=(?P<v>[0-9.]+) GB", float),
    "kv_dtype": (r"KV [Cc]ache (?:is )?allocated\. dtype: (?P<v>[\w.]+)", str),
    "kv_tokens": (r"KV [Cc]ache (?:is )?allocated\. dtype: [\w.]+, #tokens: (?P<v>\d+)", int),
    "kv_size_gb": (r"KV [Cc]ache (?:is )?allocated\..*?KV size: (?P<v>[0-9.]+) GB", float),
    "graph_capture_s": (r"Capture target decode CUDA graph end\. elapsed=(?P<v>[0-9.]+) s", float),
    "max_total_num_tokens": (r"max_total_num_tokens=(?P<v>\d+)", int),
    "chunked_prefill_size": (r"max_total_num_tokens=\d+, chunked_prefill_size=(?P<v>-?\d+)", int),
    "max_running_requests": (r"max_total_num_tokens=.*?max_running_requests=(?P<v>\d+)", int),
    "context_len": (r"max_total_num_tokens=.*?context_len=(?P<v>\d+)", int),
    "available_gpu_mem_gb": (r"max_total_num_tokens=.*?available_gpu_mem=(?P<v>[0-9.]+) GB", float),
    "mem_fraction_static": (r"ServerArgs\(.*?mem_fraction_static=(?P<v>[0-9.]+)", float),
    "index_cache": (r"IndexCache: pattern (?P<v>[^\n]*)", str),
}


def startup(text: str) -> dict:
    """What SGLang's start-up lines say about memory: weights, KV pool, ``max_total_num_tokens``.

    SGLang 0.5.17 logs ``Load weight begin/end`` (model_runner), ``KV Cache is allocated. dtype: ...,
    #tokens: N, KV size: X GB`` (``memory_pool._finalize_allocation_log``; again as ``Post-capture KV
    sizing: KV cache allocated`` when the pool is resized after the CUDA-graph capture) and, last,
    ``max_total_num_tokens=N, chunked_prefill_size=..., max_running_requests=..., context_len=...,
    available_gpu_mem=X GB`` (``scheduler.py``). GB are SGLang's (GiB: bytes / 2^30). Keys absent
    from the log are ``None``.
    """
    out = {}
    for key, (pattern, kind) in _STARTUP.items():
        matches = list(re.finditer(pattern, text))
        out[key] = kind(matches[-1].group("v")) if matches else None
    return out


class LogWindow:
    """The bytes a server appends to its log between :meth:`start` and :meth:`read`."""

    def __init__(self, path):
        self.path = path
        self.offset = 0

    def start(self) -> None:
        with open(self.path, "rb") as handle:
            self.offset = handle.seek(0, 2)

    def read(self) -> str:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read().decode("utf-8", "replace")
