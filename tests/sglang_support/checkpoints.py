"""Small GlmMoeDsa checkpoints that SGLang 0.5.23's own model classes can build and load on a CPU.

Written with transformers (its ``GlmMoeDsaForCausalLM`` defines the tensor names) in bf16, with the
keys real GLM-5 configs carry that transformers' config does not declare (``moe_layer_freq``,
``scoring_func``, ``topk_method``) and yarn RoPE of factor 1 (SGLang's CPU rope takes only yarn;
factor 1 equals plain RoPE). Index head dim 128, as SGLang's indexer requires.

Three flavours (``FLAVOURS``):

- ``types``: every layer has an indexer; config.json carries ``indexer_types`` (all ``"full"``),
  as transformers writes it into every GlmMoeDsa config it saves.
- ``plain``: every layer has an indexer; config.json has no ``indexer_types`` (pattern or frequency
  keys only, from ``extra_config``), like a DeepSeek-V3.2-style config.
- ``glm52``: GLM-5.2-style: config.json carries its own pattern (``GLM52_PATTERN``), as
  ``indexer_types`` (what SGLang 0.5.23 reads) and ``index_topk_pattern`` (what 0.5.17 reads), and
  the shared layers have no indexer weights at all.
"""

from __future__ import annotations

import json
from pathlib import Path

NUM_LAYERS = 8
GLM52_PATTERN = "FSSFSSFS"  # what the glm52 flavour keeps indexers for
FLAVOURS = ("types", "plain", "glm52")


def glm52_pattern(num_layers: int = NUM_LAYERS) -> str:
    """The glm52 flavour's pattern at ``num_layers``: ``GLM52_PATTERN`` repeated."""
    return (GLM52_PATTERN * (num_layers // len(GLM52_PATTERN) + 1))[:num_layers]


def tiny_config_kwargs(num_layers: int = NUM_LAYERS) -> dict:
    """GlmMoeDsaConfig keyword arguments of a model small enough to build in well under a second."""
    return dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, index_n_heads=2, index_head_dim=128, index_topk=8,
        max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "factor": 1.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 512},
    )


# Keys SGLang's DeepSeek/GLM classes read that transformers' GlmMoeDsaConfig does not declare.
SGLANG_CONFIG_KEYS = {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def write_glm_dsa_checkpoint(path, flavour: str = "types", extra_config: dict | None = None,
                             num_layers: int = NUM_LAYERS, seed: int = 0, **config_kwargs) -> Path:
    """Write a bf16 transformers GlmMoeDsa checkpoint of the given flavour into ``path``.

    ``extra_config`` is merged into config.json last (for example ``{"index_topk_freq": 2}``);
    ``config_kwargs`` replace :func:`tiny_config_kwargs` entries (for example GLM-5's latent sizes
    ``kv_lora_rank=512, qk_rope_head_dim=64``).
    """
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown checkpoint flavour {flavour!r}; one of {FLAVOURS}")
    path = Path(path)
    types = ["full"] * num_layers
    if flavour == "glm52":
        types = ["full" if c == "F" else "shared" for c in glm52_pattern(num_layers)]
    torch.manual_seed(seed)
    config = GlmMoeDsaConfig(**{**tiny_config_kwargs(num_layers), **config_kwargs}, indexer_types=types)
    model = GlmMoeDsaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # transformers zero-initialises some tensors; make every one distinct
        for param in model.parameters():
            param.copy_(torch.randn_like(param, dtype=torch.float32).mul_(0.05))
    model.save_pretrained(path)
    config_path = path / "config.json"
    saved = json.loads(config_path.read_text())
    saved.update(SGLANG_CONFIG_KEYS)
    # Each transformers release recomputes its own default; 5.12.1 (SGLang 0.5.17's) rejects the
    # 'indexed_attention' that later ones write, and SGLang does not read the key.
    saved.pop("layer_types", None)
    if flavour == "plain":
        saved.pop("indexer_types", None)
    if flavour == "glm52":
        saved["index_topk_pattern"] = glm52_pattern(num_layers)
    saved.update(extra_config or {})
    config_path.write_text(json.dumps(saved, indent=2))
    return path


# Config-only variants of the plain flavour: same weights, keys a DeepSeek-V3.2-style config carries.
PLAIN_VARIANTS = {
    "plain_freq4": {"index_topk_freq": 4},
    "plain_pattern": {"index_topk_pattern": "FSFSSFSS"},
    "plain_offset": {"index_topk_freq": 3, "index_skip_topk_offset": 1},
    "plain_cli4": {"cli_factor": 4},  # SGLang 0.5.17's model class reads it before any pattern key
}
_SESSION: dict = {}
_GLM5_SESSION: dict = {}


def session_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The three flavours plus PLAIN_VARIANTS, written once per test session: name -> directory."""
    if not _SESSION:
        import shutil

        base = tmp_path_factory.mktemp("glm-dsa-checkpoints")
        for flavour in FLAVOURS:
            _SESSION[flavour] = write_glm_dsa_checkpoint(base / flavour, flavour)
        for name, extra in PLAIN_VARIANTS.items():
            shutil.copytree(_SESSION["plain"], base / name)
            config_path = base / name / "config.json"
            config = json.loads(config_path.read_text())
            config.update(extra)
            config_path.write_text(json.dumps(config, indent=2))
            _SESSION[name] = base / name
    return dict(_SESSION)


GLM5_ATTENTION = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}  # GLM-5's latent KV: 1152 B/token/layer in bf16


def glm5_attention_checkpoint(tmp_path_factory, num_layers: int = 32) -> Path:
    """A ``types`` checkpoint with GLM-5's latent KV sizes (the rest tiny), written once per session:
    what the KV-pool arithmetic depends on, at the live stack's 32 layers."""
    if num_layers not in _GLM5_SESSION:
        base = tmp_path_factory.mktemp(f"glm5-attention-{num_layers}")
        _GLM5_SESSION[num_layers] = write_glm_dsa_checkpoint(base / "model", "types", num_layers=num_layers,
                                                            **GLM5_ATTENTION)
    return _GLM5_SESSION[num_layers]


def sglang_config_gaps(config: dict) -> list[tuple]:
    """What a GlmMoeDsa config.json lacks for SGLang 0.5.23 on the CPU: ``(key, value, why)`` each.

    ``key``/``value`` can be given through ``--json-model-override-args``; ``key`` None means it
    cannot (the weights themselves would have to change) or needs a flag instead.
    """
    gaps = []
    for key, value in SGLANG_CONFIG_KEYS.items():
        if key not in config:
            gaps.append((key, value, f"config.json lacks {key} (SGLang reads it; GLM-5 configs carry {value!r})"))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) != "yarn":
        fixed = {"rope_type": "yarn", "factor": 1.0, "rope_theta": rope.get("rope_theta", 10000.0),
                 "original_max_position_embeddings": config.get("max_position_embeddings", 2048)}
        gaps.append(("rope_parameters", fixed,
                     f"rope_type {rope.get('rope_type')!r}: SGLang's CPU rope takes only yarn (factor 1 = plain RoPE)"))
    if config.get("index_head_dim") != 128:
        gaps.append((None, None, f"index_head_dim {config.get('index_head_dim')}: SGLang's indexer needs 128"))
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype != "bfloat16":
        gaps.append((None, None, f"dtype {dtype!r}: SGLang would pick float16 for float32; save bf16 or pass --dtype bfloat16"))
    return gaps
