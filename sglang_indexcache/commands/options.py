"""Checks every verb shares, run before any heavy import: numeric flags and output paths.

Numeric flags use the argparse types below, so a bad value is refused while the command line is
parsed (one line, exit 2, before torch is imported). Outputs go through :func:`check_output`:
nothing is written into an input (the model, the data) or over an existing output unless the user
passes ``--force``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError

FORCE_HELP = "write even if the output exists and is not empty, or lies inside an input (default: refused)"


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, refused as ``must be WHAT, got X``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


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


def _writable_parent(flag: str, path: Path) -> None:
    """Refuse ``path`` if a parent is a file or the nearest existing parent is not writable."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: cannot write in {parent} (permission denied)")
            return


def check_output(flag: str, path, kind: str, force: bool = False, inputs=(), resume: bool = False) -> Path:
    """Refuse an output that cannot be written or would overwrite something, before any work.

    ``kind`` is ``"dir"`` (a folder the command fills) or ``"file"``. ``inputs``: paths the command
    reads (model folder, data file); the output may not be one of them or lie inside one unless
    ``force``. An existing file, or an existing non-empty folder, is refused unless ``force`` (or
    ``resume``: continuing a run there, which never allows writing into an input). Nothing is created.
    """
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if source.exists() and _inside(target, source) and not force:
            what = "is" if target == source else "lies inside"
            raise UsageError(f"{flag} {path} {what} the input {source}: choose another place"
                             " (or pass --force to write there)")
    _writable_parent(flag, target)
    if kind == "dir":
        if target.exists() and not target.is_dir():
            raise UsageError(f"{flag} {path} exists and is a file, not a folder")
        if target.is_dir():
            if not os.access(target, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: cannot write in it (permission denied)")
            if any(target.iterdir()) and not (force or resume):
                raise UsageError(f"{flag} {path} exists and is not empty: choose a new folder"
                                 " (or pass --force to write into it)")
    else:
        if target.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / 'pattern.json'}")
        if target.exists() and not (force or resume):
            raise UsageError(f"{flag} {path} exists: choose a new name (or pass --force to overwrite it)")
    return path
