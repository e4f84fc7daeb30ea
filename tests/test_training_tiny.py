"""train-tiny: corpus split, tokenizer, DSA losses, the three stages, resume, and the embedded model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sglang_indexcache.cli import main as cli_main
from sglang_indexcache.configs import TINY_MODEL_DIR
from sglang_indexcache.errors import UsageError
from sglang_indexcache.models import swap
from sglang_indexcache.training import corpus, dsa_losses, evaluate, tiny

MICRO = {  # a 3-layer model that trains a step in well under a second on 2 CPU cores
    "num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "index_n_heads": 2, "index_head_dim": 32, "index_topk": 8,
}
SEQ = 32
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # the value {i}\n" * 3 for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return corpus.train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def stream(tokenizer):
    return corpus.encode_stream(TEXTS, tokenizer)


def micro_model(tokenizer, seed=0, **overrides):
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    config = tiny.build_config(len(tokenizer), tokenizer.eos_token_id, {**MICRO, **overrides})
    return GlmMoeDsaForCausalLM(config).eval()


def test_corpus_split_is_by_name_and_skips_non_utf8(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    for i in range(40):
        (root / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (root / "site-packages" / "third.py").write_text("third = 1\n")
    (root / "pkg" / "latin.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: skipped
    docs = corpus.stdlib_documents(root)
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) == 40
    assert not any("site-packages" in n or n.endswith("latin.py") for n in names)
    train, heldout = corpus.split_documents(docs, heldout_fraction=0.3)
    assert {d.name for d in train}.isdisjoint(d.name for d in heldout)
    assert len(train) + len(heldout) == 40 and heldout  # 30% of 40 names: some held out
    again = corpus.split_documents(list(reversed(docs)), heldout_fraction=0.3)[1]
    assert [d.name for d in again] == [d.name for d in heldout]  # order-free
    assert all(corpus.name_rank(d.name) < 0.3 for d in heldout)
    with pytest.raises(UsageError):
        corpus.stdlib_documents(tmp_path / "missing")


def test_tokenizer_round_trip_and_stream(tmp_path, tokenizer, stream):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == corpus.EOS_TOKEN and len(loaded) == len(tokenizer) <= 300
    ids = loaded(TEXTS[5], add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == TEXTS[5]
    assert stream.dtype == np.uint16 and int((stream == loaded.eos_token_id).sum()) == len(TEXTS)
    assert stream[-1] == loaded.eos_token_id


def test_kl_is_zero_at_target_and_ignores_invisible_keys():
    scores = torch.randn(2, 5, 5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    assert abs(float(dsa_losses.kl_to_scores(p, scores))) < 1e-6
    q = torch.softmax(torch.randn(2, 5, 5).masked_fill(~causal, float("-inf")), dim=-1)
    kl = dsa_losses.kl_to_scores(q, scores)
    manual = (q * (q.clamp_min(1e-30).log() - torch.log_softmax(scores, -1).masked_fill(~causal, 0))).sum(-1)
    assert float(kl) > 0 and math.isclose(float(kl), float(manual.mean()), rel_tol=1e-5)
    # sparse: top-2 of each row; row 0 has one visible key, so its second pick is invisible
    topk = dsa_losses.causal_topk(scores, 2)
    sparse = dsa_losses.sparse_indexer_loss(q, scores, topk)
    assert torch.isfinite(sparse) and float(sparse) >= 0


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_dense_and_sparse_modes_match_transformers(tokenizer, stream):
    model = micro_model(tokenizer)
    batch = tiny.sample_batch(stream, 2, SEQ, 0, 0, 0)
    sparse_ref = _logits(model, batch)  # transformers' own indexers, top-k 8 of 32
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = SEQ
    dense_ref = _logits(model, batch)
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = MICRO["index_topk"]
    assert not torch.allclose(dense_ref, sparse_ref, atol=1e-4)  # the sparsity is real
    swap.wrap_indexers(model, dsa_losses.TrainIndexer, require_all=True, mode="dense")
    torch.testing.assert_close(_logits(model, batch), dense_ref, atol=1e-5, rtol=1e-5)
    swap.wrap_indexers(model, dsa_losses.TrainIndexer, require_all=True, mode="sparse")
    torch.testing.assert_close(_logits(model, batch), sparse_ref, atol=1e-5, rtol=1e-5)


def test_sparse_stage_losses_reach_disjoint_parameters(tokenizer, stream):
    model = micro_model(tokenizer).train()
    model.set_attn_implementation("eager")
    wrappers = swap.wrap_indexers(model, dsa_losses.TrainIndexer, require_all=True, mode="sparse")
    probe = dsa_losses.AttentionProbe(model)
    batch = tiny.sample_batch(stream, 2, SEQ, 0, 2, 0)
    out = model(input_ids=batch, labels=batch)
    kl = torch.stack(dsa_losses.indexer_losses(wrappers, probe)).sum()
    named = dict(model.named_parameters())
    lm_grads = torch.autograd.grad(out.loss, list(named.values()), retain_graph=True, allow_unused=True)
    kl_grads = torch.autograd.grad(kl, list(named.values()), allow_unused=True)
    probe.remove()
    for (name, _), g_lm, g_kl in zip(named.items(), lm_grads, kl_grads):
        if ".indexer." in name:
            assert g_lm is None or not g_lm.any(), name  # top-k selection carries no LM gradient
            assert g_kl is not None and g_kl.any(), name
        else:
            assert g_kl is None or not g_kl.any(), name  # indexer input detached
    assert lm_grads[list(named).index("model.embed_tokens.weight")].any()


def _args(tmp_path, steps, **kw):
    return tiny.TrainArgs(out_dir=str(tmp_path / "model"), work_dir=str(tmp_path / "work"), steps=steps,
                          batch_size=2, seq_len=SEQ, save_every=1, log_every=1, model=MICRO, **kw)


def test_stages_resume_and_saved_checkpoint(tmp_path, tokenizer, stream):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    args = _args(tmp_path, {"dense": 2, "warmup": 2, "sparse": 1})
    summary = tiny.train(args, stream, tokenizer)
    assert set(summary["stages"]) == set(tiny.STAGES)
    with pytest.raises(UsageError, match="--resume"):
        tiny.train(args, stream, tokenizer)
    args.steps["sparse"] = 3
    summary = tiny.train(args, stream, tokenizer, resume=True)
    assert list(summary["stages"]) == ["sparse"]  # dense and warm-up were done: only sparse goes on
    log = [json.loads(line) for line in open(tmp_path / "work" / "train_log.jsonl")]
    assert [(r["stage"], r["step"]) for r in log] == [
        ("dense", 1), ("dense", 2), ("warmup", 1), ("warmup", 2), ("sparse", 1), ("sparse", 2), ("sparse", 3)]
    assert all(math.isfinite(r["lm"]) for r in log) and all("kl" in r for r in log if r["stage"] != "dense")
    out = tmp_path / "model"
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in tiny.SGLANG_CONFIG_KEYS} == tiny.SGLANG_CONFIG_KEYS
    assert config["indexer_types"] == ["full"] * 3 and config["rope_parameters"]["rope_type"] == "yarn"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    for i in range(3):
        assert f"model.layers.{i}.self_attn.indexer.wk.weight" in keys
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batch = tiny.sample_batch(stream, 1, SEQ, 1, 0, 0)
    with torch.no_grad():
        assert math.isfinite(float(model(input_ids=batch, labels=batch).loss))


def test_warmup_trains_only_the_indexers(tmp_path, tokenizer, stream):
    model = micro_model(tokenizer).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tiny.run_stage(model, stream, _args(tmp_path, {"dense": 0, "warmup": 2, "sparse": 0}), 1, 0, None)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name.replace(".inner.", ".")], p)
        assert changed == (".indexer." in name), name


def test_yarn_factor_one_is_plain_rope(tokenizer):
    yarn = micro_model(tokenizer)
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRotaryEmbedding

    cfg = GlmMoeDsaConfig(**{**MICRO, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    x, pos = torch.zeros(1, 16, 8), torch.arange(16)[None]
    cos_y, sin_y = yarn.model.rotary_emb(x, pos)
    cos_d, sin_d = GlmMoeDsaRotaryEmbedding(cfg)(x, pos)
    torch.testing.assert_close(cos_y, cos_d)
    torch.testing.assert_close(sin_y, sin_d)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1,2"], "--steps"),
    (["--lr", "a,b,c"], "--lr"),
    (["--model-json", '{"bogus": 1}'], "--model-json"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    code = cli_main(["train-tiny", "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w"), *argv])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").is_file(), reason="embedded model not built")
def test_embedded_model_meets_its_contract():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (TINY_MODEL_DIR / "model.safetensors").stat().st_size <= 16 * 2**20
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["num_hidden_layers"] >= 12 and config["index_topk"] == 64 and config["index_head_dim"] == 128
    assert config["indexer_types"] == ["full"] * config["num_hidden_layers"]
    assert {k: config[k] for k in tiny.SGLANG_CONFIG_KEYS} == tiny.SGLANG_CONFIG_KEYS
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    assert all(layer.self_attn.indexer is not None for layer in model.model.layers)
    text = (TINY_MODEL_DIR / "data" / "evaluation.txt").read_text()[:4000]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:256]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < 0.75 * math.log(len(tok))  # far better than a uniform guess over the vocabulary


def test_pattern_losses_apply_and_restore_indexers(tokenizer, stream):
    model = micro_model(tokenizer)
    blocks = torch.stack([tiny.sample_batch(stream, 1, SEQ, 3, 0, i)[0] for i in range(3)])
    with torch.no_grad():
        reference = float(model(input_ids=blocks, labels=blocks).loss)
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    calls = []
    hooks = [ix.register_forward_hook(lambda m, a, o: calls.append(m.layer_idx)) for ix in indexers]
    losses = evaluate.pattern_losses(model, blocks, {"all-F": "FFF", "FSS": "FSS"}, batch_size=2)
    for h in hooks:
        h.remove()
    assert math.isclose(losses["all-F"], reference, rel_tol=1e-5)
    assert calls == [0, 1, 2, 0, 1, 2] + [0, 0]  # two batches each; S layers never run their indexer
    assert losses["FSS"] != losses["all-F"]
    assert [layer.self_attn.indexer for layer in model.model.layers] == indexers
    unigram = evaluate.unigram_loss(stream, blocks, len(tokenizer))
    counts = np.bincount(stream.astype(np.int64), minlength=len(tokenizer)) + 1.0
    manual = -np.log(counts / counts.sum())[blocks[:, 1:].numpy()].mean()
    assert math.isclose(unigram, manual, rel_tol=1e-9)


def test_run_trains_evaluates_and_writes_the_summary(tmp_path, tokenizer, stream):
    """tiny.run, the library side of `train-tiny`: a prepared corpus is reused, the three stages run,
    the held-out losses of the saved model and the unigram baseline land in work_dir/summary.json."""
    out, work = tmp_path / "m", tmp_path / "w"
    tokenizer.save_pretrained(out)
    (out / "data").mkdir()
    (out / "data" / "evaluation.txt").write_text("".join(TEXTS[:20]))
    work.mkdir()
    np.save(work / "train_tokens.npy", stream)
    args = tiny.TrainArgs(out_dir=str(out), work_dir=str(work), steps=dict.fromkeys(tiny.STAGES, 2),
                          lr=dict.fromkeys(tiny.STAGES, 1e-3), batch_size=2, seq_len=SEQ, save_every=2, log_every=1,
                          vocab_size=len(tokenizer), model=MICRO, bf16=False)
    summary = tiny.run(args, eval_batch_size=2)
    assert json.loads((work / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert list(summary["stages"]) == list(tiny.STAGES)
    assert set(summary["heldout"]["losses"]) == {"all-F", "every-2", "every-4", "only-0", "unigram"}
    assert all(math.isfinite(v) for v in summary["heldout"]["losses"].values())
    assert (out / "model.safetensors").is_file()
