"""Pattern files (``"format": "indexcache-pattern/v1"``) and pattern specs given on command lines.

A spec is ``all-F``, ``every-N``, a pattern string, or the path of a pattern file. A file may carry
``decode_stride`` (optional, one positive integer per layer, F layers' entries used; absent = 1
everywhere, as in files written before it existed): :func:`resolve_with_strides` returns it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from . import __version__
from . import pattern as pat
from .atomic import atomic_write_text
from .errors import PatternError, PatternFileError
from .model_info import ModelInfo

FORMAT = "indexcache-pattern/v1"
METHODS = ("greedy", "uniform", "distilled", "manual")
WEIGHT_FIELDS = ("indexer_weights", "indexer_layers")  # fingerprint fields read from the safetensors


def make_document(pattern: str, model: ModelInfo, method: str = "manual", decode_stride=None,
                  **calibration) -> dict:
    """Build a v1 document; ``calibration`` holds keep_ratio, data, baseline_loss, loss, steps...;
    ``decode_stride`` (optional) the per-layer strides."""
    if method not in METHODS:
        raise PatternFileError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    pattern = pat.validate(pattern, model.num_dsa_layers)
    model_block = model.summary()
    model_block["fingerprint"] = model.fingerprint()
    model_block["fingerprint_fields"] = model.fingerprint_fields()
    document = {
        "format": FORMAT,
        "pattern": pattern,
        "model": model_block,
        "calibration": {"method": method, **calibration},
        "created_by": f"sglang-indexcache {__version__}",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if decode_stride is not None:
        document["decode_stride"] = pat.validate_strides(decode_stride, model.num_dsa_layers)
    return document


def write(path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def read(path) -> dict:
    """Read and check a pattern file's structure (not yet against a model)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "pattern.json"
        hint = f" (the pattern file inside it is {inside})" if inside.is_file() else ""
        raise PatternFileError(f"pattern file {path} is a directory, not a pattern file{hint}")
    if not path.is_file():
        raise PatternFileError(f"pattern file {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PatternFileError(f"pattern file {path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PatternFileError(f"pattern file {path} is not valid JSON (corrupt or truncated): {exc}") from exc
    if not isinstance(document, dict):
        raise PatternFileError(f"pattern file {path} must hold a JSON object")
    fmt = document.get("format")
    if fmt != FORMAT:
        raise PatternFileError(f"pattern file {path} has format {fmt!r}; only {FORMAT!r} is understood")
    for key, kind in (("pattern", str), ("model", dict)):
        if not isinstance(document.get(key), kind):
            raise PatternFileError(f"pattern file {path} lacks a valid {key!r} entry")
    model = document["model"]
    try:
        document["pattern"] = pat.validate(document["pattern"], model.get("num_dsa_layers"))
        if "decode_stride" in document:
            pat.validate_strides(document["decode_stride"], model.get("num_dsa_layers"))
    except PatternError as exc:
        raise PatternFileError(f"pattern file {path}: {exc}") from exc
    if not isinstance(model.get("fingerprint"), str):
        raise PatternFileError(f"pattern file {path} lacks model.fingerprint")
    return document


def check_matches(document: dict, model: ModelInfo, source="pattern file") -> None:
    """Refuse a document made for another model, naming the first field that differs."""
    recorded = document["model"]
    current = model.summary()
    for key, value in current.items():
        if key in recorded and recorded[key] != value:
            raise PatternFileError(
                f"{source} was made for another model: {key} is {recorded[key]!r} in the file"
                f" but {value!r} in {model.path}"
            )
    if recorded["fingerprint"] == model.fingerprint():
        return
    fields = recorded.get("fingerprint_fields") or {}
    for key, value in model.fingerprint_fields().items():
        if key in WEIGHT_FIELDS and not model.weights_checked:
            continue
        if key in fields and fields[key] != value:
            raise PatternFileError(
                f"{source} fingerprint does not match {model.path}: {key} is {fields[key]!r} in the"
                f" file but {value!r} in the model"
            )
    if not model.weights_checked:
        return  # the config agrees; the weights' part of the fingerprint needs weights to compare
    raise PatternFileError(
        f"{source} fingerprint {recorded['fingerprint']} does not match {model.path}"
        f" ({model.fingerprint()}): its config or indexer weight names/shapes differ"
    )


def looks_like_file(spec: str) -> bool:
    """A spec that names a path (``read`` then says what is wrong with it), not a pattern string."""
    return spec.endswith(".json") or os.sep in spec or Path(spec).exists()


def parse_spec(spec: str) -> tuple[str, object]:
    """The one reading of a command-line pattern spec, before any model is known.

    Returns ``("all-F", 1)``, ``("every", N)``, ``("file", path)`` or ``("pattern", text)`` (the
    text still to be validated); ``every...`` or ``all-...`` that is neither shorthand nor a file is
    refused (PatternError).
    """
    text = spec.strip()
    short = pat.shorthand(text)
    if short is not None:
        return short
    if looks_like_file(text):
        return "file", text
    pat.refuse_shorthand_lookalike(text)
    return "pattern", text


def resolve(spec: str, num_layers: int, model: ModelInfo | None = None) -> str:
    """Turn a command-line pattern spec into a validated canonical pattern for ``num_layers``."""
    return resolve_with_strides(spec, num_layers, model)[0]


def resolve_with_strides(spec: str, num_layers: int, model: ModelInfo | None = None) -> tuple[str, list | None]:
    """:func:`resolve`, and the per-layer ``decode_stride`` of a pattern file that carries one (else None)."""
    kind, value = parse_spec(spec)
    if kind == "all-F":
        return pat.FULL * pat.check_num_layers(num_layers), None
    if kind == "every":
        return pat.uniform(num_layers, value), None
    if kind == "file":
        document = read(value)
        if model is not None:
            check_matches(document, model, source=f"pattern file {value}")
        pattern = pat.validate(document["pattern"], num_layers)
        return pattern, document.get("decode_stride")
    return pat.validate(value, num_layers), None


def spec_label(spec: str) -> str:
    """A short label for tables: ``all-F``, ``every-4``, the file name, or the pattern itself."""
    kind, value = parse_spec(spec)
    if kind == "all-F":
        return "all-F"
    if kind == "every":
        return f"every-{value}"
    if kind == "file":
        return Path(value).name
    return value.upper()
