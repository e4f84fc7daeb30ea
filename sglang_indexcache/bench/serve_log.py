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
"""

from __future__ import annotations

import re
import statistics

_DECODE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (?P<running>\d+), (?P<rest>.*)")
_PREFILL = re.compile(r"Prefill batch(?: \[\d+\])?, #new-seq: \d+")
_THROUGHPUT = re.compile(r"gen throughput \(token/s\): (?P<tps>[0-9.]+)")
_GRAPH = re.compile(r"(?:cuda|cpu|npu|musa) graph: (?P<graph>True|False)")
_TIME = re.compile(r"^\[(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)")


def parse_lines(text: str) -> list[dict]:
    """The prefill and decode lines of an SGLang log, in order: ``{"kind", "running", "tok_s", ...}``."""
    events = []
    for line in text.splitlines():
        time = _TIME.match(line)
        stamp = time.group("time") if time else None
        if _PREFILL.search(line):
            events.append({"kind": "prefill", "time": stamp})
            continue
        decode = _DECODE.search(line)
        if not decode:
            continue
        tps = _THROUGHPUT.search(decode.group("rest"))
        if not tps:
            continue
        graph = _GRAPH.search(decode.group("rest"))
        events.append({"kind": "decode", "time": stamp, "running": int(decode.group("running")),
                       "tok_s": float(tps.group("tps")),
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


def summarize(text: str, running: int, log_interval: int | None = None) -> dict:
    """Median of SGLang's steady-state ``gen throughput`` at ``running`` requests in a log excerpt."""
    events = parse_lines(text)
    kept = steady_decode_lines(events, running)
    rates = [e["tok_s"] for e in kept]
    graphs = [e["cuda_graph"] for e in kept if e["cuda_graph"] is not None]
    return {
        "decode_lines": sum(e["kind"] == "decode" for e in events),
        "prefill_lines": sum(e["kind"] == "prefill" for e in events),
        "steady_lines": len(kept),
        "running": running,
        "decode_log_interval": log_interval,
        "tok_s_median": statistics.median(rates) if rates else None,
        "tok_s_min": min(rates) if rates else None,
        "tok_s_max": max(rates) if rates else None,
        "tok_s": rates,
        "cuda_graph": (all(graphs) if graphs else None),
        "first_time": kept[0]["time"] if kept else None,
        "last_time": kept[-1]["time"] if kept else None,
    }


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
