"""Multi-layer distillation: the loss (values, gradient = centroid KL, m=0 = DSA warm-up), its
model-side targets, and `indexcache distill` (only F-layer indexer tensors change; resume)."""

import json

import pytest
import torch
from dsa_models import micro_config
from safetensors import safe_open

from sglang_indexcache import cli
from sglang_indexcache.models import indexer as dsa
from sglang_indexcache.training.distill import Distiller
from sglang_indexcache.training.distill_loss import (ServedTarget, causal_mask, indexer_log_probs,
                                                     multi_layer_kl_ref, selected_mask)



def tiny_model(seed=0, layers=3, topk=8, vocab=97):
    """The micro GlmMoeDsa of tests/dsa_models.py with eager attention, random weights."""
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    config = micro_config(layers, topk, vocab)
    config._attn_implementation = "eager"
    return GlmMoeDsaForCausalLM(config).eval()


def random_case(b=2, s=7, m=2, form="warmup", k=3):
    """Random logits ``[b, s, s]``, m+1 target distributions and the visible mask of a form."""
    if form == "warmup":
        mask = causal_mask(s).expand(b, s, s)
    else:  # a random selected set of k keys per query
        topk = torch.rand(b, s, s).masked_fill(~causal_mask(s), -1.0).topk(k, -1).indices
        mask = selected_mask(topk, s)
    ps = [torch.softmax(3 * torch.randn(b, s, s).masked_fill(~mask, float("-inf")), -1) for _ in range(m + 1)]
    return torch.randn(b, s, s), ps, mask


def direct_kl(ps, logits, mask):
    """sum_j 1/(m+1) sum_t KL(p_t^j || softmax over visible keys), written as plain loops."""
    total = 0.0
    b, s, _ = logits.shape
    for p in ps:
        for bi in range(b):
            for t in range(s):
                keys = mask[bi, t].nonzero().flatten()
                q = torch.softmax(logits[bi, t, keys].double(), -1)
                pt = p[bi, t, keys].double()
                nz = pt > 0
                total += float((pt[nz] * (pt[nz].log() - q[nz].log())).sum()) / len(ps)
    return total


@pytest.mark.parametrize("form,m", [("warmup", 0), ("warmup", 3), ("sparse", 2)])
def test_loss_equals_direct_computation(form, m):
    logits, ps, mask = random_case(m=m, form=form)
    target = ServedTarget(m + 1)
    for p in ps:
        target.add(p)
    got = target.loss(indexer_log_probs(logits, mask))
    expected = direct_kl(ps, logits, mask)
    assert abs(float(got) - expected) < 1e-4 * max(1.0, abs(expected)), (float(got), expected)
    torch.testing.assert_close(got, multi_layer_kl_ref(ps, logits, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["warmup", "sparse"])
def test_gradient_is_that_of_kl_to_the_centroid(form):
    logits, ps, mask = random_case(m=3, form=form)
    logits_a = logits.clone().requires_grad_(True)
    target = ServedTarget(len(ps))
    for p in ps:
        target.add(p)
    target.loss(indexer_log_probs(logits_a, mask)).backward()
    logits_b = logits.clone().requires_grad_(True)
    centroid = torch.stack(ps).mean(0)  # [b, s, s]
    log_q = torch.log_softmax(logits_b.masked_fill(~mask, float("-inf")), -1)
    kl = torch.where(mask & (centroid > 0), centroid * (centroid.log() - log_q), torch.zeros(()))
    kl.sum().backward()
    assert torch.isfinite(logits_a.grad).all()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-5, atol=1e-6)
    # and analytically: softmax over the visible keys minus the centroid, 0 at masked keys
    q = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(logits_a.grad, q - centroid, rtol=1e-5, atol=1e-6)


def test_served_target_refuses_wrong_counts():
    target = ServedTarget(2)
    target.add(torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError):
        target.loss(torch.zeros(1, 2, 2))
    target.add(torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError):
        target.add(torch.full((1, 2, 2), 0.5))


def _dense_reference(model, ids, layers_of_source):
    """Independent warm-up reference: transformers' own indexers made dense (index_topk >= S),
    attention probabilities and indexer inputs read by hooks, then multi_layer_kl_ref per F layer."""
    seq = ids.shape[1]
    attn, inputs, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: attn.__setitem__(i, o[1])))
        hooks.append(layer.self_attn.indexer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[:3])))
        layer.self_attn.indexer.index_topk = seq
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = model.config.index_topk
    out = {}
    mask = causal_mask(seq)
    for source, served in layers_of_source.items():
        indexer = model.model.layers[source].self_attn.indexer
        hidden, q_resid, pos = inputs[source]
        logits = dsa.indexer_logits(indexer, hidden, q_resid, pos)  # [B, S, S]
        ps = [attn[j].float().mean(1) for j in served]
        out[source] = float(multi_layer_kl_ref(ps, logits.detach(), mask)) / ids.numel()
    return out


def test_m0_is_the_dsa_warmup_loss_and_multi_layer_matches_reference():
    model = tiny_model(seed=1, layers=4, topk=4)
    ids = torch.randint(0, 97, (2, 12))
    for pattern, groups in [("FFFF", {0: [0], 1: [1], 2: [2], 3: [3]}), ("FSSF", {0: [0, 1, 2], 3: [3]})]:
        got = Distiller(model, pattern, "warmup").step(ids)
        expected = _dense_reference(model, ids, groups)
        for layer in groups:
            assert got[layer] == pytest.approx(expected[layer], rel=1e-4, abs=1e-7), (pattern, layer)


def test_single_layer_uses_only_own_attention():
    model = tiny_model(seed=2, layers=4, topk=4)
    ids = torch.randint(0, 97, (1, 10))
    single = Distiller(model, "FSFS", "warmup", single_layer=True).step(ids)
    own = Distiller(model, "FFFF", "warmup").step(ids)
    multi = Distiller(model, "FSFS", "warmup").step(ids)
    assert single[0] == pytest.approx(own[0], rel=1e-5) and single[2] == pytest.approx(own[2], rel=1e-5)
    assert multi[0] != pytest.approx(single[0], rel=1e-3)


def test_sparse_form_equals_warmup_when_topk_covers_the_sequence():
    model = tiny_model(seed=3, layers=4, topk=16)
    ids = torch.randint(0, 97, (2, 9))   # topk 16 > 9 keys: the selected set is every causal key
    torch.testing.assert_close(Distiller(model, "FSSF", "sparse").step(ids),
                               Distiller(model, "FSSF", "warmup").step(ids))


def test_sparse_form_restricts_to_the_selected_set():
    model = tiny_model(seed=4, layers=3, topk=3)
    ids = torch.randint(0, 97, (1, 10))
    attn = {}
    d = Distiller(model, "FSS", "sparse")
    hook = model.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: attn.update({1: o[1]}))
    d.step(ids)
    hook.remove()
    # layer 1 is S: its attention is exactly zero outside layer 0's selected set (and renormalised on it)
    probs = attn[1].float().mean(1)[0]  # [S, T]
    assert ((probs > 0).sum(-1) <= 3).all()
    assert (probs[3:] > 0).sum(-1).eq(3).all()   # queries with >= 3 earlier keys see exactly k = 3


def test_one_centroid_alive_at_a_time(monkeypatch):
    alive, peak = set(), [0]
    original_add = ServedTarget.add

    def add(self, p):
        original_add(self, p)
        alive.add(id(self))
        peak[0] = max(peak[0], len(alive))

    original_loss = ServedTarget.loss

    def loss(self, log_q):
        out = original_loss(self, log_q)
        alive.discard(id(self))
        return out

    monkeypatch.setattr(ServedTarget, "add", add)
    monkeypatch.setattr(ServedTarget, "loss", loss)
    Distiller(tiny_model(layers=6, topk=4), "FSSFSS", "warmup").step(torch.randint(0, 97, (1, 8)))
    assert peak[0] == 1


# ------------------------------------------------------------------ indexcache distill ---------

def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture
def checkpoint(tmp_path):
    """A 4-layer random GlmMoeDsa checkpoint stored in bf16 (as the embedded model is; trained
    tensors must be written back in it), with a byte tokenizer, and a text file."""
    model = tiny_model(seed=5, layers=4, topk=4, vocab=260)
    model_dir = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    (model_dir / "README.md").write_text("# base-model\n\nThe base model's card.\n")
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x * 2 + 1\n" * 40)
    return model_dir, data


def distill_args(model_dir, data, out, *extra):
    return ["--quiet", "distill", "--model", str(model_dir), "--pattern", "FSFS", "--data", str(data),
            "--out", str(out), "--seq-len", "24", "--batch-size", "2", "--lr", "0.01", *extra]


def tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_cli_changes_only_f_layer_indexers(checkpoint, tmp_path):
    model_dir, data = checkpoint
    out = tmp_path / "out"
    assert cli.main(distill_args(model_dir, data, out, "--steps", "3")) == 0
    before, after = tensors(model_dir), tensors(out)
    assert before.keys() == after.keys()
    assert all(before[n].dtype == after[n].dtype for n in before)   # written back in the stored dtype
    changed = {name for name in before
               if before[name].dtype != after[name].dtype
               or not torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8))}
    trained = {n for n in before if n.startswith(("model.layers.0.self_attn.indexer.", "model.layers.2.self_attn.indexer."))}
    # weights_proj / wq_b / wk of both F layers move; nothing outside the F layers' indexers does
    assert changed <= trained
    assert {n for n in changed if "wq_b" in n} == {n for n in trained if "wq_b" in n}
    assert (out / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    assert (out / "model.safetensors").stat().st_mode & 0o044   # readable by others, not mkstemp's 0600
    report = json.loads((out / "distill" / "report.json").read_text())
    assert report["steps"] == 3 and len(report["history"]) == 3
    assert set(report["lm_loss"]) == {"all_f_before", "pattern_before", "pattern_after"}
    assert (out / "distill" / "loss.png").stat().st_size > 1000
    assert json.loads((out / "pattern.json").read_text())["calibration"]["method"] == "distilled"
    card = (out / "README.md").read_text()  # describes the distilled model, not the base model's card
    assert card.startswith("# out: model with distilled IndexCache indexers") and "`FSFS`" in card
    assert "3 steps" in card and f"{report['lm_loss']['pattern_after']:.4f}" in card and "base model's card" not in card
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the staging folder is gone
    # the written checkpoint is the trained model: it reproduces the report's LM loss after training
    from sglang_indexcache.calibration.backend import TransformersBackend
    from sglang_indexcache.calibration.data import load_blocks

    backend = TransformersBackend.from_pretrained(out, pattern="FSFS")
    blocks = load_blocks(data, backend.tokenizer, 24).input_ids
    held_out = blocks[len(blocks) - max(1, len(blocks) // 10):]
    assert backend.loss(held_out).mean == pytest.approx(report["lm_loss"]["pattern_after"], rel=1e-5)
    assert cli.main(distill_args(model_dir, data, out, "--steps", "3")) == 2   # out not empty, no --resume


def test_cli_resume_continues_exactly(checkpoint, tmp_path, monkeypatch, capsys):
    model_dir, data = checkpoint
    assert cli.main(distill_args(model_dir, data, tmp_path / "straight", "--steps", "4")) == 0
    original_step, calls = Distiller.step, [0]

    def interrupted(self, ids):
        calls[0] += 1
        if calls[0] == 4:  # state was saved after step 2 (--save-every 2); die in step 4
            raise KeyboardInterrupt
        return original_step(self, ids)

    monkeypatch.setattr(Distiller, "step", interrupted)
    args = distill_args(model_dir, data, tmp_path / "resumed", "--steps", "4", "--save-every", "2")
    assert cli.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved in" in err[0] and "the same command with --resume continues" in err[0], err
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(Distiller, "step", original_step)
    for again in ([], ["--force"]):  # rerun without --resume: told to resume (--force would throw the steps away)
        assert cli.main(args + again) == 2
        err = capsys.readouterr().err.strip()
        assert "holds a saved run" in err and "pass --resume to continue it" in err, err
    assert cli.main(args + ["--resume", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 4 and "history" not in printed
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7, msg=name)
    report = json.loads((tmp_path / "resumed" / "distill" / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("pattern,extra,message", [
    ("FSF", [], "3 layers but the model has 4"),
    ("FSFS", ["--steps", "0"], "--steps: must be a positive integer"),
    ("FSFS", ["--seq-len", "4000"], "fewer than one block"),
    ("FSFS", ["--resume"], "no interrupted run to continue"),
    ("all-F", [], "nothing to distill"),
])
def test_cli_bad_input_is_one_line_exit_2(checkpoint, tmp_path, capsys, pattern, extra, message):
    model_dir, data = checkpoint
    args = distill_args(model_dir, data, tmp_path / "bad", *extra)
    args[args.index("--pattern") + 1] = pattern
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
