"""GLM-5-attention DSA checkpoints at real shapes with random weights, for serving benchmarks.

``write_checkpoint`` writes a GlmMoeDsa model directory: GLM-5's attention and indexer
(``configs.GLM_5``: 64 heads, q_lora 2048, kv_lora 512, qk_nope 192, rope 64, v_head 256, indexer
32 x 128, top-k 2048), a dense MLP on every layer, the embedded model's tokenizer, and random bf16
weights in safetensors shards (tensor names and shapes from transformers' own GlmMoeDsa model,
built on the meta device; values drawn one tensor at a time on ``device``, one shard in memory).

Flavours: ``plain`` (config.json carries no pattern), ``own-pattern`` (config.json carries
``index_topk_pattern``, read by SGLang 0.5.17, and ``indexer_types``, read first by 0.5.23 and by
transformers), ``glm52`` (as own-pattern, and the S layers' indexer weights are left out, as in
GLM-5.2-style checkpoints).

config.json is written from the dict below, not by a transformers config class: version-dependent
defaults such as ``layer_types`` ("deepseek_sparse_attention" in transformers 5.12.1,
"indexed_attention" in 5.19) are left for the reading version to fill in.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from . import checks
from . import pattern as pat
from . import progress
from .atomic import atomic_path, atomic_write_json, staged_dir
from .configs import GLM_5, TINY_MODEL_DIR
from .errors import UsageError
from .model_info import INDEXER_MARK, LAYER_RE

log = logging.getLogger(__name__)

FLAVOURS = ("plain", "own-pattern", "glm52")
ATTENTION_KEYS = ("num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_topk", "index_head_dim",
                  "index_n_heads")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHARD_BYTES = 1 << 30
# random: every tensor; indexer: config, tokenizer and the indexer tensors only (what `validate`,
# `calibrate --url` and a pattern file's fingerprint read, for a server with --load-format dummy);
# none: config and tokenizer only
WEIGHTS = ("random", "indexer", "none")


def checkpoint_config(hidden: int, layers: int, intermediate: int, flavour: str = "plain",
                      pattern: str | None = None, overrides: dict | None = None) -> dict:
    """The config.json dict. ``overrides`` (tests only) replaces attention shapes, e.g. the heads."""
    if flavour not in FLAVOURS:
        raise UsageError(f"--flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    if (pattern is None) != (flavour == "plain"):
        raise UsageError(f"--flavour {flavour} {'takes no' if flavour == 'plain' else 'needs a'} --pattern")
    tiny = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    config = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa"}
    config.update({key: GLM_5[key] for key in ATTENTION_KEYS})
    config.update(
        vocab_size=tiny["vocab_size"], bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        # a dense MLP on every layer: no expert weights, no MoE kernels (the expert counts are unused)
        first_k_dense_replace=layers, mlp_layer_types=["dense"] * layers, moe_intermediate_size=2048,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=202752, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        dtype="bfloat16", torch_dtype="bfloat16",
        # read by SGLang's DeepseekV2 code, not defined by GlmMoeDsaConfig
        moe_layer_freq=1, topk_method="noaux_tc", scoring_func="sigmoid",
    )
    config.update(overrides or {})
    if pattern is not None:
        config["index_topk_pattern"] = pattern
        config["indexer_types"] = pat.to_indexer_types(pattern)
    return config


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of transformers' GlmMoeDsaForCausalLM for ``config``, every layer
    with its indexer (the pattern keys are left out: they must not change what is built)."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    keys = ("index_topk_pattern", "indexer_types")
    hf_config = GlmMoeDsaConfig(**{k: v for k, v in config.items() if k not in keys})
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def kept_weights(shapes: dict, pattern: str | None, flavour: str) -> dict:
    """All tensors, less the S layers' indexer tensors for ``glm52``."""
    if flavour != "glm52":
        return dict(shapes)
    shared = {i for i, kind in enumerate(pattern) if kind == pat.SHARED}
    return {n: s for n, s in shapes.items() if not (INDEXER_MARK in n and _layer(n) in shared)}


def _layer(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def shard_plan(shapes: dict, shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Names per shard, in order, each shard at most ``shard_bytes`` of bf16 (or one tensor)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _random_tensor(name, shape, generator, device, std):
    import torch

    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * std
    return values.to(torch.bfloat16).cpu()


def write_weights(out: Path, shapes: dict, device: str = "cpu", seed: int = 0, std: float = 0.02,
                  shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Random bf16 tensors for ``shapes`` in safetensors shards plus the index; returns shard names."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator(device=device).manual_seed(seed)
    plan = shard_plan(shapes, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, total = {}, 0
    bar = progress.bar(total=sum(math.prod(s) for s in shapes.values()), unit="param", unit_scale=True, desc="weights")
    with bar:
        for file, names in zip(files, plan):
            tensors = {}
            for name in names:
                tensors[name] = _random_tensor(name, shapes[name], generator, device, std)
                weight_map[name] = file
                total += 2 * math.prod(shapes[name])
                bar.update(math.prod(shapes[name]))
            with atomic_path(out / file) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
            log.info("wrote %s (%d tensors)", file, len(names))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_json(out / "model.safetensors.index.json", index)
    return files


def write_checkpoint(out, hidden: int, layers: int, intermediate: int, flavour: str = "plain",
                     pattern: str | None = None, weights: str = "random", device: str = "cpu",
                     overrides: dict | None = None, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the model directory ``out`` (new or empty); returns a summary."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if pattern is not None:
        pattern = pat.validate(pattern, layers)
    config = checkpoint_config(hidden, layers, intermediate, flavour, pattern, overrides)
    checks.torch_device(device)
    summary = {"path": str(out), "flavour": flavour, "pattern": pattern, "layers": layers, "hidden": hidden}
    with staged_dir(out) as staged:  # Ctrl-C leaves no half-written checkpoint
        atomic_write_json(staged / "config.json", config, indent=2)
        for name in TOKENIZER_FILES:
            shutil.copyfile(TINY_MODEL_DIR / name, staged / name)
        if weights != "none":
            shapes = kept_weights(weight_shapes(config), pattern, flavour)
            if weights == "indexer":
                shapes = {n: s for n, s in shapes.items() if INDEXER_MARK in n}
            summary["shards"] = write_weights(staged, shapes, device, seed, shard_bytes=shard_bytes)
            summary["parameters"] = sum(math.prod(s) for s in shapes.values())
            summary["indexer_layers"] = sorted({_layer(n) for n in shapes if INDEXER_MARK in n})
    return summary

