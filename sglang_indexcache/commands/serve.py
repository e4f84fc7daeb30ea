"""Launch the patched SGLang server with an IndexCache pattern.

indexcache serve --model DIR --pattern-file FILE [--calibration] [--decode-stride N] [--dry-run] [-- SGLANG ARGS]

Checks the pattern file against the checkpoint and that the SGLang found by this Python carries our
patch set, prints the command, then (unless --dry-run, which runs every check) replaces this process with
``python -m sglang.launch_server --model-path DIR --index-cache-pattern-file FILE ... SGLANG ARGS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from ..errors import UsageError
from .options import add_model, positive_int


def add_arguments(parser) -> None:
    add_model(parser)
    parser.add_argument("--pattern-file", help="indexcache-pattern/v1 file (see `indexcache calibrate`)")
    parser.add_argument("--calibration", action="store_true",
                        help="calibration mode: every indexer loaded, /index_cache endpoints, no CUDA graphs")
    parser.add_argument("--decode-stride", type=positive_int, metavar="N",
                        help="F layers refresh their top-k every N decode steps (--index-cache-decode-stride N;"
                             " default: the pattern file's decode_stride, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="run every check (checkpoint, pattern file, SGLang installed and patched),"
                             " print the command and exit")
    parser.add_argument("sglang_args", nargs=argparse.REMAINDER, help="after --: passed to sglang.launch_server")


def patched_sglang_dir() -> Path:
    """The SGLang package this interpreter would import, refused unless our patch set is applied."""
    from ..sglang_overlay import patchset

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("SGLang is not installed for this Python; pip install sglang==0.5.23, then"
                         " indexcache apply-patches <its site-packages>")
    package = Path(list(spec.submodule_search_locations)[0])
    target, patches = patchset.prepare(package.parent)
    if patchset.status(target, patches) != "applied":
        raise UsageError(f"SGLang at {package} is not patched: indexcache apply-patches {package.parent}")
    return package


def build_command(args) -> list[str]:
    from ..model_info import load_model_info
    from ..pattern_file import check_matches, read

    extra = list(args.sglang_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    info = load_model_info(args.model, weights=weights_mode(extra))
    if not info.weights_checked:
        print(f"indexer weights not checked: {info.weights_note}", file=sys.stderr)
    if not args.pattern_file and not args.calibration:
        raise UsageError("give --pattern-file FILE (or --calibration to choose a pattern at run time)")
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model)]
    if args.pattern_file:
        check_matches(read(args.pattern_file), info, source=f"pattern file {args.pattern_file}")
        command += ["--index-cache-pattern-file", str(args.pattern_file)]
    if args.calibration:
        command.append("--index-cache-calibration")
    if args.decode_stride is not None:
        command += ["--index-cache-decode-stride", str(args.decode_stride)]
    return command + extra


def weights_mode(sglang_args) -> str:
    """``load_model_info``'s ``weights`` for the server's ``--load-format`` (the same rule as the
    patched server's: docs/sglang.md)."""
    from ..sglang_overlay.settings import WEIGHTLESS_LOAD_FORMATS

    load_format = None
    for i, arg in enumerate(sglang_args):
        if arg == "--load-format" and i + 1 < len(sglang_args):
            load_format = sglang_args[i + 1]
        elif arg.startswith("--load-format="):
            load_format = arg.split("=", 1)[1]
    return "skip" if load_format in WEIGHTLESS_LOAD_FORMATS else "if-present"


def run(args) -> int:
    command = build_command(args)
    patched_sglang_dir()
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    os.execv(command[0], command)
    return 0  # not reached
