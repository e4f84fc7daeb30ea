"""The IndexCache flags of the patched SGLang server: resolution, validation, model-config override.

Flags (fields of SGLang's ``model`` namespace, added by ``0001-index-cache-flags.patch`` and, the
stride, ``0007-index-cache-decode-stride.patch``): ``--index-cache-pattern P``,
``--index-cache-every N``, ``--index-cache-pattern-file F``, ``--index-cache-calibration``,
``--index-cache-decode-stride N``. All of them off means the patched server is stock SGLang: every
function here then returns SGLang's own values unchanged.

Every SGLang process builds its own ``ModelConfig`` through ``ModelConfig.from_server_args``; the
patch routes its ``json_model_override_args`` through :func:`model_override_args`, which adds
``indexer_types`` (and ``index_topk_pattern``) for the resolved pattern. ``indexer_types`` must be
set, not only ``index_topk_pattern``: SGLang's ``dsa_layer_skips_topk`` reads it first and
transformers writes it into every GlmMoeDsa config.json, so a pattern alone would be silently
ignored on such checkpoints. Resolution is deterministic (model dir + flags), so every process
sees the same pattern.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass

from .. import pattern as pat
from .. import pattern_file
from ..checks import positive_int
from ..errors import UsageError
from ..model_info import ModelInfo, load_model_info
from ..validation import check_against_model, require_every_indexer
from . import shared_layers
from .stride_state import StridePlan

logger = logging.getLogger("sglang_indexcache.sglang")

FLAG_FIELDS = ("index_cache_pattern", "index_cache_every", "index_cache_pattern_file")
STRIDE_FIELD = "index_cache_decode_stride"
# Server features a decode stride cannot run with: field, flag, why (checked at start-up when a stride
# above 1 is set, and before a run-time switch turns one on in calibration mode).
STRIDE_CONFLICTS = (
    ("speculative_algorithm", "--speculative-algorithm",
     "draft and verify steps take other top-k paths (target verify, draft extend) than the plain decode it stores"),
    ("enable_hisparse", "--enable-hisparse", "HiSparse swaps the selected pages in per layer from its own top-k"),
    ("enable_two_batch_overlap", "--enable-two-batch-overlap",
     "its op path splits a batch in two inside the forward, where the step kind is per batch"),
    ("enable_torch_compile", "--enable-torch-compile",
     "the compiled decode graph would freeze the step kind the hooks read in Python"),
)
# Keys of --json-model-override-args that would give a second, competing pattern.
PATTERN_OVERRIDE_KEYS = ("indexer_types", "index_topk_pattern", "index_topk_freq", "index_skip_topk_offset",
                         "cli_factor", shared_layers.CONFIG_KEY)
# --load-format values that read no safetensors: the indexer weights are then not checked (nor is a
# checkpoint without safetensors, e.g. make-checkpoint --weights none); everything else still is.
WEIGHTLESS_LOAD_FORMATS = ("dummy", "pt", "npcache")


class IndexCacheError(UsageError):
    """An IndexCache flag the server cannot start with (one line, names the flag)."""


@contextlib.contextmanager
def exit_on_index_cache_error():
    """Around the server's start-up resolution: an :class:`IndexCacheError` becomes one line on
    stderr and exit status 2 instead of a traceback. Any other exception passes through untouched."""
    try:
        yield
    except IndexCacheError as exc:
        sys.stderr.write(f"IndexCache: error: {exc}\n")
        raise SystemExit(2) from None


@dataclass(frozen=True)
class Settings:
    """The resolved IndexCache configuration of one server.

    ``pattern`` is what the layers run (F/S per DSA layer); ``model_pattern`` is what the model is
    built with: the same, except in calibration mode, where every layer is built F (indexer
    module, weights and index-K cache for every layer) and ``pattern`` is set on the layers after
    loading (and can be switched at run time).
    """

    pattern: str
    source: str  # "--index-cache-pattern", "--index-cache-every 4", "--index-cache-pattern-file F"
    calibration: bool
    checkpoint_pattern: str | None  # what config.json alone would select, for the override log line
    checkpoint_key: str | None  # the config.json key it came from ("indexer_types", ...)
    strides: tuple[int, ...] | None = None  # decode stride per layer; None = 1 everywhere (no store)
    stride_source: str | None = None  # "--index-cache-decode-stride 4" or the pattern file

    @property
    def model_pattern(self) -> str:
        return pat.FULL * len(self.pattern) if self.calibration else self.pattern

    @property
    def kept(self) -> int:
        return self.pattern.count(pat.FULL)

    def layer_strides(self) -> list[int]:
        return list(self.strides) if self.strides else [1] * len(self.pattern)

    def describe(self) -> dict:
        return {"pattern": self.pattern, "kept_indexers": self.kept, "num_layers": len(self.pattern),
                "source": self.source, "calibration": self.calibration,
                **describe_strides(self.pattern, self.layer_strides(), self.stride_source)}


def describe_strides(pattern: str, layer_strides, source: str | None) -> dict:
    """The decode-stride part of the state (server info, ``GET /index_cache``)."""
    full = pat.full_layers(pattern)
    return {"decode_stride": pat.describe_strides(pattern, layer_strides) if full else "1",
            "decode_strides": list(layer_strides),
            "effective_stride": round(pat.effective_stride(pattern, layer_strides), 4) if full else 1.0,
            "stride_source": source}


def enabled(cfg) -> bool:
    """Whether any IndexCache flag is set on ``cfg`` (ServerArgs or its resolving view)."""
    return any(getattr(cfg, name, None) is not None for name in FLAG_FIELDS) or bool(
        getattr(cfg, "index_cache_calibration", False))


def _override_dict(cfg) -> dict:
    text = getattr(cfg, "json_model_override_args", None) or "{}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexCacheError(f"--json-model-override-args is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise IndexCacheError("--json-model-override-args must be a JSON object")
    return value


@dataclass(frozen=True)
class Flags:
    """The IndexCache flag values of one server (the key of its resolution)."""

    model_path: str
    pattern: str | None
    every: int | None
    pattern_file: str | None
    pattern_file_stamp: int | None  # mtime of the pattern file: an edited file is read again
    calibration: bool
    load_format: str = "auto"
    decode_stride: int | None = None

    @classmethod
    def of(cls, cfg) -> "Flags":
        path = getattr(cfg, "index_cache_pattern_file", None)
        stamp = os.stat(path).st_mtime_ns if path and os.path.isfile(path) else None
        return cls(str(cfg.model_path), getattr(cfg, "index_cache_pattern", None),
                   getattr(cfg, "index_cache_every", None), path, stamp,
                   bool(getattr(cfg, "index_cache_calibration", False)), str(getattr(cfg, "load_format", "auto")),
                   getattr(cfg, STRIDE_FIELD, None))

    def given(self) -> list[str]:
        values = {"index_cache_pattern": self.pattern, "index_cache_every": self.every,
                  "index_cache_pattern_file": self.pattern_file}
        return [name for name in FLAG_FIELDS if values[name] is not None]


def _flag_pattern(flags: Flags, info: ModelInfo) -> tuple[str, str, list | None]:
    """The pattern the flags ask for, validated for the checkpoint, a label of its source, and the
    pattern file's per-layer decode strides (None without)."""
    given = flags.given()
    if len(given) > 1:
        raise IndexCacheError(
            "give only one of " + ", ".join("--" + n.replace("_", "-") for n in given))
    n = info.num_dsa_layers
    try:
        file_strides = None
        if not given:  # calibration mode alone starts with every indexer running
            return pat.FULL * n, "--index-cache-calibration (all F)", None
        if given[0] == "index_cache_every":
            pattern, source = pat.uniform(n, flags.every), f"--index-cache-every {flags.every}"
        elif given[0] == "index_cache_pattern_file":
            document = pattern_file.read(flags.pattern_file)
            pattern_file.check_matches(document, info, source=f"pattern file {flags.pattern_file}")
            pattern, source = document["pattern"], f"--index-cache-pattern-file {flags.pattern_file}"
            file_strides = document.get("decode_stride")
        else:
            pattern, source = flags.pattern, "--index-cache-pattern"
        return check_against_model(pattern, info), source, file_strides
    except UsageError as exc:
        flag = "--" + given[0].replace("_", "-")
        raise IndexCacheError(f"{flag}: {exc}") from exc


def _checkpoint_pattern(config: dict) -> tuple[str | None, str | None]:
    """What this SGLang release selects from config.json alone (for the override log line)."""
    from . import compat

    try:
        return pat.sglang_config_pattern(config, compat.reads_indexer_types(), compat.reads_cli_factor())
    except UsageError:  # e.g. a non-positive offset: stock SGLang stops on it by itself
        return None, None


@functools.lru_cache(maxsize=8)
def _resolve_cached(flags: Flags) -> Settings:
    if not os.path.isdir(flags.model_path):
        raise IndexCacheError(
            f"IndexCache flags need --model-path to be a local checkpoint directory, got {flags.model_path!r}"
            " (download it first, e.g. with huggingface-cli download)")
    try:
        info = load_model_info(flags.model_path,
                               weights="skip" if flags.load_format in WEIGHTLESS_LOAD_FORMATS else "if-present")
    except UsageError as exc:
        raise IndexCacheError(f"IndexCache: {exc}") from exc
    if not info.weights_checked:
        logger.warning("IndexCache: indexer weights not checked (--load-format %s): %s", flags.load_format,
                       info.weights_note)
    resolved, source, file_strides = _flag_pattern(flags, info)
    strides, stride_source = _strides(flags, resolved, file_strides)
    if flags.calibration and info.weights_checked:
        require_every_indexer(info.num_dsa_layers, info.layers_with_indexer, flags.model_path,
                              "--index-cache-calibration keeps every layer's indexer", IndexCacheError)
    ckpt, key = _checkpoint_pattern(info.config)
    return Settings(resolved, source, flags.calibration, ckpt, key, strides, stride_source)


def _strides(flags: Flags, pattern: str, file_strides) -> tuple[tuple[int, ...] | None, str | None]:
    """Per-layer decode strides from the flag or the pattern file (None: 1 everywhere, no store)."""
    file_used = bool(file_strides) and any(file_strides[i] > 1 for i in pat.full_layers(pattern))
    if flags.decode_stride is not None and file_used:
        raise IndexCacheError(
            f"--index-cache-decode-stride {flags.decode_stride}: pattern file {flags.pattern_file} carries decode_stride"
            f" {pat.describe_strides(pattern, file_strides)} already; give the strides once")
    if flags.decode_stride is not None and flags.decode_stride > 1:
        strides, source = [flags.decode_stride] * len(pattern), f"--index-cache-decode-stride {flags.decode_stride}"
    elif file_used:
        strides, source = list(file_strides), f"--index-cache-pattern-file {flags.pattern_file}"
    else:
        return None, None
    try:
        plan = StridePlan.of(pattern, strides)
    except UsageError as exc:
        raise IndexCacheError(f"{source}: {exc}") from exc
    if not plan.active:  # strides above 1 only on S layers: nothing to store
        return None, None
    return tuple(strides), source


def resolve(cfg) -> Settings | None:
    """The resolved settings for ``cfg``, or None when no IndexCache flag is set."""
    if getattr(cfg, STRIDE_FIELD, None) is not None:
        positive_int(getattr(cfg, STRIDE_FIELD), "--index-cache-decode-stride", IndexCacheError)
    if not enabled(cfg):
        if getattr(cfg, STRIDE_FIELD, None) is not None:
            raise IndexCacheError(
                "--index-cache-decode-stride needs a pattern: add --index-cache-pattern, --index-cache-every N"
                " (--index-cache-every 1 for all F layers), --index-cache-pattern-file or --index-cache-calibration")
        return None
    if getattr(cfg, "index_cache_every", None) is not None:
        pat.check_every(cfg.index_cache_every, "--index-cache-every", IndexCacheError)
    return _resolve_cached(Flags.of(cfg))


def model_override_args(cfg, is_draft_model: bool = False) -> str:
    """``json_model_override_args`` for ``ModelConfig``: SGLang's own string when IndexCache is off.

    With a flag set, ``indexer_types`` and ``index_topk_pattern`` of the resolved model pattern are
    merged in, and ``cli_factor`` 1 where the release reads it first (the draft model is left alone:
    MTP layers are not part of a pattern). Outside calibration mode the pattern also goes in as
    ``shared_layers.CONFIG_KEY``: its S layers hold no index-K buffer and no indexer.
    """
    text = cfg.json_model_override_args
    settings = None if is_draft_model else resolve(cfg)
    if settings is None:
        return text
    overrides = _override_dict(cfg)
    _check_no_competing_pattern(overrides)
    overrides["indexer_types"] = pat.to_indexer_types(settings.model_pattern)
    overrides["index_topk_pattern"] = settings.model_pattern
    from . import compat

    if compat.reads_cli_factor():  # 0.5.17's model class would follow a cli_factor > 1 instead
        overrides["cli_factor"] = 1
    if not settings.calibration:
        overrides[shared_layers.CONFIG_KEY] = settings.pattern
    return json.dumps(overrides)


def _check_no_competing_pattern(overrides: dict) -> None:
    competing = [key for key in PATTERN_OVERRIDE_KEYS if key in overrides]
    if competing:
        raise IndexCacheError(
            f"--json-model-override-args sets {', '.join(competing)}, which conflicts with the IndexCache"
            " flag: give the pattern once, through the flag")


def check_server_args(server_args) -> Settings | None:
    """Start-up validation and adjustments, called from SGLang's model-specific resolution hook."""
    from . import compat

    cfg = compat.resolving_view(server_args)
    settings = resolve(cfg)
    if settings is None:
        return None
    _check_no_competing_pattern(_override_dict(cfg))
    shared_layers.check_server_args(cfg, settings, compat.release())
    if settings.strides:
        conflict = stride_conflict(cfg)
        if conflict:
            raise IndexCacheError(f"{settings.stride_source} cannot run with {conflict}")
    if getattr(cfg, "enable_two_batch_overlap", False) and (settings.calibration or pat.SHARED in settings.pattern):
        raise IndexCacheError(
            "--enable-two-batch-overlap cannot run IndexCache: its op path does not carry top-k indices"
            " across layers (use an all-F pattern or drop --enable-two-batch-overlap)")
    if settings.calibration:
        if getattr(cfg, "pp_size", 1) != 1:
            raise IndexCacheError("--index-cache-calibration needs --pp-size 1 (top-k does not cross pipeline stages)")
        # Calibration mode switches patterns at run time: no CUDA graphs (they freeze the branch).
        compat.calibration_adjustments(server_args, cfg, "index_cache_calibration")
        logger.warning("IndexCache calibration mode: CUDA graphs and the radix cache disabled (a pattern switch"
                       " would need a recapture, and cached prefixes lack other patterns' index keys);"
                       " /index_cache/overlap also needs --enable-return-indexer-topk")
    log_startup(settings)
    return settings


def stride_conflict(cfg) -> str | None:
    """The first server feature set on ``cfg`` that a decode stride cannot run with, as ``flag: why``."""
    from . import compat

    for field, flag, why in STRIDE_CONFLICTS:
        if shared_layers.feature_on(cfg, field) and str(getattr(cfg, field)).upper() != "NONE":
            return f"{flag}: {why}"
    backend = compat.decode_graph_backend(cfg)
    if backend in ("breakable", "tc_piecewise"):
        return (f"--cuda-graph-backend-decode {backend}: the step kind is captured per full decode graph (full, the"
                " default, or disabled)")
    if (getattr(cfg, "pp_size", 1) or 1) > 1:
        return "--pp-size > 1: the step kind is decided per scheduler batch; pipeline micro-batches are not verified"
    if compat.is_hip():
        return "ROCm: its DSA decode has its own graph variants and indexer paths (built and verified on CUDA only)"
    return None


def log_startup(settings: Settings) -> None:
    strides = (f"; decode stride {pat.describe_strides(settings.pattern, settings.strides)} (effective"
               f" {pat.effective_stride(settings.pattern, settings.strides):.2f}) from {settings.stride_source}"
               if settings.strides else "")
    logger.info("IndexCache: pattern %s from %s%s%s", pat.describe(settings.pattern), settings.source, strides,
                "; calibration mode (every indexer loaded, pattern switchable)" if settings.calibration else "")
    if settings.checkpoint_key is not None:
        logger.warning("IndexCache: overrode the checkpoint's %s (%s) with %s", settings.checkpoint_key,
                       settings.checkpoint_pattern, settings.model_pattern)
