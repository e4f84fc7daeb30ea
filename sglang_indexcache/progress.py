"""Progress bars: tqdm on a TTY, nothing when output is piped or ``--quiet`` is given."""

from __future__ import annotations

import sys

QUIET = False


def enabled() -> bool:
    return not QUIET and sys.stderr.isatty()


def bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not enabled())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
