"""LM loss of a backend under pattern specs (and decode strides): ``indexcache eval`` and the demo.

A spec is ``all-F``, ``every-N``, a pattern string or a pattern file (``pattern_file.resolve``,
checked against the model's fingerprint); every spec is scored on the same blocks.
"""

from __future__ import annotations

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file, progress


def settings(specs, num_layers, model_info, strides=None) -> list[tuple[str, str, list[int]]]:
    """``[(spec, pattern, per-layer strides)]``: each spec at each of ``strides`` (uniform), or at its
    file's own ``decode_stride``, or at 1."""
    out = []
    for spec in specs:
        pattern, own = pattern_file.resolve_with_strides(spec, num_layers, model_info)
        for stride in strides or [None]:
            chosen = pat.uniform_strides(num_layers, stride) if stride else own or [1] * num_layers
            out.append((spec, pattern, chosen))
    return out


def evaluate(backend, blocks, specs, model_info, batch_size=4, strides=None):
    """``[{"pattern", "decode_stride", "label", "spec", "loss", "tokens"}]`` for each spec (at each of
    ``strides``), same blocks for all."""
    results = []
    for spec, pattern, chosen in settings(specs, backend.num_layers, model_info, strides):
        backend.set_pattern(pattern)
        backend.set_decode_stride(chosen)
        label = pattern_file.spec_label(spec)
        desc = label if set(chosen) == {1} else f"{label} stride {pat.describe_strides(pattern, chosen)}"
        bar = lambda it, desc=desc: progress.bar(it, total=len(it), desc=desc, unit="batch")  # noqa: E731
        result = backend.loss(blocks, batch_size=batch_size, progress=bar)
        results.append({"pattern": pattern, "decode_stride": chosen, "label": label, "spec": spec,
                        "loss": result.mean, "tokens": result.tokens})
    backend.set_decode_stride(1)
    return results


def format_table(results) -> str:
    """One row per pattern (and stride); the change column is against all-F at stride 1 when it was
    scored, else the first row (the header names which)."""
    def is_base(r):
        return pat.is_all_full(r["pattern"]) and set(r.get("decode_stride") or [1]) == {1}

    baseline = next((r for r in results if is_base(r)), results[0])
    base = baseline["loss"]
    width = max(len(r["label"]) for r in results)
    column = f"vs {baseline['label']}"
    lines = [f"{'pattern':<{width}}  {'F':>5}  {'stride':>8}  {'loss':>8}  {column:>{max(8, len(column))}}  tokens"]
    for r in results:
        kept = f"{pat.kept(r['pattern'])}/{len(r['pattern'])}"
        stride = pat.describe_strides(r["pattern"], r.get("decode_stride") or [1] * len(r["pattern"]))
        delta = f"{100.0 * (r['loss'] - base) / base:+.2f}%"
        lines.append(f"{r['label']:<{width}}  {kept:>5}  {stride:>8}  {r['loss']:8.4f}"
                     f"  {delta:>{max(8, len(column))}}  {r['tokens']}")
        if r["label"] != r["pattern"]:
            lines.append(f"{'':<{width}}  {r['pattern']}")
    return "\n".join(lines)
