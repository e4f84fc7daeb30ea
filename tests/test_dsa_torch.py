"""models.indexer: the fast indexer equals transformers' GlmMoeDsaIndexer (scores, top-k, model loss)."""

import pytest
import torch
from dsa_models import micro_config
from transformers import GlmMoeDsaForCausalLM

from sglang_indexcache.models import indexer as dsa


def tiny_model(seed=0, layers=3, topk=8):
    torch.manual_seed(seed)
    config = micro_config(layers, topk, vocab=97)
    config._attn_implementation = "eager"
    return GlmMoeDsaForCausalLM(config).eval()


@pytest.mark.parametrize("seq", [5, 40])   # 5 < topk: queries with fewer keys than k
def test_fast_indexer_equals_transformers(seq):
    model = tiny_model()
    captured = {}
    layer = model.model.layers[1]
    orig = layer.self_attn.indexer
    hook = orig.register_forward_hook(lambda m, args, kwargs_out: captured.setdefault("ref", kwargs_out))
    inputs = torch.randint(0, 97, (2, seq))
    with torch.no_grad():
        ref_loss = model(inputs, labels=inputs).loss
    hook.remove()
    dsa.install_fast_indexers(model)
    fast = layer.self_attn.indexer
    got = {}
    fast.recorder = lambda idx, topk: got.setdefault(idx, topk)
    with torch.no_grad():
        loss = model(inputs, labels=inputs).loss
    assert isinstance(fast, dsa.FastIndexer)
    ref_topk, topk = captured["ref"], got[1]
    assert topk.shape == ref_topk.shape and topk.dtype == torch.int32
    # compare as sets per query (order of equal scores may differ)
    same = (topk.sort(-1).values == ref_topk.sort(-1).values).float().mean().item()
    assert same > 0.99
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    dsa.remove_fast_indexers(model)
    assert model.model.layers[1].self_attn.indexer is orig


def test_indexer_logits_has_gradients():
    model = tiny_model()
    indexer = model.model.layers[0].self_attn.indexer
    hidden = torch.randn(1, 6, 64, requires_grad=True)
    q_resid = torch.randn(1, 6, 48)
    pos = model.model.rotary_emb(hidden, torch.arange(6)[None])
    logits = dsa.indexer_logits(indexer, hidden, q_resid, pos)
    assert logits.shape == (1, 6, 6)
    logits.logsumexp(-1).sum().backward()
    assert indexer.wq_b.weight.grad is not None and indexer.wq_b.weight.grad.abs().sum() > 0
    assert indexer.weights_proj.weight.grad.abs().sum() > 0


def test_chunked_scores_equal_unchunked(monkeypatch):
    q, k, w = torch.randn(2, 9, 3, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 3)
    full = dsa.chunked_index_scores(q, w, k, 0.5)
    monkeypatch.setattr(dsa, "MAX_CHUNK_ELEMENTS", 2 * 3 * 9 * 2)   # chunks of 2 queries
    torch.testing.assert_close(dsa.chunked_index_scores(q, w, k, 0.5), full)
    direct = (torch.relu(torch.einsum("bshd,btd->bsht", q, k) * 0.5) * w[..., None]).sum(2)
    torch.testing.assert_close(full, direct)
