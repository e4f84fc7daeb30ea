"""Greedy search for the F layers (training-free IndexCache) on a calibration set.

Starts from all F and, step by step, makes S the layer whose loss of its indexer costs least in LM
loss, until round(keep * N) F layers remain. With --model the search runs in-process with exact
prefix reuse (each candidate is evaluated from its own layer onwards); with --url it drives a
patched SGLang server in calibration mode (whole forwards through /generate prompt log-probs; give
--model too, for the tokenizer and the pattern file's fingerprint: only config.json, tokenizer and
safetensors headers are read). Writes a pattern file, its loss plot beside it (p.json ->
p.calibration.png), and after every step (and every few seconds inside one) OUT.state.json, from
which --resume continues an interrupted run; --max-seconds S stops there on purpose. An existing
--out is refused unless --force. About 2 minutes for the embedded model with the defaults on 2 idle
CPU cores (docs/cli.md).

With --stride-target T (instead of --keep) and --pattern P, the same search chooses per-layer decode
strides over the fixed pattern P: one F layer's stride raised per step (1, 2, 4, ... --max-stride)
until the effective stride reaches T; the file written is P's with ``decode_stride`` added
(in-process only: the server does not reuse top-k across decode steps yet).
"""

from __future__ import annotations

from .. import pattern as pat
from .options import add_data_arguments, add_force, add_model, check_output, positive_float, positive_int

SCREEN_TOP = 3
DEFAULT_CALIBRATION_TOKENS = 8192  # the demo's: minutes on 2 CPU cores (the cost grows with N^2 candidates)


def add_arguments(parser):
    add_model(parser, required=False)
    parser.add_argument("--url", metavar="URL", help="patched SGLang server in calibration mode")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help="the server's API/admin key (default: $INDEXCACHE_API_KEY)")
    add_data_arguments(parser, DEFAULT_CALIBRATION_TOKENS)
    parser.add_argument("--keep", type=_keep, metavar="RATIO",
                        help="share of indexers to keep, e.g. 0.25 (round(keep * N) F layers, at least 1)")
    parser.add_argument("--stride-target", type=positive_float, metavar="T",
                        help="instead of --keep: choose per-layer decode strides over --pattern until the"
                             " effective stride (harmonic mean over F layers) reaches T")
    parser.add_argument("--pattern", metavar="P",
                        help="with --stride-target: the fixed F/S pattern (all-F, every-N, a string or a pattern file)")
    parser.add_argument("--max-stride", type=positive_int, default=8, metavar="N",
                        help="with --stride-target: the largest stride a layer may get (default: 8; levels 1, 2, 4, ...)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="pattern file to write (.json); refused if it exists, unless --force")
    parser.add_argument("--resume", action="store_true", help="continue from FILE.state.json")
    parser.add_argument("--screen-batches", type=positive_int, default=None, metavar="N",
                        help="speed-up that may change the result: rank candidates on the first N batches,"
                             " re-score the best --screen-top on all")
    parser.add_argument("--screen-top", type=positive_int, default=None, metavar="M",
                        help=f"finalists per step, with --screen-batches (default: {SCREEN_TOP})")
    parser.add_argument("--max-seconds", type=positive_float, default=None, metavar="S",
                        help="stop after about S seconds (at an evaluation boundary), the state saved:"
                             " --resume continues, re-using the candidates already scored")
    parser.add_argument("--in-flight", type=positive_int, default=1, metavar="N",
                        help="with --url: /generate requests of one candidate kept in flight (default: 1)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot (OUT stem + .calibration.png)")
    add_force(parser)


def _keep(text: str) -> float:
    import argparse

    try:
        keep = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < keep <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return keep


def check_arguments(args) -> None:
    """Every check that needs no model weights and no torch: flags, the model's headers, --out."""
    from ..calibration.paths import plot_path, state_path
    from ..errors import UsageError

    if not args.model and not args.url:
        raise UsageError("give --model DIR (in-process search) or --url URL --model DIR (SGLang server)")
    _check_search_kind(args)
    if args.url and not args.model:
        raise UsageError("--url needs --model DIR too: the checkpoint directory the server runs, for the"
                         " tokenizer and the pattern file's fingerprint (no weights are loaded)")
    if args.in_flight != 1 and not args.url:
        raise UsageError("--in-flight only applies with --url (requests to an SGLang server)")
    if args.screen_top is not None and args.screen_batches is None:
        raise UsageError("--screen-top only applies with --screen-batches N")
    if not args.resume and state_path(args.out).exists():
        raise UsageError(f"{state_path(args.out)} holds an interrupted search: pass --resume to continue it,"
                         " or delete it")
    if args.resume and not state_path(args.out).is_file():
        raise UsageError(f"--resume: there is no interrupted search to continue ({state_path(args.out)}"
                         " does not exist); run without --resume to start one")
    from ..calibration.data import check_source

    inputs = (args.model, args.data)
    check_output("--out", args.out, "file", force=args.force, inputs=inputs)
    if not args.no_plot:
        check_output("--out", plot_path(args.out), "file", force=args.force, inputs=inputs)
    check_source(args.data)


def _check_search_kind(args) -> None:
    from ..errors import UsageError

    if (args.keep is None) == (args.stride_target is None):
        raise UsageError("give --keep RATIO (which layers keep their indexer) or --stride-target T"
                         " with --pattern P (decode strides), one of them")
    if args.stride_target is None:
        if args.pattern is not None or args.max_stride != 8:
            raise UsageError("--pattern and --max-stride only apply with --stride-target")
        return
    if args.pattern is None:
        raise UsageError("--stride-target needs --pattern P: the F/S pattern whose F layers get strides")
    if args.url:
        raise UsageError("--stride-target runs in-process only (--model without --url): the server does not"
                         " reuse top-k across decode steps yet")
    if not 1.0 <= args.stride_target <= args.max_stride:
        raise UsageError(f"--stride-target must be between 1 and --max-stride {args.max_stride},"
                         f" got {args.stride_target:g}")


def _stride_summary(document, out) -> str:
    cal, pattern = document["decode_stride_calibration"], document["pattern"]
    base, loss, uniform = cal["baseline_loss"], cal["loss"], cal["uniform"]
    strides = document["decode_stride"]
    lines = [f"wrote {out}: {pattern}, decode stride {pat.describe_strides(pattern, strides)} on the F layers"
             f" (effective {cal['effective_stride']:.2f})",
             f"calibration loss: stride 1 {base:.4f}, greedy {loss:.4f} ({100 * (loss - base) / base:+.2f}%)"
             + (f", uniform stride {cal['stride_target']:g} {uniform['loss']:.4f}"
                f" ({100 * (uniform['loss'] - base) / base:+.2f}%)" if uniform else ""),
             f"layer-forwards: {cal['layer_forwards']} (naive search: {cal['naive_layer_forwards']}); {cal['seconds']:.1f} s"]
    return "\n".join(lines)


def _summary(document, out) -> str:
    cal = document["calibration"]
    pattern = document["pattern"]
    base, loss, uniform = cal["baseline_loss"], cal["loss"], cal["uniform"]
    lines = [
        f"wrote {out}: {pattern} ({pat.kept(pattern)}/{len(pattern)} F)",
        f"calibration loss: all-F {base:.4f}, greedy {loss:.4f} ({100 * (loss - base) / base:+.2f}%),"
        f" uniform {uniform['pattern']} {uniform['loss']:.4f} ({100 * (uniform['loss'] - base) / base:+.2f}%)",
        f"layer-forwards: {cal['layer_forwards']} (naive search: {cal['naive_layer_forwards']},"
        f" {cal['layer_forwards'] / max(1, cal['naive_layer_forwards']):.2f}x); {cal['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def run(args) -> int:
    import os

    from ..model_info import load_model_info

    check_arguments(args)
    info = load_model_info(args.model)
    from ..calibration.paths import state_path
    from ..calibration.recorder import SearchStopped

    if args.stride_target is not None:  # a bad pattern is refused before the weights are loaded
        from .. import pattern_file
        from ..validation import check_against_model

        check_against_model(pattern_file.resolve(args.pattern, info.num_dsa_layers, info), info)
    from ..calibration.run import calibrate
    from ..calibration.session import load_backend, load_data, load_server_backend

    if args.url:
        backend, tokenizer, config = load_server_backend(
            args.url, args.model, info.num_dsa_layers, api_key=args.api_key or os.environ.get("INDEXCACHE_API_KEY"),
            in_flight=args.in_flight)
    else:
        backend = load_backend(args.model, threads=args.threads)
        tokenizer, config = backend.tokenizer, backend.config
    blocks = load_data(args, tokenizer, config)
    common = dict(resume=args.resume, batch_size=args.batch_size, screen_batches=args.screen_batches,
                  screen_top=args.screen_top or SCREEN_TOP, plot=not args.no_plot, max_seconds=args.max_seconds)
    try:
        if args.stride_target is not None:
            from ..calibration.stride_search import calibrate_stride

            document = calibrate_stride(backend, blocks, info, args.pattern, args.stride_target, args.out,
                                        max_stride=args.max_stride, **common)
            print(_stride_summary(document, args.out))
            return 0
        document = calibrate(backend, blocks, info, args.keep, args.out, **common)
    except SearchStopped as stop:
        print(f"{stop} (--max-seconds {args.max_seconds:g}); the search state is in {state_path(args.out)}:"
              " run the same command with --resume to continue")
        return 0
    except KeyboardInterrupt:
        from ..errors import Interrupted

        saved = state_path(args.out)
        raise Interrupted(f"the search so far is saved in {saved}: the same command with --resume continues it"
                          if saved.is_file() else "") from None
    print(_summary(document, args.out))
    return 0
