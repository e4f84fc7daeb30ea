"""LM loss (nats per predicted token) of a DSA model under one or more IndexCache patterns.

Each ``--pattern`` is ``all-F``, ``every-N``, a pattern string or a pattern file (checked against the
model's fingerprint). The same tokenized blocks are scored under every pattern. ``--decode-stride N``
(repeatable) scores each pattern with every F layer reusing its top-k across N decode steps,
simulated teacher-forced (``models/decode_reuse.py``); without it a pattern file's own
``decode_stride`` applies, else stride 1 (every query its own top-k).
"""

from __future__ import annotations

import json

from .options import add_data_arguments, add_model, positive_int

DEFAULT_EVAL_TOKENS = 16384  # one whole forward per pattern and batch


def add_arguments(parser):
    add_model(parser)
    add_data_arguments(parser, DEFAULT_EVAL_TOKENS)
    parser.add_argument("--pattern", action="append", required=True, metavar="P",
                        help="all-F, every-N, a pattern string or a pattern file; repeat to compare")
    parser.add_argument("--decode-stride", type=positive_int, action="append", metavar="N",
                        help="F layers refresh their top-k every N decode steps (teacher-forced); repeat to"
                             " compare; default: a pattern file's decode_stride, else 1")
    parser.add_argument("--json", action="store_true",
                        help='print {"results": [{"pattern", "decode_stride", "loss", "tokens"}]}')


def settings(specs, num_layers, model_info, strides=None) -> list[tuple[str, str, list[int]]]:
    """``[(spec, pattern, per-layer strides)]``: each spec at each of ``strides`` (uniform), or at its
    file's own ``decode_stride``, or at 1."""
    from .. import pattern as pat
    from .. import pattern_file

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
    from .. import pattern as pat
    from .. import pattern_file, progress

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
    from .. import pattern as pat

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


def run(args) -> int:
    from .. import pattern_file
    from ..calibration.session import load_backend, load_data
    from ..model_info import load_model_info

    from ..calibration.data import check_source

    info = load_model_info(args.model)
    for spec in args.pattern:  # refuse a bad spec before loading anything heavy
        pattern_file.resolve(spec, info.num_dsa_layers, info)
    check_source(args.data)
    backend = load_backend(args.model, threads=args.threads)
    blocks = load_data(args, backend.tokenizer, backend.config)
    results = evaluate(backend, blocks, args.pattern, info, args.batch_size, args.decode_stride)
    if args.json:
        keys = ("pattern", "decode_stride", "loss", "tokens")
        print(json.dumps({"results": [{k: r[k] for k in keys} for r in results]}))
    else:
        print(f"{info.path} on {args.data}: {blocks.tokens} tokens, LM loss in nats/token")
        print(format_table(results))
    return 0
