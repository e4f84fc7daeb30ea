"""`indexcache make-checkpoint`: each flavour writes what it says (config keys, indexer weights),
and `indexcache validate` accepts or refuses patterns accordingly. Weights at tiny sizes only."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sglang_indexcache import checkpoint_writer as cw
from sglang_indexcache.configs import TINY_MODEL_DIR
from sglang_indexcache.errors import UsageError
from sglang_indexcache.model_info import load_model_info

TINY = dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=16, index_n_heads=2, index_head_dim=32, index_topk=16)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sglang_indexcache", *args], capture_output=True, text=True)


def tiny_checkpoint(path, flavour="plain", pattern=None, shard_bytes=cw.SHARD_BYTES):
    return cw.write_checkpoint(path, 64, 4, 128, flavour, pattern, overrides=TINY, shard_bytes=shard_bytes)


def tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def test_real_shapes_config(tmp_path):
    result = cli("make-checkpoint", str(tmp_path / "m"), "--layers", "8", "--flavour", "own-pattern",
                 "--pattern", "every-4", "--weights", "none")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "m/config.json").read_text())
    expected = {"num_attention_heads": 64, "q_lora_rank": 2048, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
                "qk_rope_head_dim": 64, "v_head_dim": 256, "index_n_heads": 32, "index_head_dim": 128,
                "index_topk": 2048, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
                "max_position_embeddings": 202752, "torch_dtype": "bfloat16", "first_k_dense_replace": 8,
                "mlp_layer_types": ["dense"] * 8, "moe_layer_freq": 1, "topk_method": "noaux_tc",
                "scoring_func": "sigmoid", "index_topk_pattern": "FSSSFSSS",
                "indexer_types": ["full", "shared", "shared", "shared"] * 2}
    assert {k: config[k] for k in expected} == expected
    assert "layer_types" not in config  # left for the reading transformers version
    for name in cw.TOKENIZER_FILES:
        assert (tmp_path / "m" / name).read_bytes() == (TINY_MODEL_DIR / name).read_bytes()
    assert not list((tmp_path / "m").glob("*.safetensors"))


@pytest.mark.parametrize("flavour, pattern, indexer_layers", [
    ("plain", None, [0, 1, 2, 3]),
    ("own-pattern", "FSFS", [0, 1, 2, 3]),  # the pattern lives in config.json only
    ("glm52", "FSFS", [0, 2]),              # S layers' indexer weights left out
])
def test_flavours(tmp_path, flavour, pattern, indexer_layers):
    path = tmp_path / "m"
    summary = tiny_checkpoint(path, flavour, pattern)
    config = json.loads((path / "config.json").read_text())
    assert ("index_topk_pattern" in config, "indexer_types" in config) == (pattern is not None,) * 2
    assert config.get("index_topk_pattern") == pattern
    weights = tensors(path)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    info = load_model_info(path)
    assert sorted(info.layers_with_indexer) == indexer_layers == summary["indexer_layers"]
    # the same names and shapes as transformers' own model, less what the flavour leaves out
    shapes = cw.weight_shapes(config)
    assert set(weights) <= set(shapes)
    assert all(tuple(weights[n].shape) == shapes[n] for n in weights)
    left_out = {n for n in shapes if n not in weights}
    assert all(".indexer." in n for n in left_out) and len(left_out) == 5 * (4 - len(indexer_layers))
    wq = weights["model.layers.0.self_attn.indexer.wq_b.weight"].float()
    assert 0.015 < wq.std().item() < 0.025 and wq.abs().max().item() > 0
    assert torch.equal(weights["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))


def test_indexer_weights_only(tmp_path):
    """``--weights indexer``: every indexer tensor of the full checkpoint, nothing else; what the
    commands that read the indexer weights (calibrate --url, the fingerprint) accept."""
    path, full = tmp_path / "m", tmp_path / "full"
    summary = cw.write_checkpoint(path, 64, 4, 128, weights="indexer", overrides=TINY)
    tiny_checkpoint(full)
    weights, every = tensors(path), tensors(full)
    assert set(weights) == {n for n in every if ".indexer." in n} and summary["indexer_layers"] == [0, 1, 2, 3]
    assert all(weights[n].shape == every[n].shape and weights[n].dtype == torch.bfloat16 for n in weights)
    info = load_model_info(path)
    assert sorted(info.layers_with_indexer) == [0, 1, 2, 3] and info.fingerprint() == load_model_info(full).fingerprint()


def test_validate_follows_flavour(tmp_path):
    tiny_checkpoint(tmp_path / "plain")
    tiny_checkpoint(tmp_path / "glm52", "glm52", "FSFS")
    for spec in ("all-F", "FSFS", "FSSS"):
        assert cli("validate", spec, "--model", str(tmp_path / "plain")).returncode == 0
    assert cli("validate", "FSFS", "--model", str(tmp_path / "glm52")).returncode == 0
    assert cli("validate", "FSSS", "--model", str(tmp_path / "glm52")).returncode == 0
    for spec, layer in (("all-F", 1), ("FFSS", 1), ("FSSF", 3)):
        result = cli("validate", spec, "--model", str(tmp_path / "glm52"))
        assert result.returncode == 2 and f"layer {layer} is F but" in result.stderr, result.stderr


def test_shards_and_reproducible(tmp_path):
    tiny_checkpoint(tmp_path / "a", shard_bytes=100_000)
    tiny_checkpoint(tmp_path / "b")
    index = json.loads((tmp_path / "a/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    first, second = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert index["metadata"]["total_size"] == sum(2 * t.numel() for t in first.values())


@pytest.mark.parametrize("flavour, pattern, unexpected_layers", [
    ("plain", None, []),
    ("own-pattern", "FSFS", [1, 3]),  # transformers builds no indexer on S layers: their weights are extra
    ("glm52", "FSFS", []),            # nothing missing: S layers have no indexer in the model either
])
def test_loads_in_transformers(tmp_path, flavour, pattern, unexpected_layers):
    from transformers import AutoModelForCausalLM

    tiny_checkpoint(tmp_path / "m", flavour, pattern)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert sorted({cw._layer(n) for n in info["unexpected_keys"]}) == unexpected_layers
    assert all(".indexer." in n for n in info["unexpected_keys"])
    loaded, written = dict(model.named_parameters()), tensors(tmp_path / "m")
    name = "model.layers.2.self_attn.indexer.wk.weight"
    assert torch.equal(loaded[name], written[name])


@pytest.mark.parametrize("args, match", [
    (["--flavour", "glm52"], "--flavour glm52 needs a --pattern"),
    (["--pattern", "FSSS"], "--flavour plain takes no --pattern"),
    (["--flavour", "own-pattern", "--pattern", "SFFF"], "layer 0 must be F"),
    (["--flavour", "own-pattern", "--pattern", "FSS"], "3 layers but the model has 4"),
    (["--layers", "0"], "--layers must be positive"),
])
def test_cli_errors(tmp_path, args, match):
    result = cli("make-checkpoint", str(tmp_path / "m"), "--layers", "4", "--weights", "none", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert match in result.stderr, result.stderr


def test_refuses_non_empty_out(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/x").write_text("")
    with pytest.raises(UsageError, match="not an empty directory"):
        tiny_checkpoint(tmp_path / "m")
