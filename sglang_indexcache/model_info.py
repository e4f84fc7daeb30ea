"""What we need to know of a HF-format DSA checkpoint, read without torch and without weight values.

The config comes from ``config.json``; the indexer weights' names and shapes come from the
safetensors headers (8-byte little-endian length + JSON), so this is cheap on a 700B checkpoint.

A config-only checkpoint (``make-checkpoint --weights none``, served with SGLang's ``--load-format
dummy``) has no safetensors: where the caller allows it, its :class:`ModelInfo` carries no weights
and says why in ``weights_note``; everything the config decides is still checked.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelDirError
from .pattern import layer_ranges

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
INDEXER_MARK = ".indexer."
# Config keys that decide what a pattern means for a model (and so go into its fingerprint).
FINGERPRINT_CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "index_topk", "index_n_heads", "index_head_dim", "num_nextn_predict_layers",
)


@dataclass
class ModelInfo:
    path: Path
    config: dict
    indexer_weights: dict[str, list[int]] = field(default_factory=dict)  # name -> shape
    weights_note: str | None = None  # why the weights were not read (None: they were)

    @property
    def weights_checked(self) -> bool:
        return self.weights_note is None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def num_dsa_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def layers_with_indexer(self) -> set[int]:
        layers = set()
        for name in self.indexer_weights:
            match = LAYER_RE.search(name)
            if match and int(match.group(1)) < self.num_dsa_layers:
                layers.add(int(match.group(1)))
        return layers

    def summary(self) -> dict:
        """The ``model`` block of a pattern file (without the fingerprint)."""
        return {
            "architecture": self.architecture,
            "num_dsa_layers": self.num_dsa_layers,
            "index_topk": self.config.get("index_topk"),
            "index_n_heads": self.config.get("index_n_heads"),
            "index_head_dim": self.config.get("index_head_dim"),
        }

    def fingerprint_fields(self) -> dict:
        """Everything the fingerprint hashes, by name, so a mismatch can say which field differs."""
        fields = {key: self.config.get(key) for key in FINGERPRINT_CONFIG_KEYS}
        fields["architecture"] = self.architecture
        weights = json.dumps(sorted(self.indexer_weights.items()), separators=(",", ":"))
        fields["indexer_weights"] = "sha256:" + hashlib.sha256(weights.encode()).hexdigest()[:16]
        fields["indexer_layers"] = layer_ranges(self.layers_with_indexer)
        return fields

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()




def is_dsa_config(config: dict) -> bool:
    return all(key in config for key in ("index_topk", "index_n_heads", "num_hidden_layers"))


def read_config(model_dir) -> dict:
    path = Path(model_dir)
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelDirError(f"--model must be a directory of a HF checkpoint, got file {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{path} has no config.json: not a HF-format checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_path} must hold a JSON object")
    if not is_dsa_config(config):
        raise ModelDirError(
            f"{path} is not a DSA model: its config.json has no index_topk/index_n_heads"
            f" (model_type {config.get('model_type')!r})"
        )
    layers = config["num_hidden_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise ModelDirError(f"{config_path}: num_hidden_layers must be a positive integer, got {layers!r}")
    return config


def safetensors_header(path: Path) -> dict:
    """The JSON header of one safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Also checks that the file is as long as its header says (a truncated download or copy keeps a
    valid header but loses tensor bytes).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelDirError(f"{path} is truncated: no safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000 or 8 + length > size:
                raise ModelDirError(f"{path} is truncated or not safetensors: a header of {length} bytes"
                                    f" in a file of {size}")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"cannot read the safetensors header of {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        end = max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{path}: a safetensors header entry has no valid data_offsets ({exc})") from exc
    if 8 + length + end > size:
        raise ModelDirError(f"{path} is truncated: {size} bytes, but its header places tensor data up to byte"
                            f" {8 + length + end} (re-download or re-copy the checkpoint)")
    return header


def _shards(path: Path) -> list[str]:
    """Every weight file of the checkpoint (from the index, or the single model.safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{index} is not a valid safetensors index: {exc}") from exc
        return sorted(set(weight_map.values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelDirError(f"{path} has no model.safetensors or model.safetensors.index.json")


def weight_shapes(model_dir, select=lambda name: True) -> dict[str, list[int]]:
    """Names and shapes of the checkpoint's tensors for which ``select(name)`` holds.

    Reads (and checks the length of) every shard's header, so a truncated or missing shard is
    refused here, before any weights load.
    """
    path = Path(model_dir)
    shapes = {}
    for shard in _shards(path):
        shard_path = path / shard
        if not shard_path.is_file():
            raise ModelDirError(f"{path}: shard {shard} named in the index is missing")
        for name, meta in safetensors_header(shard_path).items():
            if select(name):
                shapes[name] = list(meta["shape"])
    return shapes


def has_safetensors(model_dir) -> bool:
    """Whether the checkpoint has any safetensors weights (or their index) at all."""
    path = Path(model_dir)
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))


def load_model_info(model_dir, weights: str = "required") -> ModelInfo:
    """Config + indexer weight shapes of a DSA checkpoint; refuses a checkpoint with no indexer.

    ``weights``: ``"required"`` (the default: commands that load the model refuse a checkpoint
    without safetensors), ``"if-present"`` (a config-only checkpoint is accepted, unread weights
    noted), ``"skip"`` (the loader reads no safetensors, e.g. SGLang's ``--load-format dummy``).
    """
    config = read_config(model_dir)
    if weights == "skip":
        return ModelInfo(Path(model_dir), config, weights_note="the load format reads no safetensors weights")
    if weights == "if-present" and not has_safetensors(model_dir):
        return ModelInfo(Path(model_dir), config,
                         weights_note=f"{model_dir} has no safetensors weights (a config-only checkpoint)")
    info = ModelInfo(Path(model_dir), config, weight_shapes(model_dir, lambda n: INDEXER_MARK in n))
    if not info.layers_with_indexer:
        raise ModelDirError(f"{model_dir} has no indexer weights ('{INDEXER_MARK}' tensors) in its safetensors")
    return info
