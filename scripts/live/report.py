"""The runner's summary as Markdown tables (docs/perf.md takes them as they are: no number typed by hand).

``markdown(summary)``: the phases of the runs; per checkpoint depth the live table of
``bench serve-report`` (TTFT, decode at the running count reached, per-indexer cost and Amdahl
bound, host-bound warnings); KV tokens stock against patched; the saturation runs; the chunked-prefill
comparison; failed checks. ``summary`` is ``summary.json`` with ``arrays.json`` merged into the
results (``load``), or the runner's live state.
"""

from __future__ import annotations

import json
from pathlib import Path

from sglang_indexcache.bench import serve_analysis, serve_report, serve_run

from . import chunked, stride
from .measure import compare_logprobs
from .runner import RESULTS_DIR

TARGETS = {"bf16": 0.07, "fp8": 0.12}  # issue 21: KV tokens at every-4 on the 32-layer stack


def load(folder) -> dict:
    """summary.json of a run folder, with arrays.json's log-probabilities put back into the results."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    arrays_path = folder / "arrays.json"
    arrays = json.loads(arrays_path.read_text()) if arrays_path.is_file() else {}
    for name, extra in arrays.items():
        entry = summary["phases"].get(name)
        if entry is not None:
            entry.setdefault("result", {}).update(extra)
    return summary


def split(state_data: dict) -> tuple[dict, dict]:
    """(summary, arrays): the state with every result key starting with ``_`` moved to ``arrays``."""
    phases, arrays = {}, {}
    for name, entry in state_data["phases"].items():
        result = entry.get("result") or {}
        heavy = {k: v for k, v in result.items() if k.startswith("_")}
        if heavy:
            arrays[name] = heavy
        phases[name] = dict(entry, result={k: v for k, v in result.items() if not k.startswith("_")})
    summary = {k: v for k, v in state_data.items() if k != "phases"}
    summary["phases"] = phases
    return summary, arrays


def markdown(summary: dict) -> str:
    phases = summary["phases"]
    out = ["## Live runs: phases", ""] + _phase_table(phases)
    for depth, docs in sorted(_serve_docs(phases).items()):
        baseline = next((t for t in ("stock-all-F", "stock-e4", "stock-e4-l78") if t in docs), next(iter(docs)))
        dummy = any((d.get("server") or {}).get("load_format") == "dummy" for d in docs.values())
        title = f"## {depth} layers{' (SGLang dummy weights: every layer alike)' if dummy else ''}, live server:"
        table = serve_report.markdown(docs, baseline).replace("## Live server:", title)
        out += ["", table.rstrip()]
    for title, lines in (("KV tokens: stock against patched at the same --mem-fraction-static", _memory(phases)),
                         ("Memory saturation (fp8 KV): more long requests than stock holds", _saturation(phases)),
                         ("Chunked prefill: prompt log-probabilities against one unchunked forward", _chunked(phases)),
                         ("Decode stride (issue 22): strides switched at run time on one server", stride.markdown(phases)),
                         ("Failed checks", _failed(phases))):
        if lines:
            out += ["", f"## {title}", ""] + lines
    return "\n".join(out) + "\n"


def _phase_table(phases: dict) -> list[str]:
    lines = ["| phase | status | estimate s | took s | server start s | checks | result |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in phases.items():
        checks = entry.get("checks") or []
        bad = sum(not c["ok"] for c in checks)
        note = entry.get("error") or (entry.get("result") or {}).get("headline", "")
        lines.append(f"| {name} | {entry.get('status')} | {entry.get('estimate_s', '')} | {entry.get('seconds', '')} |"
                     f" {entry.get('server_start_s', '')} | {len(checks) - bad}/{len(checks)} |"
                     f" {str(note).replace('|', '/')[:200]} |")
    return lines


def _serve_docs(phases: dict) -> dict[int, dict]:
    """{layers: {server key: merged compact document}} of the bench-serve parts that ran."""
    parts: dict[str, list] = {}
    for entry in phases.values():
        result = entry.get("result") or {}
        if entry.get("status") == "done" and result.get("serve"):
            parts.setdefault(result["server"], []).append(result["serve"])
    grouped: dict[int, dict] = {}
    for key, docs in parts.items():
        doc = serve_run.merge(docs)
        pattern = serve_analysis.pattern_of(doc) or ""
        grouped.setdefault(len(pattern), {})[key] = doc
    return grouped


def _memory(phases: dict) -> list[str]:
    rows = [(e.get("result") or {}) for n, e in phases.items() if n.startswith("memory-") and e.get("status") == "done"]
    if not rows:
        return []
    lines = ["| KV dtype | layers (kept indexers) | --mem-fraction-static | free at start, stock / patched (GiB) |"
             " stock tokens | patched tokens | gain | bytes per token, stock / patched | gain at equal bytes |"
             " formula: index keys / with the freed indexer weights | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = TARGETS.get(r["kv"]) if r["layers"] == 32 else None
        met = "" if target is None else f"{target:+.0%} ({'met' if r['gain'] >= target else 'missed'})"
        per_token = ("–" if not r.get("gain_equal_bytes") else
                     f"{r['stock_bytes_per_token']:,.0f} / {r['patched_bytes_per_token']:,.0f}")
        equal = "–" if r.get("gain_equal_bytes") is None else f"{r['gain_equal_bytes']:+.1%}"
        # an older result has the index keys' formula alone, as expected_gain
        keys, weights = ((r["expected_gain_index_k"], f"{r['expected_gain']:+.1%}") if "expected_gain_index_k" in r
                         else (r["expected_gain"], "–"))
        lines.append(f"| {r['kv']} | {r['layers']} ({r['kept']}) | {r['mem_fraction_static']} |"
                     f" {r.get('stock_avail_before_gb')} / {r.get('patched_avail_before_gb')} | {r['stock_tokens']:,} |"
                     f" {r['patched_tokens']:,} | {r['gain']:+.1%} | {per_token} | {equal} | {keys:+.1%} / {weights} |"
                     f" {met} |")
    return lines


def _saturation(phases: dict) -> list[str]:
    rows = [(n, e["result"]) for n, e in phases.items() if n.endswith(":saturation") and e.get("status") == "done"]
    if not rows:
        return []
    lines = ["| server | pool tokens | requests x prompt + new | ran at once | longest queue | retractions |"
             " wall s | new tokens / wall s | decode tok/s at the count reached (ms/step) | lost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        decode = r.get("decode") or {}
        at = ("–" if not decode.get("tok_s_median") else
              f"{decode['tok_s_median']:.0f} at {decode['running_reached']} ({decode['step_ms_median']:.2f})")
        lines.append(f"| {r['server']} | {r['pool']:,} | {r['n']} x {r['length']:,} + {r['new_tokens']} |"
                     f" {r['max_running']} | {r['max_queue']} | {r['retractions']} | {r['wall_s']:.1f} |"
                     f" {r['tok_s']:.0f} | {at} | {r['lost']} |")
    return lines


def _chunked(phases: dict) -> list[str]:
    reference = next((n for n in ("chunk-ref",) if (phases.get(n) or {}).get("status") == "done"), None)
    if reference is None:
        return []
    try:
        rows, control = compare_logprobs(phases, reference)
    except Exception as exc:  # noqa: BLE001 - a summary without arrays.json: the phase's own rows
        final = [e for n, e in phases.items() if n.startswith("chunk-compare") and e.get("status") == "done"]
        if not final:
            return [f"No comparison: {exc}"]
        rows, control = final[-1]["result"]["rows"], final[-1]["result"]["control"]
    lines = [f"Prompt: {chunked.PROMPT_TOKENS:,} random ids; reference: {reference} (one forward); pass = mean"
             f" |diff| <= {chunked.BF16_MEAN_TOL} nats and <= 1/{chunked.CONTROL_FACTOR:.0f} of the control.", ""]
    if control:
        lines.append(f"Control, every-4 against all-F (both unchunked): mean |diff| {control['mean_abs']:.4f},"
                     f" max {control['max_abs']:.4f} nats over {control['positions']:,} positions.")
        lines.append("")
    lines += ["| measured on | tree | chunk | pattern | mean abs | p99 abs | max abs | mean abs per chunk | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        segments = " / ".join("–" if x is None else f"{x:.3g}" for x in d["segment_mean_abs"])
        where = r["server"] + (" (calibration mode)" if r.get("calibration") else "")
        lines.append(f"| {where} | {r['tree']} | {r['chunk']} | {r['label']} | {d['mean_abs']:.3g} |"
                     f" {d['p99_abs']:.3g} | {d['max_abs']:.3g} | {segments} | {r['verdict']}: {r['why']} |")
    return lines


def _failed(phases: dict) -> list[str]:
    return [f"- {name}: {c['name']}: {c['detail'][:200]}" for name, e in phases.items()
            for c in (e.get("checks") or []) if not c["ok"]]


def pack(out, root, state_data: dict) -> list[Path]:
    """Everything measured so far under ``out`` (the device returns at most 8 files, 2 folders deep).

    ``live.tar.gz``: the work folder (server logs, bench-serve documents, each phase's files);
    ``summary.json``: the state without log-probability arrays, which go to ``arrays.json``;
    ``summary.md``: :func:`markdown` of it all; and each file phases published (``results/`` of the
    work folder, ``Context.publish``) as it is. Each file is written beside and renamed into place.
    """
    import shutil
    import tarfile

    from sglang_indexcache.atomic import atomic_path, atomic_write_json, atomic_write_text

    out, root = Path(out), Path(root)
    out.mkdir(parents=True, exist_ok=True)
    summary, arrays = split(state_data)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "arrays.json", arrays, indent=None)
    full = dict(summary, phases={n: dict(e, result=dict(e.get("result") or {}, **arrays.get(n, {})))
                                 for n, e in summary["phases"].items()})
    try:
        text = markdown(full)
    except Exception as exc:  # noqa: BLE001 - a report bug must not lose the measurements
        text = f"report failed: {type(exc).__name__}: {exc}\n"
    atomic_write_text(out / "summary.md", text)
    with atomic_path(out / "live.tar.gz") as tmp:
        with tarfile.open(tmp, "w:gz") as archive:
            archive.add(root, arcname="live", filter=lambda info: None if info.size > 200 * 2**20 else info)
    published = sorted((root / RESULTS_DIR).glob("*")) if (root / RESULTS_DIR).is_dir() else []
    for path in published:
        with atomic_path(out / path.name) as tmp:
            shutil.copyfile(path, tmp)
    return [out / n for n in ("live.tar.gz", "summary.json", "arrays.json", "summary.md")] + \
        [out / p.name for p in published]
