"""Checks of plain values that the library and the command line share (one home for each):
positive integers and devices.

The library raises :class:`~sglang_indexcache.errors.UsageError` naming the flag or field;
``commands/options.py`` turns the same checks into argparse types, so a bad flag is refused while
the command line is parsed, with the same words.
"""

from __future__ import annotations

from .errors import UsageError

POSITIVE = "a positive integer"


def int_problem(value, low: int = 1, what: str = POSITIVE) -> str | None:
    """Why ``value`` is not an integer >= ``low`` (``"must be WHAT, got V"``), or None when it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return f"must be {what}, got {value!r}"
    return None


def positive_int(value, name: str, error=UsageError) -> int:
    """``value`` when it is an int >= 1 (a bool is not); else ``error("NAME must be a positive integer, got V")``."""
    problem = int_problem(value)
    if problem:
        raise error(f"{name} {problem}")
    return value


def positive_ints(values: dict, error=UsageError) -> None:
    """:func:`positive_int` for each ``{name: value}``; ``None`` values (not given) are skipped."""
    for name, value in values.items():
        if value is not None:
            positive_int(value, name, error)


def torch_device(name: str, flag: str = "--device", need: str = ""):
    """The ``torch.device`` that ``name`` names on this machine: the one device check.

    ``name``: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (CUDA when there is one, else the CPU).
    Anything else, and CUDA where there is none, is a :class:`UsageError` naming ``flag``; ``need``
    is appended to the no-CUDA message (why the command needs one). torch is imported only here.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"{flag} {name!r}: {exc}") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA device is available here{need}")
    return device
