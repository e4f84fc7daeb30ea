"""What a set of ``bench serve`` documents says about decode: per-indexer step cost, Amdahl bound, host-bound.

No measurement here: every number comes from SGLang's own decode log lines recorded in the documents
(``decode[i].server_log``: median step time at the running count SGLang reached).

- **Kept indexers** of a tag: ``settings.pattern`` (``bench serve --pattern``), else the patched
  server's ``/server_info`` ``index_cache.pattern``, else the stock override's ``index_topk_pattern``.
- **Per-indexer step cost** ``c`` at one decode setup (batch asked x prompt length): the slope of
  step time against kept indexers over every tag with a known pattern of the same depth (least
  squares; with two patterns, the difference of their steps over the difference of their indexers).
- **Amdahl bound** of a pattern keeping ``K`` of ``L`` indexers: ``s_F / (s_F - (L - K) c)``, the
  speedup over all-F if removing indexers were the only change; ``s_F`` is all-F's measured step, or
  ``s + (L - K) c`` from a tag's own step when no all-F tag ran. ``limit`` is the bound at one kept
  indexer.
- **Host-bound warning**: a step below :data:`HOST_BOUND_STEP_MS`, or a pattern's effect (ratio of
  steps against the baseline, where the kept counts differ) smaller than the line-to-line spread.
"""

from __future__ import annotations

import json

from .. import pattern as pat

# On the H200 (SGLang 0.5.17, CUDA graphs) the 8-layer stack decoded at 1.5-2.5 ms per step and four
# near-identical instances spread 3,162-5,185 tok/s (host-bound), while the 32-layer stack at 5.9-8.2
# ms per step gave stock and patched every-4 within 0.2% (docs/perf.md): a step under 3 ms is suspect.
HOST_BOUND_STEP_MS = 3.0


def pattern_of(doc: dict) -> str | None:
    """The F/S pattern the tag's server ran, from what the document recorded (None if unknown)."""
    settings, server = doc.get("settings") or {}, doc.get("server") or {}
    if settings.get("pattern"):
        return settings["pattern"]
    entry = server.get("index_cache")
    if isinstance(entry, dict) and entry.get("pattern"):
        return entry["pattern"]
    override = server.get("json_model_override_args")
    if override:
        try:
            pattern = json.loads(override).get("index_topk_pattern")
        except (ValueError, AttributeError):
            pattern = None
        if pattern:
            return pattern
    return None


def setups(docs: dict) -> list[tuple[int, int]]:
    """Every (batch asked, prompt length) decode setup of the documents, in first-seen order."""
    seen = []
    for doc in docs.values():
        for run in doc.get("decode") or []:
            key = (run["batch"], run["length"])
            if key not in seen:
                seen.append(key)
    return seen


def decode_run(doc: dict, setup: tuple[int, int]) -> dict | None:
    for run in doc.get("decode") or []:
        if (run["batch"], run["length"]) == tuple(setup):
            return run
    return None


def step_ms(doc: dict, setup) -> float | None:
    run = decode_run(doc, setup)
    return ((run or {}).get("server_log") or {}).get("step_ms_median")


def spread(doc: dict, setup) -> float | None:
    run = decode_run(doc, setup)
    return ((run or {}).get("server_log") or {}).get("spread")


def indexer_cost(docs: dict, setup) -> dict | None:
    """Least-squares step time against kept indexers at ``setup``; None without two kept counts."""
    points = []
    for tag, doc in docs.items():
        pattern, step = pattern_of(doc), step_ms(doc, setup)
        if pattern and step:
            points.append((tag, len(pattern), pat.kept(pattern), step))
    depths = {p[1] for p in points}
    if len(depths) != 1 or len({p[2] for p in points}) < 2:
        return None
    layers = depths.pop()
    n = len(points)
    mean_k = sum(p[2] for p in points) / n
    mean_s = sum(p[3] for p in points) / n
    var = sum((p[2] - mean_k) ** 2 for p in points)
    cost = sum((p[2] - mean_k) * (p[3] - mean_s) for p in points) / var
    full = [p[3] for p in points if p[2] == layers]
    all_f = sum(full) / len(full) if full else mean_s + (layers - mean_k) * cost
    return {"layers": layers, "cost_ms": cost, "all_f_step_ms": all_f, "all_f_measured": bool(full),
            "tags": [p[0] for p in points], "indexer_share": layers * cost / all_f if all_f > 0 else None,
            "limit": all_f / (all_f - (layers - 1) * cost) if all_f > (layers - 1) * cost else None}


def bounds(docs: dict, setup) -> list[dict]:
    """Per tag with a pattern: kept indexers, step, measured speedup over all-F, and the Amdahl bound."""
    fit = indexer_cost(docs, setup)
    if fit is None:
        return []
    rows = []
    for tag, doc in docs.items():
        pattern, step = pattern_of(doc), step_ms(doc, setup)
        if not pattern or not step or len(pattern) != fit["layers"]:
            continue
        removed = fit["layers"] - pat.kept(pattern)
        denominator = fit["all_f_step_ms"] - removed * fit["cost_ms"]
        rows.append({"tag": tag, "kept": pat.kept(pattern), "layers": fit["layers"], "step_ms": step,
                     "speedup": fit["all_f_step_ms"] / step,
                     "bound": fit["all_f_step_ms"] / denominator if denominator > 0 else None})
    return rows


def warnings(docs: dict, baseline: str) -> list[str]:
    """Host-bound warnings for every decode setup (see the module docstring)."""
    out = []
    for setup in setups(docs):
        label = f"{setup[0]} x {setup[1]:,}"
        base_step, base_pattern = step_ms(docs[baseline], setup), pattern_of(docs[baseline])
        for tag, doc in docs.items():
            step = step_ms(doc, setup)
            if step is None:
                continue
            if step < HOST_BOUND_STEP_MS:
                out.append(f"{tag}, decode {label}: {step:.2f} ms per step is below {HOST_BOUND_STEP_MS} ms; the host"
                           " may bound this setup (see docs/perf.md)")
            pattern = pattern_of(doc)
            if tag == baseline or base_step is None or not pattern or not base_pattern:
                continue
            if pat.kept(pattern) == pat.kept(base_pattern):
                continue
            effect = abs(base_step / step - 1)
            noise = max(x for x in (spread(doc, setup), spread(docs[baseline], setup), 0.0) if x is not None)
            if noise >= effect:
                out.append(f"{tag}, decode {label}: the spread of the steps ({noise:.1%}) is not smaller than the"
                           f" pattern's effect over {baseline} ({effect:.1%}); host-bound or too few lines")
    return out
