"""Decode-stride top-k reuse (teacher-forced): selection semantics, stride 1 = today, the backend."""

import pytest
import torch

from dsa_models import micro_model
from sglang_indexcache import pattern as pat
from sglang_indexcache.calibration.backend import TransformersBackend
from sglang_indexcache.errors import PatternError
from sglang_indexcache.models import indexer as dsa
from sglang_indexcache.models.decode_reuse import refresh_rows, reuse_topk

NEG = float("-inf")


def visible_sets(topk: torch.Tensor) -> list[list[list[int]]]:
    """``[B][S]`` sorted lists of the keys a query really attends to (entries <= its position)."""
    out = []
    for row in topk.tolist():
        out.append([sorted(i for i in entries if i <= t) for t, entries in enumerate(row)])
    return out


def plain_reuse(scores: torch.Tensor, k: int, stride: int) -> list[list[list[int]]]:
    """The rule written as a loop over queries, from full causal scores ``[B, S, T]`` (-inf masked).

    Query t: the positions t0+1..t (newest last, always in), plus the stored top-k of t0 (keys <= t0)
    minus its lowest-scored entries so that at most k remain.
    """
    out = []
    for b in range(scores.shape[0]):
        rows = []
        for t in range(scores.shape[1]):
            t0 = (t // stride) * stride
            visible = [s for s in range(t0 + 1) if scores[b, t0, s] > NEG]
            stored = sorted(visible, key=lambda s: -float(scores[b, t0, s]))[:k]
            newest = list(range(t0 + 1, t + 1))[-k:]
            keep = stored[:max(0, k - len(newest))]
            rows.append(sorted(keep + newest))
        out.append(rows)
    return out


def test_hand_example():
    # 8 positions, k = 3, stride 4: refreshes at t0 = 0 and 4. At t0 = 4 the scores rank 2 > 0 > 4 > 1 > 3.
    k, stride, seq = 3, 4, 8
    stored_idx = torch.tensor([[[0, 6, 7], [2, 0, 4]]])                 # [1, R=2, k]; 6, 7: no key (-inf)
    stored_score = torch.tensor([[[1.0, NEG, NEG], [9.0, 5.0, 3.0]]])
    got = reuse_topk(stored_idx, stored_score, stride, seq, keys=seq)
    assert got.dtype == torch.int32 and got.shape == (1, seq, k)
    assert visible_sets(got)[0] == [
        [0],        # t=0: its own top-k (one visible key)
        [0, 1],     # t=1: stored {0} + newest 1
        [0, 1, 2],  # t=2
        [1, 2, 3],  # t=3: 3 newest fill the budget, the stored 0 is dropped
        [0, 2, 4],  # t=4: refresh
        [0, 2, 5],  # t=5: the lowest stored (4, score 3) dropped, 5 in
        [2, 5, 6],  # t=6: 0 (score 5) dropped too
        [5, 6, 7],  # t=7: only the newest
    ]
    reuse_steps = [t for t in range(seq) if t % stride]                 # between refreshes: own token last
    assert got[0, reuse_steps, -1].tolist() == reuse_steps
    # slots without a key point after the query (masked by the attention), never at a key <= t
    assert got[0, 0].tolist() == [0, seq - 1, seq - 1] and got[0, 1].tolist() == [0, seq - 1, 1]


@pytest.mark.parametrize("seq,k,stride", [
    (20, 4, 1),    # stride 1: each query its own top-k
    (20, 4, 3),    # stride not dividing seq: a short last period
    (20, 4, 8),    # stride > k: the newest fill the whole budget late in a period
    (9, 16, 2),    # k > seq: every query sees everything
])
def test_matches_the_plain_rule_on_random_scores(seq, k, stride):
    gen = torch.Generator().manual_seed(seq * 100 + k * 10 + stride)
    scores = torch.randn(2, seq, seq, generator=gen)                   # [B, S, T]; distinct (no ties)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), NEG)
    kk = min(k, seq)
    stored = scores[:, refresh_rows(seq, stride)].topk(kk, dim=-1)
    got = reuse_topk(stored.indices, stored.values, stride, seq, keys=seq)
    assert visible_sets(got) == plain_reuse(scores, kk, stride)
    for b in range(2):
        for t in range(seq):
            keys = [i for i in got[b, t].tolist() if i <= t]
            assert len(keys) == len(set(keys)) <= kk                   # no duplicates, within budget
            assert t in keys or t % stride == 0                        # newest in (a refresh: its own top-k)
    if stride == 1:                                                    # the same sets as today's top-k
        assert visible_sets(got) == visible_sets(dsa.causal_topk(scores, k))


def test_stored_rows_must_match():
    with pytest.raises(ValueError, match="expected 3"):
        reuse_topk(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), 4, 10, 10)


LAYERS, TOPK, SEQ = 4, 6, 40


@pytest.fixture(scope="module")
def backend():
    return TransformersBackend(micro_model(LAYERS, TOPK, seed=2, scale=3.0))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (3, SEQ), generator=torch.Generator().manual_seed(3))


def test_stride_one_is_today_exactly(backend, ids):
    for pattern in ("FFFF", "FSFS"):
        backend.set_pattern(pattern)
        today = backend.loss(ids, batch_size=2)
        backend.set_decode_stride(4)
        strided = backend.loss(ids, batch_size=2)
        backend.set_decode_stride([1] * LAYERS)
        again = backend.loss(ids, batch_size=2)
        assert again.nll_sum == today.nll_sum and again.tokens == today.tokens  # bit-identical
        assert strided.nll_sum != today.nll_sum
    backend.set_pattern("FFFF")


def record_with_scores(backend, ids):
    """Each F layer's recorded selection and its own full causal scores ``[B, S, T]`` on its input."""
    recorded, own_scores = {}, {}
    for ix in backend.indexers:
        ix.recorder = lambda layer, topk: recorded.__setitem__(layer, topk)
    try:
        state = backend.begin(ids)
        for i in range(backend.num_layers):
            if backend.pattern[i] == pat.FULL:
                attn = backend.model.model.layers[i].self_attn
                hidden = backend.model.model.layers[i].input_layernorm(state.hidden)
                q_resid = attn.q_a_layernorm(attn.q_a_proj(hidden))
                logits = dsa.indexer_logits(backend.indexers[i].inner, hidden, q_resid, state.position_embeddings)
                own_scores[i] = dsa.apply_mask(logits, state.mask[:, 0])
            state = backend.layer(i, state, backend.pattern[i] == pat.FULL)
    finally:
        for ix in backend.indexers:
            ix.recorder = None
    return recorded, own_scores


@torch.inference_mode()
def test_indexer_selection_follows_the_rule(backend, ids):
    """Each F layer's recorded selection = the plain rule on that layer's own full causal scores."""
    backend.set_pattern("FSFF")
    backend.set_decode_stride([3, 1, 5, 2])
    try:
        recorded, own_scores = record_with_scores(backend, ids[:1])
    finally:
        backend.set_decode_stride(1)
        backend.set_pattern("FFFF")
    assert sorted(recorded) == [0, 2, 3]
    for i, stride in ((0, 3), (2, 5), (3, 2)):
        check_rule(recorded[i][0], own_scores[i][0], TOPK, stride)


def check_rule(selection: torch.Tensor, scores: torch.Tensor, k: int, stride: int) -> None:
    """The rule, tie-tolerant (relu scores tie at 0): per query the newest positions are in and the
    stored part has the best scores at ``t0``. ``selection [S, k]``, ``scores [S, T]`` (-inf masked)."""
    for t, entries in enumerate(selection.tolist()):
        t0 = (t // stride) * stride
        keys = [i for i in entries if i <= t]
        newest = list(range(t0 + 1, t + 1))[-k:]
        stored = [i for i in keys if i not in newest]
        assert len(keys) == len(set(keys)) and set(newest) <= set(keys), f"query {t}: {keys}"
        visible = sorted((float(v) for v in scores[t0, :t0 + 1]), reverse=True)
        want = visible[:max(0, k - len(newest))]
        got = sorted((float(scores[t0, i]) for i in stored), reverse=True)
        assert max(stored, default=0) <= t0 and got == pytest.approx(want, abs=1e-6), f"query {t}: {keys}"


def test_layer_stride_argument_is_temporary(backend, ids):
    state = backend.begin(ids[:1])
    full = backend.layer(0, state, True)
    strided = backend.layer(0, state, True, stride=4)
    assert not torch.equal(full.topk, strided.topk)
    assert backend.indexers[0].decode_stride == 1 and torch.equal(backend.layer(0, state, True).topk, full.topk)


@pytest.mark.parametrize("bad,match", [
    ([1, 2, 3], "3 entries but the model has 4"),
    ([1, 0, 1, 1], r"decode_stride\[1\] is 0"),
    ([1, 2.0, 1, 1], r"decode_stride\[1\] is 2.0"),
    ([1, True, 1, 1], r"decode_stride\[1\] is True"),
    ("4", "must be a list"),
])
def test_bad_strides_refused(backend, bad, match):
    with pytest.raises(PatternError, match=match):
        backend.set_decode_stride(bad)
    assert backend.decode_stride == [1] * LAYERS


def test_effective_stride():
    assert pat.effective_stride("FSFS", [4, 1, 4, 9]) == 4.0                  # S entries unused
    assert pat.effective_stride("FFF", [1, 2, 2]) == pytest.approx(1.5)        # harmonic mean
    assert pat.describe_strides("FSFF", [8, 1, 4, 2]) == "8/4/2" and pat.describe_strides("FS", [2, 7]) == "2"


def test_study_script_smoke(tmp_path):
    """scripts/decode_stride_study.py end to end on a micro checkpoint: every section, resumable."""
    import importlib.util
    import json
    from pathlib import Path

    from dsa_models import save_micro_checkpoint, write_text

    model = save_micro_checkpoint(tmp_path / "m", layers=4, topk=4, seed=1)
    data = write_text(tmp_path / "d.txt", n_docs=20)
    spec = importlib.util.spec_from_file_location("study", Path(__file__).parents[1] / "scripts" / "decode_stride_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    prefix = tmp_path / "out" / "s"
    argv = ["--model", str(model), "--eval-data", str(data), "--cal-data", str(data), "--eval-tokens", "256",
            "--cal-tokens", "128", "--cal-tokens-all-f", "128", "--seq-len", "32", "--strides", "1,2",
            "--patterns", "all-F,every-2", "--target", "2", "--search-all-f", "--drop-keys", "all-F@2",
            "--out-prefix", str(prefix)]
    assert study.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "s.json").read_text())
    assert sorted(doc["uniform"]) == ["all-F@1", "all-F@2", "every-2@1", "every-2@2"]
    sens = doc["sensitivity"]["all-F"]
    assert sens["base_loss"] == pytest.approx(doc["uniform"]["all-F@1"]["loss"], rel=1e-9) and len(sens["loss"]) == 4
    assert doc["search"]["all-F"]["effective_stride"] >= 2 and (tmp_path / "out" / "s-search-all-F.json").exists()
    assert doc["drop_random"]["all-F@2"]["drop"] == "random" and (tmp_path / "out" / "s.png").stat().st_size > 1000
    assert study.main(argv) == 0  # a rerun measures nothing again
    assert json.loads((tmp_path / "out" / "s.json").read_text())["uniform"] == doc["uniform"]


def test_random_drop_keeps_the_rule_but_not_the_order():
    from sglang_indexcache.models.decode_reuse import drop_order

    gen = torch.Generator().manual_seed(7)
    seq, k, stride = 24, 6, 4
    scores = torch.randn(1, seq, seq, generator=gen).masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), NEG)
    stored = scores[:, refresh_rows(seq, stride)].topk(k, dim=-1)
    idx, val = drop_order(stored.indices, stored.values, "random")
    assert torch.equal(idx.sort(-1).values, stored.indices.sort(-1).values)             # the same stored sets
    assert torch.isfinite(val[0, 0, :1]).all() and not torch.isfinite(val[0, 0, 1:]).any()  # empty slots last
    got = visible_sets(reuse_topk(idx, val, stride, seq, seq))
    lowest = visible_sets(reuse_topk(stored.indices, stored.values, stride, seq, seq))
    assert got != lowest and all(len(g) == len(w) for g, w in zip(got[0], lowest[0]))
    with pytest.raises(ValueError, match="unknown drop order"):
        drop_order(idx, val, "oldest")
