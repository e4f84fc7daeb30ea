"""Merge several ``indexcache bench serve`` documents (one per tag) into one Markdown table and a plot.

Rows are prompt lengths, columns are tags; each cell is the TTFT and its speedup over the named
baseline (baseline TTFT / tag TTFT). Decode rows give tok/s from the client's steady-state window and
from the server's own log lines, with speedup tag / baseline. No measurement here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .serve_run import FORMAT


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
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise UsageError(f"{path}: not an {FORMAT} document (written by `indexcache bench serve`)")
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


def _decode_setup(doc: dict):
    d = doc.get("decode")
    return None if not d else (d["batch"], d["length"], d["new_tokens"])


def _decode_value(doc: dict, which: str):
    d = doc.get("decode")
    if not d:
        return None
    if which == "client":
        return d["client"]["tok_s"]
    if which == "itl":
        return d["client"]["itl_median_s"]
    return (d.get("server_log") or {}).get("tok_s_median")


def _decode_table(docs: dict, tags: list[str], baseline: str) -> list[str]:
    setup = _decode_setup(docs[baseline])
    if setup is None and not any(_decode_setup(d) for d in docs.values()):
        return []
    head = ["decode"] + [f"{t} (baseline)" if t == baseline else t for t in tags]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| setup (batch x prompt, new tokens) | " + " | ".join(
        "–" if _decode_setup(docs[t]) is None else "{} x {:,}, {}".format(*_decode_setup(docs[t])) for t in tags) + " |")
    rows = (("client tok/s (steady-state window)", "client", True),
            ("server log tok/s (median gen throughput)", "server", True),
            ("client median ITL (ms)", "itl", False))
    for label, which, higher in rows:
        base = _decode_value(docs[baseline], which)
        cells = []
        for tag in tags:
            value = _decode_value(docs[tag], which)
            if value is None:
                cells.append("–")
                continue
            shown = value * 1e3 if which == "itl" else value
            same = _decode_setup(docs[tag]) == setup
            ratio = _speedup(base, value, higher) if tag != baseline and same else ""
            cells.append(f"{shown:.1f}{ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| lost requests | " + " | ".join(str(docs[t]["decode"]["lost"]) if docs[t].get("decode") else "–"
                                                  for t in tags) + " |")
    return lines


def _runs_table(docs: dict, tags: list[str]) -> list[str]:
    head = ["tag", "date", "device", "model", "radix cache", "decode log interval", "server steady lines",
            "requests", "lost", "cached-prefix hits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag in tags:
        doc = docs[tag]
        server, lost = doc.get("server") or {}, doc["lost"]
        log = (doc.get("decode") or {}).get("server_log") or {}
        radix = server.get("disable_radix_cache")
        cells = [tag, doc["date"], doc.get("device") or "?", str(server.get("model_path", "?")).rsplit("/", 1)[-1],
                 "?" if radix is None else ("off" if radix else "on"), str(server.get("decode_log_interval", "?")),
                 str(log.get("steady_lines", "–")), str(lost["requests"]), str(lost["lost"]), str(lost["cached_hits"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(docs: dict, baseline: str, stat: str = "min") -> str:
    if baseline not in docs:
        raise UsageError(f"--baseline {baseline!r} is not among the tags read: {', '.join(docs)}")
    tags = [baseline] + [t for t in docs if t != baseline]
    repeats = sorted({d["settings"]["prefill_repeats"] for d in docs.values()})
    out = ["## Live server: TTFT and decode throughput", "",
           f"Baseline: **{baseline}**. Speedup = baseline TTFT / TTFT for prefill, tok/s / baseline tok/s for"
           " decode (only where the decode setup equals the baseline's).", "",
           f"### Prefill: time to first token (s, {stat} of {'/'.join(map(str, repeats))} requests per length;"
           " batch 1, max_new_tokens 1, no shared prefix)", ""]
    out += _prefill_table(docs, tags, baseline, stat)
    decode = _decode_table(docs, tags, baseline)
    if decode:
        out += ["", "### Decode: concurrent requests, tokens/s after each request's first token", ""] + decode
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
