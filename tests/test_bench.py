"""`indexcache bench`: the layer-stack benchmark runs at tiny sizes, its rows are complete and sane,
its CPU kernel paths compute what the kernels' references specify, and bad input exits 2."""

import json

import pytest
import torch

from sglang_indexcache import cli
from sglang_indexcache.bench.ops import KernelSet
from sglang_indexcache.bench.stack import Stack

# A DSA layer small enough for CI: 4 heads, latent 64 + rope 16, indexer 4 x 32, top-k 64 (the
# contexts below exceed it, so attention is really sparse), dense MLP (no experts).
SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
         "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
         "v_head_dim": 32, "index_topk": 64, "index_head_dim": 32, "index_n_heads": 4}
# The same with experts: exercises the MoE width model (router, active and touched experts).
SMALL_MOE = dict(SMALL, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                 first_k_dense_replace=1)

ROW_KEYS = {"context", "pattern", "pattern_string", "seconds", "speedup", "limit", "floor_limit",
            "indexer_share", "components", "floor", "efficiency", "spread", "repeats"}


@pytest.fixture
def config_file(tmp_path):
    def write(config):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return str(path)
    return write


def run_cli(capsys, *args):
    code = cli.main(["--quiet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prefill_rows(capsys, config_file, tmp_path):
    plot = tmp_path / "speedup.png"
    code, out, err = run_cli(capsys, "bench", "prefill", "--config", config_file(SMALL), "--layers", "8",
                             "--contexts", "128,256", "--repeats", "2", "--warmup", "0", "--threads", "1",
                             "--json", "--plot", str(plot))
    assert code == 0, err
    doc = json.loads(out)
    rows = doc["rows"]
    assert [(r["context"], r["pattern"]) for r in rows] == [
        (c, p) for c in (128, 256) for p in ("all-F", "every-2", "every-4", "every-8")]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["seconds"] > 0 and r["speedup"] > 0
        assert r["limit"] >= 1.0 and r["floor_limit"] >= 1.0
        assert 0 < r["indexer_share"] < 1
        assert set(r["components"]) == {"indexer", "attention", "dense"}
        s_layers = r["pattern_string"].count("S")
        assert (r["limit"] > 1.0) == (s_layers > 0)
    assert [r["pattern_string"] for r in rows[:4]] == ["FFFFFFFF", "FSFSFSFS", "FSSSFSSS", "FSSSSSSS"]
    assert "random weights" in doc["note"]
    assert plot.stat().st_size > 0


def test_decode_rows_and_table(capsys, config_file):
    code, out, err = run_cli(capsys, "bench", "decode", "--config", config_file(SMALL_MOE), "--layers", "4",
                             "--contexts", "512", "--batch", "1,3", "--repeats", "2", "--warmup", "1",
                             "--patterns", "every-4", "--threads", "1")
    assert code == 0, err
    assert "random weights" in out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| batch | context | pattern | seconds | speedup | limit | floor_limit")
    assert len(lines) == 1 + 2 * 2                                  # 2 batches x (all-F, every-4)


def test_moe_width():
    """Prefill: top-k + shared experts per token; decode: the experts a batch touches, + shared;
    a config whose every layer is within first_k_dense_replace is a dense-MLP model."""
    from sglang_indexcache.bench.shapes import decode_experts, layer_shapes

    s = layer_shapes(SMALL_MOE)
    assert (s.moe, s.experts_active, s.ffn_inter) == (True, 3, 64)
    assert decode_experts(s, 1) == 3 and decode_experts(s, 1000) == 9
    assert 3 < decode_experts(s, 4) < 9
    dense = layer_shapes(dict(SMALL_MOE, first_k_dense_replace=8))
    assert (dense.moe, dense.experts_active, dense.ffn_inter) == (False, 1, 256)


def test_pattern_file_row(capsys, config_file, dsa_checkpoint, tmp_path):
    """A pattern file is measured beside the uniform patterns, labelled by its file name."""
    from sglang_indexcache import pattern_file
    from sglang_indexcache.model_info import load_model_info

    path = tmp_path / "searched.json"
    pattern_file.write(path, pattern_file.make_document("FFSSSSFS", load_model_info(dsa_checkpoint)))
    code, out, err = run_cli(capsys, "bench", "prefill", "--config", config_file(SMALL), "--layers", "8",
                             "--contexts", "128", "--patterns", "every-4", "--pattern-file", str(path),
                             "--repeats", "1", "--warmup", "0", "--threads", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["pattern"], r["pattern_string"]) for r in rows] == [
        ("all-F", "FFFFFFFF"), ("every-4", "FSSSFSSS"), ("searched.json", "FFSSSSFS")]


def test_s_layers_skip_the_indexer():
    """Only F layers spend indexer time; S layers still attend (with the borrowed indices)."""
    kernels = KernelSet("torch", torch.device("cpu"))
    stack = Stack(SMALL, 4, torch.device("cpu"), torch.float32, kernels)
    result = stack.prefill(stack.prefill_inputs(200), "FSSF", chunk=64)
    assert sorted(result["layers"]["indexer"]) == [0, 3]
    assert sorted(result["layers"]["attention"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("t, topk", [(150, 64), (40, 64)])  # sparse; and topk > t (-1 padding)
def test_chunked_indexer_matches_reference(t, topk):
    kernels = KernelSet("torch", torch.device("cpu"), budget_bytes=t * 4 * 4 * 37)  # odd chunk of rows
    ref = kernels.api["indexer_topk_prefill_ref"]
    # offsets keep q . k > 0, so ReLU makes no ties at 0 and the top-k set is unique
    q, w, k = torch.randn(t, 4, 32) + 1, torch.rand(t, 4) + 0.1, torch.randn(t, 32) + 1
    got = kernels.indexer_prefill(q, w, k, topk, 0.3)
    want = ref(q, w, k, torch.tensor([0, t], dtype=torch.int32), topk, 0.3)
    for g, r in zip(got.tolist(), want.tolist()):
        assert set(g) == set(r)                                     # top-k compared as sets


def test_gather_attention_matches_reference():
    kernels = KernelSet("torch", torch.device("cpu"), budget_bytes=3 * 64 * 80 * 4 * 2)  # 3 queries per step
    c, h, d_qk, d_v, t = 7, 4, 80, 64, 300
    cache = torch.randn(5, 64, d_qk)
    page_row = torch.tensor([4, 0, 3, 1, 2], dtype=torch.int32)
    indices = torch.randint(0, t, (c, 64), dtype=torch.int32)
    indices[1, 10:] = -1
    indices[2] = -1                                                # no valid index: output 0
    q = torch.randn(c, h, d_qk)
    got = kernels.attention_prefill(q, cache, page_row, indices, 0.1, d_v)
    want = kernels.api["sparse_mla_decode_ref"](q, cache, page_row.expand(c, -1), indices, 0.1, d_v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got[2].abs().max() == 0


@pytest.mark.parametrize("args, message", [
    (["prefill", "--config", "no-such-model"], "unknown config"),
    (["prefill", "--patterns", "FSXS", "--config", "{cfg}"], "pattern has 'X'"),
    (["prefill", "--patterns", "SFFF", "--config", "{cfg}", "--layers", "4"], "layer 0 must be F"),
    (["prefill", "--contexts", "0", "--config", "{cfg}"], "--contexts must be positive"),
    (["prefill", "--contexts", "4k,x", "--config", "{cfg}"], "not an integer"),
    (["prefill", "--layers", "0", "--config", "{cfg}"], "--layers: must be a positive integer"),
    (["decode", "--batch", "-1", "--config", "{cfg}"], "--batch must be positive"),
    (["decode", "--device", "cuda", "--config", "{cfg}"], "cuda"),
])
def test_bad_input_exits_2(capsys, config_file, args, message):
    if not torch.cuda.is_available() or "cuda" not in args:
        path = config_file(SMALL)
        code, _, err = run_cli(capsys, "bench", *[a.replace("{cfg}", path) for a in args])
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
