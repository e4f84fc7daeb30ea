"""Print the canonical F/S pattern (or the flag that gives it to an engine).

Examples: ``indexcache pattern --every 4 --layers 8`` (or ``indexcache pattern every-4 --layers 8``)
prints FSSSFSSS; ``indexcache pattern all-F --layers 4`` prints FFFF;
``indexcache pattern --every 4 --layers 8 --from-engine-freq sglang`` prints FFSSSFSS, what stock
SGLang 0.5.23 really selects for ``index_topk_freq=4``.
"""

from __future__ import annotations

from .. import pattern as pat
from ..errors import UsageError


def add_arguments(parser):
    parser.add_argument("pattern", nargs="?", help="a pattern such as FSSSFSSS (case-insensitive), or every-N / all-F with --layers")
    parser.add_argument("--layers", type=int, help="number of DSA layers of the model")
    parser.add_argument("--every", type=int, metavar="N", help="uniform pattern: layer i is F iff i %% N == 0")
    parser.add_argument("--engine", choices=pat.ENGINES, help="print the engine's flag for the pattern")
    parser.add_argument(
        "--from-engine-freq", choices=pat.ENGINES, metavar="ENGINE",
        help="read --every N as ENGINE's index_topk_freq and print the pattern it really selects",
    )
    parser.add_argument("--offset", type=int, help="index_skip_topk_offset, with --from-engine-freq")


def _shorthand(args) -> None:
    """Turn ``every-N`` into ``--every N`` and ``all-F`` into ``--every 1`` (both need --layers)."""
    text = args.pattern.strip()
    short = pat.shorthand(text)
    if short is None:
        pat.refuse_shorthand_lookalike(text)
        return
    if args.every is not None:
        raise UsageError(f"give either {text} or --every N, not both")
    if args.layers is None:
        raise UsageError(f"{text} needs --layers L (the model's number of DSA layers)")
    args.every, args.pattern = short[1], None


def run(args) -> int:
    if args.pattern is not None:
        _shorthand(args)
    if (args.pattern is None) == (args.every is None):
        raise UsageError("give either a PATTERN or --every N (with --layers L)")
    if args.offset is not None and args.from_engine_freq is None:
        raise UsageError("--offset only applies with --from-engine-freq")
    if args.pattern is not None:
        if args.from_engine_freq:
            raise UsageError("--from-engine-freq needs --every N, not a PATTERN")
        pattern = pat.parse(args.pattern)
        pattern = pat.validate(pattern, args.layers if args.layers is not None else len(pattern))
    else:
        if args.layers is None:
            raise UsageError("--every needs --layers L (the model's number of DSA layers)")
        if args.from_engine_freq:
            pattern = pat.from_engine_freq(args.from_engine_freq, args.layers, args.every, args.offset)
        else:
            pattern = pat.uniform(args.layers, args.every)
    print(pat.export(pattern, args.engine) if args.engine else pattern)
    return 0
