"""Check a pattern (string, ``every-N``, ``all-F`` or pattern file) against a model directory.

Checks the layer count, layer 0, that every F layer has indexer weights in the checkpoint, and for
a pattern file its format and model fingerprint. Prints one summary line; exit 2 if invalid. A
config-only checkpoint (no safetensors: ``make-checkpoint --weights none``, for SGLang's
``--load-format dummy``) is checked on everything its config decides, and a second line says that
the indexer weights were not checked.
"""

from __future__ import annotations

from .. import pattern as pat
from .. import pattern_file
from ..model_info import load_model_info
from ..validation import check_against_model
from .options import add_model


def add_arguments(parser):
    parser.add_argument("pattern", metavar="PATTERN|FILE", help="pattern, every-N, all-F or a pattern file")
    add_model(parser)


def run(args) -> int:
    model = load_model_info(args.model, weights="if-present")
    pattern, strides = pattern_file.resolve_with_strides(args.pattern, model.num_dsa_layers, model)
    pattern = check_against_model(pattern, model)
    stride = f"; decode stride {pat.describe_strides(pattern, strides)}" if strides else ""
    print(f"valid for {model.architecture} ({model.num_dsa_layers} DSA layers): {pat.describe(pattern)}{stride}")
    if not model.weights_checked:
        print(f"indexer weights not checked: {model.weights_note}")
    return 0
