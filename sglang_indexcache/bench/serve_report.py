"""Merge several ``indexcache bench serve`` documents (one per tag) into one Markdown table and a plot.

Rows are prompt lengths, columns are tags; each cell is the TTFT and its speedup over the named
baseline (baseline TTFT / tag TTFT). One decode table per setup (batch x prompt length): SGLang's own
tok/s and step time at the running count it reached, the spread of its lines, the client's
steady-state window, with speedup tag / baseline; then the per-indexer step cost and Amdahl bound,
and host-bound warnings (serve_analysis). No measurement here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_savefig
from ..errors import UsageError
from . import serve_analysis as analysis
from .serve_run import FORMAT, FORMAT_V1, normalize


def load(inputs) -> dict[str, dict]:
    """``{tag: document}`` from files and from the ``serve_*.json`` files of folders, in input order."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("serve_*.json"))
            if not found:
                raise UsageError(f"{path}: no serve_*.json files in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    docs: dict[str, dict] = {}
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not readable JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_V1):
            raise UsageError(f"{path}: not an {FORMAT} document (written by `indexcache bench serve`)")
        doc = normalize(doc)
        if doc["tag"] in docs:
            raise UsageError(f"{path}: tag {doc['tag']!r} appears twice among the inputs")
        docs[doc["tag"]] = doc
    return docs


def _ttft(doc: dict, length: int, stat: str):
    for row in doc["prefill"]:
        if row["length"] == length:
            return row["ttft_s"][stat], row["lost"]
    return None, 0


def _speedup(base, value, higher_is_better: bool) -> str:
    if base is None or value is None or value <= 0 or base <= 0:
        return ""
    ratio = value / base if higher_is_better else base / value
    return f" ({ratio:.2f}x)"


def _prefill_table(docs: dict, tags: list[str], baseline: str, stat: str) -> list[str]:
    lengths = sorted({row["length"] for doc in docs.values() for row in doc["prefill"]})
    head = ["prompt tokens"] + [f"{t} (baseline)" if t == baseline else t for t in tags]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length in lengths:
        base, _ = _ttft(docs[baseline], length, stat)
        cells = [f"{length:,}"]
        for tag in tags:
            value, lost = _ttft(docs[tag], length, stat)
            cell = "–" if value is None else f"{value:.3f}" + ("" if tag == baseline else _speedup(base, value, False))
            cells.append(cell + (f" ({lost} lost)" if lost else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _decode_cell(run: dict | None, which: str):
    if not run:
        return None
    log = run.get("server_log") or {}
    return {"server": log.get("tok_s_median"), "step": log.get("step_ms_median"), "spread": log.get("spread"),
            "client": run["client"]["tok_s"], "itl": run["client"]["itl_median_s"]}[which]


def _decode_table(docs: dict, tags: list[str], baseline: str, setup) -> list[str]:
    head = [f"decode {setup[0]} x {setup[1]:,}"] + [f"{t} (baseline)" if t == baseline else t for t in tags]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {t: analysis.decode_run(docs[t], setup) for t in tags}

    def running(run):
        log = (run or {}).get("server_log") or {}
        if not run or log.get("running_reached") is None:
            return "–"
        reached = log["running_reached"]
        return f"{reached}" if reached == run["batch"] else f"{reached} (of {run['batch']} sent)"
    lines.append("| requests running at once (server log) | " + " | ".join(running(runs[t]) for t in tags) + " |")
    rows = (("server log tok/s (median gen throughput)", "server", True, 1.0, "{:.1f}"),
            ("step ms (running / tok/s, median)", "step", False, 1.0, "{:.2f}"),
            ("spread of the lines (p90 - p10) / median", "spread", None, 100.0, "{:.1f}%"),
            ("client tok/s (steady-state window)", "client", True, 1.0, "{:.1f}"),
            ("client median ITL (ms)", "itl", False, 1e3, "{:.1f}"))
    for label, which, higher, scale, fmt in rows:
        base = _decode_cell(runs[baseline], which)
        cells = []
        for tag in tags:
            value = _decode_cell(runs[tag], which)
            if value is None:
                cells.append("–")
                continue
            ratio = _speedup(base, value, higher) if tag != baseline and higher is not None else ""
            cells.append(fmt.format(value * scale) + ratio)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| lost requests | " + " | ".join(str(runs[t]["lost"]) if runs[t] else "–" for t in tags) + " |")
    return lines


def _bound_table(docs: dict, setup) -> list[str]:
    fit = analysis.indexer_cost(docs, setup)
    label = f"{setup[0]} x {setup[1]:,}"
    if fit is None:
        return [f"Decode {label}: no per-indexer cost (needs two patterns with different kept-indexer counts"
                " at this setup)."]
    if fit["cost_ms"] <= 0:
        return [f"Decode {label}: the step does not shrink as indexers are removed ({fit['cost_ms'] * 1e3:+.0f} µs"
                f" per kept indexer over {', '.join(fit['tags'])}): no indexer cost to bound; see the warnings."]
    source = "measured" if fit["all_f_measured"] else "extrapolated"
    share = "" if fit["indexer_share"] is None else f", {fit['indexer_share']:.0%} of all-F's step"
    limit = "" if fit["limit"] is None else f"; bound with one indexer kept: {fit['limit']:.2f}x"
    lines = [f"Decode {label}: each indexer costs **{fit['cost_ms'] * 1e3:.0f} µs** per step (least squares over"
             f" {', '.join(fit['tags'])}){share}; all-F step {fit['all_f_step_ms']:.2f} ms ({source}){limit}.", "",
             "| tag | kept indexers | step ms | speedup over all-F | Amdahl bound |", "|---|---|---|---|---|"]
    for row in analysis.bounds(docs, setup):
        bound = "–" if row["bound"] is None else f"{row['bound']:.2f}x"
        lines.append(f"| {row['tag']} | {row['kept']}/{row['layers']} | {row['step_ms']:.2f} |"
                     f" {row['speedup']:.2f}x | {bound} |")
    return lines


def _runs_table(docs: dict, tags: list[str]) -> list[str]:
    head = ["tag", "date", "device", "model", "radix cache", "decode log interval", "server steady lines",
            "requests", "lost", "cached-prefix hits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag in tags:
        doc = docs[tag]
        server, lost = doc.get("server") or {}, doc["lost"]
        steady = [str((run.get("server_log") or {}).get("steady_lines", "–")) for run in doc["decode"]]
        radix = server.get("disable_radix_cache")
        cells = [tag, doc["date"], doc.get("device") or "?", str(server.get("model_path", "?")).rsplit("/", 1)[-1],
                 "?" if radix is None else ("off" if radix else "on"), str(server.get("decode_log_interval", "?")),
                 "/".join(steady) or "–", str(lost["requests"]), str(lost["lost"]), str(lost["cached_hits"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(docs: dict, baseline: str, stat: str = "min") -> str:
    if baseline not in docs:
        raise UsageError(f"--baseline {baseline!r} is not among the tags read: {', '.join(docs)}")
    tags = [baseline] + [t for t in docs if t != baseline]
    repeats = sorted({n for d in docs.values() for n in d["settings"]["prefill_repeats"]})
    out = ["## Live server: TTFT and decode throughput", "",
           f"Baseline: **{baseline}**. Speedup = baseline TTFT / TTFT for prefill, tok/s / baseline tok/s for"
           " decode (each decode table is one setup: batch sent x prompt tokens).", "",
           f"### Prefill: time to first token (s, {stat} of {'/'.join(map(str, repeats))} requests per length;"
           " batch 1, max_new_tokens 1, no shared prefix)", ""]
    out += _prefill_table(docs, tags, baseline, stat)
    for setup in analysis.setups(docs):
        out += ["", f"### Decode: {setup[0]} concurrent requests of {setup[1]:,} tokens", ""]
        out += _decode_table(docs, tags, baseline, setup)
        out += [""] + _bound_table(docs, setup)
    warnings = analysis.warnings(docs, baseline)
    if warnings:
        out += ["", "### Warnings", ""] + [f"- {w}" for w in warnings]
    out += ["", "### Runs", ""] + _runs_table(docs, tags)
    return "\n".join(out) + "\n"


def plot(docs: dict, path, stat: str = "min") -> None:
    """TTFT versus prompt length, one line per tag (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for tag, doc in docs.items():
        points = [(r["length"], r["ttft_s"][stat]) for r in doc["prefill"] if r["ttft_s"][stat] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=tag)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(f"TTFT (s, {stat})")
    devices = sorted({d.get("device") or "?" for d in docs.values()})
    ax.set_title(f"TTFT, batch 1 ({', '.join(devices)})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
