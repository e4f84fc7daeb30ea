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


def run(args) -> int:
    from .. import pattern_file
    from ..calibration import pattern_losses
    from ..calibration.session import load_backend, load_data
    from ..model_info import load_model_info

    from ..calibration.data import check_source

    info = load_model_info(args.model)
    for spec in args.pattern:  # refuse a bad spec before loading anything heavy
        pattern_file.resolve(spec, info.num_dsa_layers, info)
    check_source(args.data)
    backend = load_backend(args.model, threads=args.threads)
    blocks = load_data(args, backend.tokenizer, backend.config)
    results = pattern_losses.evaluate(backend, blocks, args.pattern, info, args.batch_size, args.decode_stride)
    if args.json:
        keys = ("pattern", "decode_stride", "loss", "tokens")
        print(json.dumps({"results": [{k: r[k] for k in keys} for r in results]}))
    else:
        print(f"{info.path} on {args.data}: {blocks.tokens} tokens, LM loss in nats/token")
        print(pattern_losses.format_table(results))
    return 0
