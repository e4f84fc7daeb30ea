"""Shared fixtures: small HF-format DSA checkpoints written with safetensors (no model code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file


def write_dsa_checkpoint(path: Path, num_layers: int = 8, indexer_layers=None, index_head_dim: int = 128,
                         extra_config=None, sharded: bool = False) -> Path:
    """A GlmMoeDsa-shaped config plus safetensors holding indexer weights on ``indexer_layers``.

    Weights are random (the fingerprint reads names and shapes only). ``indexer_layers=None`` puts
    an indexer on every layer; a list models GLM-5.2-style checkpoints with indexers on F layers only.
    """
    path.mkdir(parents=True, exist_ok=True)
    hidden, heads = 64, 4
    config = {
        "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
        "num_hidden_layers": num_layers, "hidden_size": hidden, "num_attention_heads": heads,
        "vocab_size": 256, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "index_topk": 16, "index_n_heads": heads,
        "index_head_dim": index_head_dim,
    }
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    layers = range(num_layers) if indexer_layers is None else indexer_layers
    tensors = {"model.embed_tokens.weight": rng.standard_normal((256, hidden), dtype=np.float32)}
    for i in layers:
        prefix = f"model.layers.{i}.self_attn.indexer."
        tensors[prefix + "wq_b.weight"] = rng.standard_normal((heads * index_head_dim, 48), dtype=np.float32)
        tensors[prefix + "wk.weight"] = rng.standard_normal((index_head_dim, hidden), dtype=np.float32)
        tensors[prefix + "weights_proj.weight"] = rng.standard_normal((heads, hidden), dtype=np.float32)
    if sharded:
        names = sorted(tensors)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for shard, shard_names in shards.items():
            save_file({n: tensors[n] for n in shard_names}, str(path / shard))
            weight_map.update({n: shard for n in shard_names})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture
def dsa_checkpoint(tmp_path):
    return write_dsa_checkpoint(tmp_path / "model")


@pytest.fixture
def make_checkpoint(tmp_path):
    def make(name="model", **kwargs):
        return write_dsa_checkpoint(tmp_path / name, **kwargs)
    return make


@pytest.fixture(scope="module", params=__import__("sglang_support.trees", fromlist=["RELEASES"]).RELEASES,
                ids=lambda release: f"sglang-{release}")
def sglang_release(request) -> str:
    """Each supported SGLang release in turn (``patches/sglang-version``): the SGLang suites run on all."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs Triton kernels in the CPU interpreter (the ``worker`` fixture of the
    kernel tests) ``interpreter``, so ``make test-fast`` can leave those slow cases out."""
    for item in items:
        if "worker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.interpreter)
