"""Named model shapes: the real DSA models we serve, and the embedded tiny model.

Values are those of the public configs (DeepSeek-V3.2-Exp, GLM-5 = transformers' GlmMoeDsaConfig
defaults). Used to build random-weight stacks for benchmarks and to test that the same code path
accepts full-size shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .resources import embedded_model

TINY_MODEL_DIR = embedded_model("tiny-glm-dsa")

GLM_5 = {
    "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
    "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
    "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "kv_lora_rank": 512, "q_lora_rank": 2048, "qk_rope_head_dim": 64,
    "v_head_dim": 256, "qk_nope_head_dim": 192, "first_k_dense_replace": 3,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
}

DEEPSEEK_V32 = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "first_k_dense_replace": 3,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64,
}

# The 30B-A3B class model of the paper (GLM-4.7-Flash converted to DSA), approximate shapes.
GLM_30B_A3B = {
    "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
    "vocab_size": 151552, "hidden_size": 2048, "intermediate_size": 10240,
    "moe_intermediate_size": 1536, "num_hidden_layers": 47, "num_attention_heads": 20,
    "num_key_value_heads": 20, "n_shared_experts": 1, "n_routed_experts": 64,
    "num_experts_per_tok": 4, "kv_lora_rank": 512, "q_lora_rank": 768, "qk_rope_head_dim": 64,
    "v_head_dim": 256, "qk_nope_head_dim": 192, "first_k_dense_replace": 1,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
}

NAMED = {"glm-5": GLM_5, "deepseek-v3.2": DEEPSEEK_V32, "glm-30b-a3b": GLM_30B_A3B}


def named_config(name: str) -> dict:
    """A copy of a named config; ``tiny`` is read from the embedded model's config.json."""
    if name == "tiny":
        path = TINY_MODEL_DIR / "config.json"
        if not path.is_file():
            raise UsageError(f"the embedded model is missing: {path} not found")
        return json.loads(path.read_text())
    if name not in NAMED:
        raise UsageError(f"unknown config {name!r}; choose one of tiny, {', '.join(NAMED)}")
    return dict(NAMED[name])


def load_config(name: str) -> dict:
    """A named config (:func:`named_config`), or the JSON of a ``config.json`` file named by path."""
    if name.endswith(".json") or Path(name).exists():
        path = Path(name)
        if path.is_dir():
            raise UsageError(f"--config {path} is a directory; give a config.json file (or a named config)")
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"config file {path} is not valid JSON: {exc}") from None
    return named_config(name)
