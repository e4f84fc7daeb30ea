"""Plots of calibration results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from sglang_indexcache import pattern as pat
from sglang_indexcache.atomic import atomic_savefig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(document: dict, path) -> Path:
    """Loss versus number of removed indexers along the greedy path; the uniform pattern marked."""
    plt = _pyplot()
    cal = document["calibration"]
    n = document["model"]["num_dsa_layers"]
    start_removed = n - (pat.kept(cal["steps"][0]["pattern"]) + 1) if cal["steps"] else 0
    xs = [start_removed] + [n - pat.kept(s["pattern"]) for s in cal["steps"]]
    ys = [cal["baseline_loss"]] + [s["loss"] for s in cal["steps"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, ys, marker="o", markersize=3, label="greedy path")
    ax.axhline(cal["baseline_loss"], color="grey", linestyle=":", linewidth=1, label="all F")
    uniform = cal.get("uniform")
    if uniform:
        ux = n - pat.kept(uniform["pattern"])
        ax.scatter([ux], [uniform["loss"]], color="red", marker="x", s=60, zorder=3,
                   label=f"uniform ({pat.kept(uniform['pattern'])}/{n} F)")
    ax.set_xlabel("indexers removed (S layers)")
    ax.set_ylabel("calibration LM loss (nats/token)")
    ax.set_title(f"greedy IndexCache search, keep {cal['keep_ratio']:g} ({n} layers)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_overlap(matrix, path, title: str) -> Path:
    """Heatmap of ``matrix [L, L]`` (row i: layer i's top-k; column j: share that layer j also picks)."""
    plt = _pyplot()
    layers = len(matrix)
    fig, ax = plt.subplots(figsize=(6.0, 5.2), dpi=120)
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    ax.set_xlabel("layer j (also selects)")
    ax.set_ylabel("layer i (own top-k)")
    ticks = list(range(0, layers, max(1, layers // 16)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of layer i's top-k also in layer j's")
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_stride_calibration(document: dict, path) -> Path:
    """Loss versus effective decode stride along the greedy stride path; uniform stride marked."""
    from sglang_indexcache import pattern as pat

    plt = _pyplot()
    cal, pattern = document["decode_stride_calibration"], document["pattern"]
    xs = [1.0] + [pat.effective_stride(pattern, s["decode_stride"]) for s in cal["steps"]]
    ys = [cal["baseline_loss"]] + [s["loss"] for s in cal["steps"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, ys, marker="o", markersize=3, label="greedy path (one F layer's stride raised per step)")
    ax.axhline(cal["baseline_loss"], color="grey", linestyle=":", linewidth=1, label="stride 1")
    if cal.get("uniform"):
        ax.scatter([cal["stride_target"]], [cal["uniform"]["loss"]], color="red", marker="x", s=60, zorder=3,
                   label=f"uniform stride {cal['stride_target']:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("effective decode stride (harmonic mean over F layers)")
    ax.set_ylabel("calibration LM loss (nats/token)")
    ax.set_title(f"greedy decode-stride search on {pattern}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def plot_decode_stride_study(doc: dict, path) -> Path:
    """Left: held-out loss vs decode stride per pattern (greedy-searched strides as stars at their
    effective stride). Right: loss increase with stride 4 on one F layer at a time."""
    plt = _pyplot()
    uniform, base = doc.get("uniform", {}), doc.get("uniform", {}).get("all-F@1", {}).get("loss")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2), dpi=120)
    series: dict[str, list] = {}
    for key, row in uniform.items():
        label, stride = key.rsplit("@", 1)
        series.setdefault(label, []).append((int(stride), row["loss"]))
    colors = {}
    for label, points in series.items():
        points.sort()
        line, = left.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=4, label=label)
        colors[label] = line.get_color()
    for label, row in doc.get("search", {}).items():
        left.scatter([row["effective_stride"]], [row["loss"]], marker="*", s=140, zorder=3,
                     color=colors.get(label, "black"), label=f"{label}, greedy per-layer strides")
    for i, (key, row) in enumerate(doc.get("drop_random", {}).items()):
        label, stride = key.rsplit("@", 1)
        left.scatter([int(stride)], [row["loss"]], marker="x", s=40, color=colors.get(label, "black"),
                     label="random drop order (not lowest score)" if i == 0 else None)
    if base is not None:
        left.axhline(base, color="grey", linestyle=":", linewidth=1)
    left.set_xscale("log", base=2)
    left.set_xlabel("decode stride of every F layer (stars: effective stride)")
    left.set_ylabel("held-out LM loss (nats/token)")
    left.set_title("top-k reused across decode steps (teacher-forced)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper left")
    width = 0.4
    for offset, (label, row) in zip((-width / 2, width / 2), doc.get("sensitivity", {}).items()):
        layers = sorted(int(j) for j in row["loss"])
        rise = [100.0 * (row["loss"][str(j)] - row["base_loss"]) / row["base_loss"] for j in layers]
        right.bar([j + offset for j in layers], rise, width=width, color=colors.get(label), label=label)
    right.set_xlabel("F layer at stride 4 (all others at 1)")
    right.set_ylabel("loss increase over its pattern at stride 1 (%)")
    right.set_title("per-layer sensitivity")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)
