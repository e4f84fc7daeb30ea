"""Greedy search for the F layers (training-free IndexCache) on a calibration set.

Starts from all F and, step by step, makes S the layer whose loss of its indexer costs least in LM
loss, until round(keep * N) F layers remain. With --model the search runs in-process with exact
prefix reuse (each candidate is evaluated from its own layer onwards); with --url it drives a
patched SGLang server in calibration mode (whole forwards through /generate prompt log-probs; give
--model too, for the tokenizer and the pattern file's fingerprint: only config.json, tokenizer and
safetensors headers are read). Writes a pattern file, calibration.png beside it, and after every
step OUT.state.json, from which --resume continues an interrupted run.
"""

from __future__ import annotations

from ..calibration.session import DEFAULT_MAX_TOKENS, add_data_arguments


def add_arguments(parser):
    parser.add_argument("--model", metavar="DIR", help="HF-format DSA checkpoint directory")
    parser.add_argument("--url", metavar="URL", help="patched SGLang server in calibration mode")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help="the server's API/admin key (default: $INDEXCACHE_API_KEY)")
    add_data_arguments(parser, DEFAULT_MAX_TOKENS)
    parser.add_argument("--keep", required=True, type=float, metavar="RATIO",
                        help="share of indexers to keep, e.g. 0.25 (round(keep * N) F layers, at least 1)")
    parser.add_argument("--out", required=True, metavar="FILE", help="pattern file to write (.json)")
    parser.add_argument("--resume", action="store_true", help="continue from FILE.state.json")
    parser.add_argument("--screen-batches", type=int, default=None, metavar="N",
                        help="speed-up that may change the result: rank candidates on the first N batches,"
                             " re-score the best --screen-top on all")
    parser.add_argument("--screen-top", type=int, default=3, metavar="M", help="finalists per step (default: 3)")
    parser.add_argument("--no-plot", action="store_true", help="do not write calibration.png")


def _summary(document, out) -> str:
    cal = document["calibration"]
    pattern = document["pattern"]
    base, loss, uniform = cal["baseline_loss"], cal["loss"], cal["uniform"]
    lines = [
        f"wrote {out}: {pattern} ({pattern.count('F')}/{len(pattern)} F)",
        f"calibration loss: all-F {base:.4f}, greedy {loss:.4f} ({100 * (loss - base) / base:+.2f}%),"
        f" uniform {uniform['pattern']} {uniform['loss']:.4f} ({100 * (uniform['loss'] - base) / base:+.2f}%)",
        f"layer-forwards: {cal['layer_forwards']} (naive search: {cal['naive_layer_forwards']},"
        f" {cal['layer_forwards'] / max(1, cal['naive_layer_forwards']):.2f}x); {cal['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def run(args) -> int:
    import os
    from pathlib import Path

    from ..calibration.run import calibrate
    from ..calibration.session import check_positive, load_backend, load_data
    from ..errors import UsageError
    from ..model_info import load_model_info

    if not args.model and not args.url:
        raise UsageError("give --model DIR (in-process search) or --url URL --model DIR (SGLang server)")
    if args.url and not args.model:
        raise UsageError("--url needs --model DIR too: the checkpoint directory the server runs, for the"
                         " tokenizer and the pattern file's fingerprint (no weights are loaded)")
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep must be in (0, 1], got {args.keep}")
    check_positive("--screen-batches", args.screen_batches)
    check_positive("--screen-top", args.screen_top)
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give a file name such as pattern.json")
    info = load_model_info(args.model)
    if args.url:
        from transformers import AutoConfig, AutoTokenizer

        from ..calibration.server_backend import ServerBackend

        backend = ServerBackend(args.url, api_key=args.api_key or os.environ.get("INDEXCACHE_API_KEY"),
                                num_layers=info.num_dsa_layers)
        tokenizer, config = AutoTokenizer.from_pretrained(args.model), AutoConfig.from_pretrained(args.model)
    else:
        backend = load_backend(args.model, threads=args.threads)
        tokenizer, config = backend.tokenizer, backend.config
    blocks = load_data(args, tokenizer, config)
    document = calibrate(backend, blocks, info, args.keep, args.out, resume=args.resume,
                         batch_size=args.batch_size, screen_batches=args.screen_batches,
                         screen_top=args.screen_top, plot=not args.no_plot)
    print(_summary(document, args.out))
    return 0
