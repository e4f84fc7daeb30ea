"""LM loss (nats per predicted token) of a DSA model under one or more IndexCache patterns.

Each ``--pattern`` is ``all-F``, ``every-N``, a pattern string or a pattern file (checked against the
model's fingerprint). The same tokenized blocks are scored under every pattern.
"""

from __future__ import annotations

import json

from .options import add_data_arguments, add_model

DEFAULT_EVAL_TOKENS = 16384  # one whole forward per pattern and batch


def add_arguments(parser):
    add_model(parser)
    add_data_arguments(parser, DEFAULT_EVAL_TOKENS)
    parser.add_argument("--pattern", action="append", required=True, metavar="P",
                        help="all-F, every-N, a pattern string or a pattern file; repeat to compare")
    parser.add_argument("--json", action="store_true", help='print {"results": [{"pattern", "loss", "tokens"}]}')


def evaluate(backend, blocks, specs, model_info, batch_size=4):
    """``[{"pattern", "label", "spec", "loss", "tokens"}]`` for each spec, same blocks for all."""
    from .. import pattern_file, progress

    resolved = [(spec, pattern_file.resolve(spec, backend.num_layers, model_info)) for spec in specs]
    results = []
    for spec, pattern in resolved:
        backend.set_pattern(pattern)
        bar = lambda it: progress.bar(it, total=len(it), desc=pattern_file.spec_label(spec), unit="batch")  # noqa: E731
        result = backend.loss(blocks, batch_size=batch_size, progress=bar)
        results.append({"pattern": pattern, "label": pattern_file.spec_label(spec), "spec": spec,
                        "loss": result.mean, "tokens": result.tokens})
    return results


def format_table(results) -> str:
    """One row per pattern; the change column is against all-F when it was scored, else the first row
    (the header names which)."""
    baseline = next((r for r in results if set(r["pattern"]) == {"F"}), results[0])
    base = baseline["loss"]
    width = max(len(r["label"]) for r in results)
    column = f"vs {baseline['label']}"
    lines = [f"{'pattern':<{width}}  {'F':>5}  {'loss':>8}  {column:>{max(8, len(column))}}  tokens"]
    for r in results:
        kept = f"{r['pattern'].count('F')}/{len(r['pattern'])}"
        delta = f"{100.0 * (r['loss'] - base) / base:+.2f}%"
        lines.append(f"{r['label']:<{width}}  {kept:>5}  {r['loss']:8.4f}  {delta:>{max(8, len(column))}}  {r['tokens']}")
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
    results = evaluate(backend, blocks, args.pattern, info, args.batch_size)
    if args.json:
        print(json.dumps({"results": [{k: r[k] for k in ("pattern", "loss", "tokens")} for r in results]}))
    else:
        print(f"{info.path} on {args.data}: {blocks.tokens} tokens, LM loss in nats/token")
        print(format_table(results))
    return 0
