"""Checks every verb shares, run before any heavy import: numeric flags and output paths.

Numeric flags use the argparse types below, so a bad value is refused while the command line is
parsed (one line, exit 2, before torch is imported). Outputs go through :func:`check_output`:
nothing is ever written into an input (the model, the data, a pattern file), not even with
``--force``, which only lets a command replace an earlier output; a folder that holds a saved,
resumable run is continued with ``--resume``; writability is tested by writing, before any work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .. import checks
from ..calibration import session
from ..errors import UsageError

FORCE_HELP = "replace an existing output (a file, or a non-empty folder); never an input (default: refused)"


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, refused as ``must be WHAT, got X`` (:mod:`..checks`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        problem = checks.int_problem(value, low, what)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


positive_int = _int_at_least(1, checks.POSITIVE)
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def model_dir(text: str) -> str:
    """An argparse type for ``--model``: a checkpoint directory or an embedded model's name."""
    from ..resources import model_dir as resolve

    try:
        return resolve(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model(parser, required: bool = True, what: str = "HF-format DSA checkpoint directory") -> None:
    """``--model DIR``, shared by every verb that reads a checkpoint (one resolver: :func:`model_dir`)."""
    from ..resources import EMBEDDED_MODELS

    parser.add_argument("--model", required=required, type=model_dir, metavar="DIR",
                        help=f"{what}, or {' / '.join(EMBEDDED_MODELS)} (the embedded model)")


def int_list(text: str, what: str) -> list[int]:
    """Comma-separated positive integers, ``4k`` = 4096: ``"32k,200000"`` -> ``[32768, 200000]``.

    Refused as :class:`UsageError` (one line, exit 2) naming ``what`` (the flag)."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise UsageError(f"{what}: {part!r} is not an integer (give e.g. 4096,8192 or 4k,8k)") from None
        if value <= 0:
            raise UsageError(f"{what} must be positive, got {value}")
        values.append(value)
    return values


def add_force(parser) -> None:
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_writable(flag: str, path: Path) -> None:
    """Refuse ``path`` unless a file can be created in its nearest existing folder: tested by
    creating (and removing) one, since permission bits do not tell (root on /sys, read-only mounts)."""
    for parent in (path, *path.parents):
        if not parent.exists():
            continue
        if parent != path and not parent.is_dir():
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        if parent == path and not parent.is_dir():
            continue  # an existing output file: what matters is its folder
        try:
            fd, probe = tempfile.mkstemp(prefix=".indexcache-write-test.", dir=parent)
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot write in {parent} ({exc.strerror.lower()})") from None
        os.close(fd)
        os.unlink(probe)
        return


def _check_inputs(flag: str, path: Path, target: Path, inputs, protected, force: bool, kind: str) -> None:
    inputs = sorted((Path(source).resolve() for source in inputs), key=lambda source: source != target)
    for source in inputs:  # the input the output is, named first; then folders it lies in
        if source.exists() and _inside(target, source):
            what = "is" if target == source else "lies inside"
            raise UsageError(f"{flag} {path} {what} the input {source}: choose another place"
                             " (--force never writes into an input)")
        if force and kind == "dir" and source.exists() and _inside(source, target):
            raise UsageError(f"{flag} {path} holds the input {source}: --force would write beside it;"
                             " choose another folder")
    for source in protected:
        source = Path(source).resolve()
        if source.exists() and _inside(target, source) and not force:
            what = "is" if target == source else "lies inside"
            raise UsageError(f"{flag} {path} {what} {source}, which only --force replaces: choose another place")


def check_output(flag: str, path, kind: str, force: bool = False, inputs=(), resume: bool = False,
                 protected=(), saved_state=None) -> Path:
    """Refuse an output that cannot be written or would overwrite something, before any work.

    ``kind`` is ``"dir"`` (a folder the command fills) or ``"file"``. ``inputs``: paths the command
    reads (model folder, data, pattern file): the output may never be one of them or lie inside one,
    and with ``force`` an output folder may not hold one. ``protected``: paths the command does not
    read but that only ``force`` may replace (the shipped model). ``saved_state``: the file in which
    an interrupted run of this command left its progress: without ``resume`` it is refused, naming
    ``--resume`` (``force`` does not throw it away). An existing file, or an existing non-empty
    folder, is refused unless ``force`` (or ``resume``: continuing a run there). Nothing is left
    behind by the checks.
    """
    path = Path(path)
    target = path.resolve()
    _check_inputs(flag, path, target, [i for i in inputs if i is not None], protected, force, kind)
    if saved_state is not None and not resume and Path(saved_state).is_file():
        raise UsageError(f"{flag} {path} holds a saved run ({saved_state}): pass --resume to continue it,"
                         f" or delete {saved_state} to start over, or choose another place")
    if kind == "dir":
        if target.exists() and not target.is_dir():
            raise UsageError(f"{flag} {path} exists and is a file, not a folder")
        if target.is_dir() and any(target.iterdir()) and not (force or resume):
            raise UsageError(f"{flag} {path} exists and is not empty: choose a new folder"
                             " (or pass --force to write into it)")
    else:
        if target.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / 'pattern.json'}")
        if target.exists() and not (force or resume):
            raise UsageError(f"{flag} {path} exists: choose a new name (or pass --force to overwrite it)")
    _check_writable(flag, target)
    return path


def add_data_arguments(parser, max_tokens: int | None) -> None:
    """``--data --text-field --seq-len --max-tokens --seed --batch-size --threads`` (eval, overlap, calibrate)."""
    parser.add_argument("--data", required=True, metavar="SRC",
                        help="local .txt/.jsonl/.parquet file or folder (read with datasets), or a hub dataset")
    parser.add_argument("--text-field", default="text", metavar="F", help="column holding the text (default: text)")
    parser.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                        help=f"tokens per block (default: {session.DEFAULT_SEQ_LEN}, at most the model's max positions)")
    parser.add_argument("--max-tokens", type=positive_int, default=max_tokens, metavar="N",
                        help=f"use at most N tokens of the data (default: {max_tokens or 'all'})")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                        help="shuffle the documents with seed N before taking --max-tokens (default: 0)")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="blocks per forward (default: 4)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: 1 when the machine is busy, i.e. load average"
                             " >= cores - 1, else torch's)")
