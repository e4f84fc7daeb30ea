"""``indexcache`` command line: thin over library functions; prints and sets exit codes.

Exit 0 on success, 2 on bad input (one line on stderr, no traceback), 1 on internal error.
Each verb lives in ``sglang_indexcache.commands.<verb>`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, transformers) happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import traceback

from . import __version__, progress
from .errors import UsageError

DESCRIPTION = (
    "IndexCache for DeepSeek-Sparse-Attention models served with SGLang: find which layers keep their"
    " lightning indexer (calibrate, distill), check and evaluate such patterns, patch SGLang and serve"
    " with one. `indexcache demo` shows it end to end on the embedded model; `indexcache VERB --help`"
    " explains each verb."
)
VERBS = {
    "pattern": ("pattern_cmd", "print a canonical pattern or an engine's flag for it"),
    "validate": ("validate", "check a pattern or pattern file against a model"),
    "eval": ("eval_cmd", "LM loss of a model under one or more patterns"),
    "overlap": ("overlap", "cross-layer top-k overlap matrix and heatmap"),
    "calibrate": ("calibrate", "greedy search for the F layers (training-free IndexCache)"),
    "distill": ("distill", "train the F layers' indexers with the multi-layer distillation loss"),
    "bench": ("bench", "prefill/decode/kernel speed tables"),
    "serve": ("serve", "launch the patched SGLang server with a pattern"),
    "apply-patches": ("patches", "apply the SGLang patch series to an SGLang checkout or installed package"),
    "revert-patches": ("patches", "revert the SGLang patch series (byte for byte)"),
    "check-patches": ("patches", "check the patch series (and whether DIR is patched)"),
    "demo": ("demo", "calibrate, evaluate and analyse the embedded model end to end (make demo)"),
    "train-tiny": ("train_tiny", "train the embedded tiny GlmMoeDsa model"),
    "make-checkpoint": ("make_checkpoint", "GLM-5-attention DSA checkpoint at real shapes, random weights"),
    "gpu-bundle": ("gpu_bundle", "offline wheel bundle for an air-gapped GPU host"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _global_flags(parser, default=False) -> None:
    """``--quiet`` and ``--verbose``, accepted before the verb and after it (at every level)."""
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="no progress bars or progress lines")
    parser.add_argument("--verbose", action="store_true", default=default, help="debug logging")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _global_flags(sub, argparse.SUPPRESS)  # the verb's copy keeps the top level's value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="indexcache", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sglang-indexcache {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True
    for verb, (module_name, help_text) in VERBS.items():
        qualified = f"{__package__}.commands.{module_name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        module = importlib.import_module(qualified)
        sub = verbs.add_parser(verb, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    _global_flags(parser)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        progress.QUIET = args.quiet
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"indexcache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # errors.Interrupted carries what was kept and how to go on
        print(f"indexcache: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # internal error: keep the traceback, it is a bug
        traceback.print_exc()
        print(f"indexcache: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
