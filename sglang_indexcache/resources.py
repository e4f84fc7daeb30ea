"""The package's data: the SGLang patch series, the embedded model and the GPU pins.

In an installed wheel they are package data under ``sglang_indexcache/data/`` (pyproject.toml maps
the repository's ``patches/``, ``models/`` and ``requirements/`` there, as it maps ``kernels/`` and
``calibration/``); in a checkout (editable install, or the source tree on ``PYTHONPATH``) they are
those folders of the repository, beside the package. Both are found from
``importlib.resources.files`` of this package, never from the working directory.

``--model NAME`` of every verb goes through :func:`model_dir`: a directory, or the name of an
embedded model (``tiny-glm-dsa``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import ModelDirError

DATA_FOLDERS = ("patches", "models", "requirements")
EMBEDDED_MODELS = ("tiny-glm-dsa",)


def data_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`DATA_FOLDERS`) of the installed package or the checkout."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; one of {DATA_FOLDERS}")
    package = Path(str(importlib.resources.files(__package__)))
    installed = package / "data" / name
    return installed if installed.is_dir() else package.parent / name


def embedded_model(name: str = EMBEDDED_MODELS[0]) -> Path:
    """The directory of an embedded model (HF format, with its held-out texts in ``data/``)."""
    return data_dir("models") / name


def model_dir(text: str) -> str:
    """A ``--model`` argument: an existing path as given, else the name of an embedded model.

    A path that exists always wins (``./tiny-glm-dsa`` names a local folder even when it is also an
    embedded model's name); anything else is returned unchanged for the model reader to refuse.
    """
    if Path(text).exists() or text not in EMBEDDED_MODELS:
        return text
    path = embedded_model(text)
    if not (path / "config.json").is_file():
        raise ModelDirError(f"the embedded model {text} is missing from this installation ({path})")
    return str(path)
