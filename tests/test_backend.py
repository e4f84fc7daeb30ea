"""TransformersBackend: equals transformers' own forward, S layers never run an indexer, no reload."""

import pytest
import torch
from transformers import GlmMoeDsaForCausalLM

from dsa_models import micro_config, micro_model, save_micro_checkpoint
from sglang_indexcache import configs
from sglang_indexcache.models import indexer as dsa
from sglang_indexcache.calibration.backend import TransformersBackend
from sglang_indexcache.errors import ModelDirError, PatternError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", layers=6, topk=8, seed=1)


@pytest.fixture(scope="module")
def backend(checkpoint):
    return TransformersBackend.from_pretrained(checkpoint)


def reference_loss(checkpoint, pattern, ids):
    """transformers' own forward with ``indexer_types`` = pattern (a fresh model, its own indexer)."""
    config = micro_config(len(pattern), 8)
    config.indexer_types = ["full" if c == "F" else "shared" for c in pattern]
    model = GlmMoeDsaForCausalLM.from_pretrained(checkpoint, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("pattern", ["FFFFFF", "FSSFSS", "FSFSSS"])
def test_loss_equals_transformers_forward(checkpoint, backend, pattern):
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))  # 40 > topk 8
    backend.set_pattern(pattern)
    got = backend.loss(ids, batch_size=2)
    assert got.tokens == 3 * 39
    want = reference_loss(checkpoint, pattern, ids)
    assert got.mean == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_patterns_change_the_loss_without_reload(backend):
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    model_id = id(backend.model)
    losses = {}
    for pattern in ("FFFFFF", "FSSSSS", "FFFFFF"):
        backend.set_pattern(pattern)
        losses.setdefault(pattern, []).append(backend.loss(ids).mean)
    assert id(backend.model) == model_id
    assert losses["FFFFFF"][0] == losses["FFFFFF"][1]  # switching back restores the exact loss
    assert abs(losses["FSSSSS"][0] - losses["FFFFFF"][0]) > 1e-6


def test_s_layers_never_call_their_indexer(backend):
    calls = []
    hooks = [ix.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, ix in enumerate(backend.indexers)]
    try:
        backend.set_pattern("FSSFSS")
        backend.loss(torch.randint(0, 300, (1, 20)))
        assert sorted(set(calls)) == [0, 3]
        assert [backend.model.model.layers[i].self_attn.indexer is None for i in range(6)] == [
            False, True, True, False, True, True]
        calls.clear()
        state = backend.begin(torch.randint(0, 300, (1, 20)))
        for i in range(6):
            state = backend.layer(i, state, full=i == 0)
        assert calls == [0]
    finally:
        for h in hooks:
            h.remove()
        backend.set_pattern("FFFFFF")


def test_fast_indexers_installed_and_record_topk(backend):
    assert all(isinstance(ix, dsa.FastIndexer) for ix in backend.indexers)
    backend.set_pattern("FSSSSS")
    topk = backend.record_topk(torch.randint(0, 300, (2, 30)))
    assert backend.pattern == "FSSSSS"  # recording does not change the pattern
    assert len(topk) == 6 and all(t.shape == (2, 30, 8) and t.dtype == torch.int32 for t in topk)
    assert not all(torch.equal(topk[0], t) for t in topk[1:])  # each layer's own choice
    backend.set_pattern("FFFFFF")


def test_bad_patterns_refused(backend):
    with pytest.raises(PatternError, match="layer 0 must be F"):
        backend.set_pattern("SFFFFF")
    with pytest.raises(PatternError, match="6 DSA layers"):
        backend.set_pattern("FFF")


def test_missing_indexer_weights(tmp_path):
    path = save_micro_checkpoint(tmp_path / "partial", layers=4, drop_indexers=(1, 3))
    with pytest.raises(ModelDirError, match="no indexer weights for F layer"):
        TransformersBackend.from_pretrained(path, pattern="FFFF")
    b = TransformersBackend.from_pretrained(path, pattern="FSFS")
    assert b.pattern == "FSFS" and b.indexers[1] is None
    with pytest.raises(PatternError, match="layer 1 is F"):
        b.set_pattern("FFFS")


def test_from_config_glm5_shapes_at_depth_2():
    # GLM-5's attention and indexer shapes (64 heads, MLA 512+64, 32 index heads x 128, top-k 2048);
    # vocabulary and dense MLP are shrunk only to keep this test's memory small.
    config = configs.named_config("glm-5")
    b = TransformersBackend.from_config(config, num_layers=2, dtype=torch.bfloat16,
                                        overrides={"vocab_size": 512, "intermediate_size": 256})
    attn = b.model.model.layers[1].self_attn
    assert b.num_layers == 2 and attn.indexer.inner.wq_b.out_features == 32 * 128
    assert attn.kv_lora_rank == 512 and attn.num_heads == 64 and b.config.index_topk == 2048
    ids = torch.randint(0, 512, (1, 12))
    full = b.loss(ids).mean
    b.set_pattern("FS")
    shared = b.loss(ids).mean
    assert torch.isfinite(torch.tensor([full, shared])).all()
    # seq 12 < top-k 2048: every visible key is selected either way, so F and S agree
    assert shared == pytest.approx(full, rel=1e-2)


@pytest.mark.parametrize("seq,chunk", [(300, 64), (50, 128)])  # several chunks with a ragged end; one chunk
def test_causal_index_scores_equal_masked_full(seq, chunk):
    from sglang_indexcache.models.indexer import causal_index_scores

    q, k, w = torch.randn(2, seq, 3, 16), torch.randn(2, seq, 16), torch.randn(2, seq, 3)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None]
    want = dsa.apply_mask(dsa.chunked_index_scores(q, w, k, 0.25), mask)
    got = dsa.apply_mask(causal_index_scores(q, w, k, 0.25, chunk=chunk), mask)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got[mask.expand(2, -1, -1)], want[mask.expand(2, -1, -1)], rtol=1e-5, atol=1e-5)
