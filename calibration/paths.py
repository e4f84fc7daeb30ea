"""Files of a calibration run beside its pattern file (torch-free, so the CLI checks them first)."""

from __future__ import annotations

from pathlib import Path


def state_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".state.json")


def plot_path(out) -> Path:
    """The loss-curve plot written beside the pattern file: ``p.json`` -> ``p.calibration.png``."""
    out = Path(out)
    return out.with_name(out.stem + ".calibration.png")
