"""IndexCache pattern semantics: the one canonical definition (pure Python, no torch).

A pattern is a string over ``F``/``S``, one character per DSA layer of the main model, layer 0
first (MTP/NextN draft layers are not part of it). ``F`` (full) layers run their lightning indexer
and cache its top-k; an ``S`` (shared) layer reuses the top-k of the nearest ``F`` layer before it.

Everything else in the project (CLI, calibration, SGLang overlay, exports) calls this module.
"""

from __future__ import annotations

import json
import re

from .errors import PatternError

FULL, SHARED = "F", "S"
ALL_F_NAMES = ("all-f", "allf", "full")  # the all-F shorthand's spellings (case-insensitive)
_EVERY_RE = re.compile(r"^every-?(\d+)$", re.IGNORECASE)  # the every-N shorthand (also everyN)
ENGINES = ("sglang", "vllm", "transformers")
# Offsets of `max(i - offset + 1, 0) % freq != 0 -> S` each engine uses when none is configured.
# SGLang 0.5.23 (`dsa_layer_skips_topk`, no `index_skip_topk_offset`) and the paper authors' vLLM
# patch compute `max(i - 1, 0) % freq`, i.e. offset 2; transformers' GlmMoeDsaConfig defaults to 2.
DEFAULT_ENGINE_OFFSET = {"sglang": 2, "vllm": 2, "transformers": 2}


def parse(text: str) -> str:
    """Normalise a user-written pattern: strip surrounding whitespace, upper-case ``f``/``s``.

    Only the ASCII letters ``F``, ``S``, ``f``, ``s`` are accepted; anything else (interior
    whitespace, digits, look-alikes such as Cyrillic ``Ѕ`` or the long s ``ſ``) is refused with its
    1-based position, counted in the stripped string.
    """
    if not isinstance(text, str):
        raise PatternError(f"pattern must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise PatternError("pattern is empty: give one F or S per DSA layer, layer 0 first")
    for position, char in enumerate(stripped, start=1):
        if char not in "FSfs":
            raise PatternError(
                f"pattern has {char!r} (U+{ord(char):04X}) at position {position} (layer {position - 1});"
                " only F and S are allowed"
            )
    return stripped.upper()


def validate(pattern: str, num_layers: int) -> str:
    """Parse ``pattern`` and check it against a model of ``num_layers`` DSA layers."""
    num_layers = check_num_layers(num_layers)
    pattern = parse(pattern)
    if len(pattern) != num_layers:
        raise PatternError(
            f"pattern has {len(pattern)} layers but the model has {num_layers} DSA layers"
        )
    if pattern[0] != FULL:
        raise PatternError("layer 0 must be F: a shared layer 0 has no earlier layer to reuse top-k from")
    return pattern


def check_num_layers(num_layers) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise PatternError(f"number of layers must be a positive integer, got {num_layers!r}")
    return num_layers


def check_every(every, flag: str = "--every", error: type[Exception] = PatternError) -> int:
    """``every`` of an every-N pattern when it is a positive int (a bool is not); else ``error``
    naming ``flag`` (``--every``, the server's ``--index-cache-every``)."""
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise error(f"{flag} must be a positive integer, got {every!r}")
    return every


def shorthand(text: str) -> tuple[str, int] | None:
    """The one reading of the shorthands: ``("all-F", 1)`` for ``all-F`` (``allf``, ``full``),
    ``("every", N)`` for ``every-N`` (``everyN``), None for anything else (surrounding whitespace
    stripped, case-insensitive). N is not checked here: :func:`uniform` does that."""
    text = text.strip()
    if text.lower() in ALL_F_NAMES:
        return "all-F", 1
    match = _EVERY_RE.match(text)
    return ("every", int(match.group(1))) if match else None


def refuse_shorthand_lookalike(text: str) -> None:
    """Refuse ``text`` that starts like a shorthand (``every...``, ``all...``) but is neither."""
    text = text.strip()
    if text.lower().startswith(("every", "all")):
        raise PatternError(f"{text!r} is neither every-N (N a positive integer) nor all-F")


def uniform(num_layers: int, every: int) -> str:
    """Layer i is F iff ``i % every == 0`` (every=4, 8 layers: ``FSSSFSSS``)."""
    num_layers, every = check_num_layers(num_layers), check_every(every)
    return "".join(FULL if i % every == 0 else SHARED for i in range(num_layers))


def from_engine_freq(engine: str, num_layers: int, freq: int, offset: int | None = None) -> str:
    """What an engine really selects for ``index_topk_freq=freq`` on a model of ``num_layers``.

    SGLang 0.5.23, the paper authors' vLLM patch and transformers' GlmMoeDsa all compute
    ``max(i - offset + 1, 0) % freq != 0 -> S`` with offset 2 by default, which keeps one extra
    indexer compared with :func:`uniform` (freq 4, 8 layers: ``FFSSSFSS``).
    """
    if engine not in ENGINES:
        raise PatternError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    num_layers = check_num_layers(num_layers)
    if isinstance(freq, bool) or not isinstance(freq, int) or freq <= 0:
        raise PatternError(f"index_topk_freq must be a positive integer, got {freq!r}")
    offset = DEFAULT_ENGINE_OFFSET[engine] if offset is None else offset
    if isinstance(offset, bool) or not isinstance(offset, int) or offset <= 0:
        raise PatternError(f"index_skip_topk_offset must be a positive integer, got {offset!r}")
    return "".join(
        SHARED if max(i - offset + 1, 0) % freq != 0 else FULL for i in range(num_layers)
    )


def sglang_config_pattern(config: dict, reads_indexer_types: bool = True,
                          reads_cli_factor: bool = False) -> tuple[str | None, str | None]:
    """What stock SGLang selects from a config.json alone, and the key it read (``(None, None)``: all F).

    SGLang 0.5.17 reads ``cli_factor`` first (layer i is F iff ``i % cli_factor == 0``); 0.5.23 does
    not, and reads ``indexer_types`` first instead. Then ``dsa_layer_skips_topk``: ``index_topk_pattern``
    (a short pattern leaves the rest F, anything but ``S`` is F), then ``index_topk_freq`` with
    ``index_skip_topk_offset`` (:func:`from_engine_freq`).
    """
    n = config["num_hidden_layers"]
    factor = config.get("cli_factor") if reads_cli_factor else None
    if isinstance(factor, int) and not isinstance(factor, bool) and factor > 1:
        return uniform(n, factor), "cli_factor"
    types = config.get("indexer_types") if reads_indexer_types else None
    if types is not None:
        return "".join(SHARED if i < len(types) and types[i] == "shared" else FULL for i in range(n)), \
            "indexer_types"
    raw = config.get("index_topk_pattern")
    if raw is not None:
        return "".join(SHARED if i < len(raw) and raw[i] == SHARED else FULL for i in range(n)), \
            "index_topk_pattern"
    freq = config.get("index_topk_freq") or 1
    if isinstance(freq, int) and freq > 1:
        return from_engine_freq("sglang", n, freq, config.get("index_skip_topk_offset")), "index_topk_freq"
    return None, None


def all_full(num_layers: int) -> str:
    """The all-F pattern of ``num_layers`` layers (every indexer kept: the baseline)."""
    return FULL * check_num_layers(num_layers)


def is_all_full(pattern: str) -> bool:
    """Whether ``pattern`` keeps every indexer (no S layer)."""
    return SHARED not in pattern


def kept(pattern: str) -> int:
    """The number of F layers of ``pattern`` (indexers kept)."""
    return pattern.count(FULL)


def full_layers(pattern: str) -> list[int]:
    """Indices of the F layers."""
    return [i for i, c in enumerate(pattern) if c == FULL]


def reuse_source(pattern: str) -> list[int]:
    """For each layer, the layer whose top-k it uses (itself for F, nearest F before it for S)."""
    source, current = [], None
    for i, c in enumerate(pattern):
        if c == FULL:
            current = i
        if current is None:
            raise PatternError("layer 0 must be F: a shared layer 0 has no earlier layer to reuse top-k from")
        source.append(current)
    return source


def served_layers(pattern: str) -> dict[int, list[int]]:
    """For each F layer, the layers that use its top-k (itself first, then its S layers)."""
    served: dict[int, list[int]] = {}
    for layer, source in enumerate(reuse_source(pattern)):
        served.setdefault(source, []).append(layer)
    return served


def validate_strides(strides, num_layers: int) -> list[int]:
    """A per-layer decode-stride list: one positive integer per DSA layer, layer 0 first.

    An F layer with stride N refreshes its top-k every N decode steps and in between reuses the
    stored set plus the newer positions (``models/decode_reuse.py``); S layers' entries are kept but
    unused (they follow their F layer). Absent (``None``) means 1 everywhere: returned as such.
    """
    num_layers = check_num_layers(num_layers)
    if not isinstance(strides, (list, tuple)):
        raise PatternError(f"decode_stride must be a list of {num_layers} positive integers, got {strides!r}")
    if len(strides) != num_layers:
        raise PatternError(f"decode_stride has {len(strides)} entries but the model has {num_layers} DSA layers")
    for layer, value in enumerate(strides):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PatternError(f"decode_stride[{layer}] is {value!r}; each entry must be a positive integer")
    return list(strides)


def uniform_strides(num_layers: int, stride: int) -> list[int]:
    """Stride ``stride`` on every layer (``--decode-stride N``)."""
    return validate_strides([stride] * check_num_layers(num_layers), num_layers)


def effective_stride(pattern: str, strides) -> float:
    """Harmonic mean of the F layers' strides: the F indexers' decode work is ``1 / effective``
    of stride 1's (uniform stride N on every F layer gives N)."""
    full = full_layers(pattern)
    return len(full) / sum(1.0 / strides[i] for i in full)


def describe_strides(pattern: str, strides) -> str:
    """``"1"`` / ``"4"`` when every F layer has the same stride, else the F layers' strides ``"8/4/2"``."""
    values = [strides[i] for i in full_layers(pattern)]
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def layer_ranges(layers) -> str:
    """Sorted layer numbers as ranges for messages: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    values = sorted(layers)
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def describe(pattern: str) -> str:
    full = kept(pattern)
    return f"{pattern} ({full}/{len(pattern)} indexers kept, {len(pattern) - full} shared)"


# ---------------------------------------------------------------- exports ---------------------

def to_indexer_types(pattern: str) -> list[str]:
    """transformers GlmMoeDsa ``indexer_types``: ``"full"``/``"shared"`` per layer."""
    return ["full" if c == FULL else "shared" for c in pattern]


def from_indexer_types(indexer_types) -> str:
    mapping = {"full": FULL, "shared": SHARED}
    try:
        return "".join(mapping[t] for t in indexer_types)
    except (KeyError, TypeError) as exc:
        raise PatternError(f"indexer_types must be a list of 'full'/'shared', got {indexer_types!r}") from exc


def sglang_override_json(pattern: str) -> str:
    """JSON for stock SGLang's ``--json-model-override-args``.

    ``indexer_types`` is nulled because SGLang 0.5.23 reads it before ``index_topk_pattern`` and
    transformers writes it into every GlmMoeDsa config.json: without the null the pattern would be
    silently ignored on such checkpoints.
    """
    return json.dumps({"index_topk_pattern": pattern, "indexer_types": None})


def vllm_override_json(pattern: str) -> str:
    """JSON for vLLM's ``--hf-overrides`` (the paper authors' patch): explicit pattern, no freq."""
    return json.dumps({"use_index_cache": True, "index_topk_pattern": pattern})


def export(pattern: str, engine: str) -> str:
    """The command-line flag (or config snippet) that gives ``engine`` exactly ``pattern``."""
    if engine == "sglang":
        return f"--json-model-override-args '{sglang_override_json(pattern)}'"
    if engine == "vllm":
        return f"--hf-overrides '{vllm_override_json(pattern)}'"
    if engine == "transformers":
        return json.dumps({"indexer_types": to_indexer_types(pattern)})
    raise PatternError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
