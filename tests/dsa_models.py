"""Small random-weight GlmMoeDsa checkpoints (transformers save_pretrained + a byte-level tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM, PreTrainedTokenizerFast

VOCAB = 300  # 256 byte symbols + a few merges + <eos>
SAMPLE = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"
    "The quick brown fox jumps over the lazy dog. Sparse attention reads only the top tokens.\n"
)


def micro_config(layers=6, topk=8, vocab=VOCAB, **extra) -> GlmMoeDsaConfig:
    config = GlmMoeDsaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16,
        index_topk=topk, index_head_dim=32, index_n_heads=4, first_k_dense_replace=layers,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        indexer_types=["full"] * layers, **extra,
    )
    config._attn_implementation = "sdpa"
    return config


def micro_model(layers=6, topk=8, seed=0, scale=1.0) -> GlmMoeDsaForCausalLM:
    """Random weights; ``scale`` > 1 sharpens the indexer scores so that patterns matter more."""
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(micro_config(layers, topk)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 * scale)
    return model


def byte_tokenizer(texts=(SAMPLE,)) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_micro_checkpoint(path: Path, layers=6, topk=8, seed=0, drop_indexers=()) -> Path:
    """Save a micro model + tokenizer; ``drop_indexers`` removes those layers' indexer weights."""
    path = Path(path)
    model = micro_model(layers, topk, seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    if drop_indexers:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(path / "model.safetensors"))
        marks = tuple(f"layers.{i}.self_attn.indexer." for i in drop_indexers)
        kept = {k: v for k, v in weights.items() if not any(m in k for m in marks)}
        save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["indexer_types"] = ["shared" if i in drop_indexers else "full" for i in range(layers)]
        (path / "config.json").write_text(json.dumps(config))
    return path


def write_text(path: Path, n_docs=40, seed=0) -> Path:
    """A small deterministic text corpus (one document per ``.txt`` file is not needed: one file)."""
    import random

    rng = random.Random(seed)
    words = SAMPLE.split()
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path
