"""Tables and plots of benchmark documents (runner.py); no measurement here."""

from __future__ import annotations

from .. import pattern as pat
from ..atomic import atomic_savefig


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}ms" if seconds < 1 else f"{seconds:.3f}s"


def _eff(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(doc: dict) -> str:
    """Markdown table: one row per (batch,) context, pattern."""
    decode = doc["mode"] == "decode"
    head = ["batch"] if decode else []
    head += ["context", "pattern", "seconds", "speedup", "limit", "floor_limit", "idx share",
             "indexer", "attention", "dense", "eff idx/att/dense", "att eff (gather)", "spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        c = r["components"]
        e = r["efficiency"]
        cells = [str(r["batch"])] if decode else []
        cells += [str(r["context"]), r["pattern"], _fmt_s(r["seconds"]), f"{r['speedup']:.2f}x",
                  f"{r['limit']:.2f}x", f"{r['floor_limit']:.2f}x", f"{100 * r['indexer_share']:.0f}%",
                  _fmt_s(c["indexer"]), _fmt_s(c["attention"]), _fmt_s(c["dense"]),
                  "/".join(_eff(e[k]) for k in ("indexer", "attention", "dense")),
                  _eff(r.get("attention_gather_efficiency")), f"{100 * r['spread']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(doc: dict) -> str:
    ceil = doc["ceilings"]
    return (f"{doc['mode']}: config {doc['config']}, {doc['layers']} layers, {doc['device']}, "
            f"{doc['dtype']}, kernels {doc['kernels']} ({doc['note']})\n"
            f"ceilings measured: matmul {ceil['matmul_flops'] / 1e12:.3g} TFLOP/s, "
            f"copy {ceil['copy_bytes'] / 1e9:.3g} GB/s; median of {doc['repeats']} after "
            f"{doc['warmup']} warm-up; load {doc.get('load_before')} -> {doc.get('load_after')}")


def plot(doc: dict, path) -> None:
    """Speedup over all-F versus context, one line per pattern (and batch), limits dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for r in doc["rows"]:
        if pat.is_all_full(r["pattern_string"]):
            continue
        key = r["pattern"] + (f" b={r['batch']}" if "batch" in r else "")
        series.setdefault(key, []).append((r["context"], r["speedup"], r["limit"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        line, = ax.plot(xs, [p[1] for p in points], marker="o", label=f"{key} measured")
        ax.plot(xs, [p[2] for p in points], linestyle="--", color=line.get_color(), label=f"{key} limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("speedup over all-F")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_title(f"{doc['mode']} {doc['config']} x{doc['layers']} layers, {doc['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
