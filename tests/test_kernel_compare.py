"""scripts/gpu_kernel_compare.py (issue 18): the comparison's plumbing on the CPU, SGLang's layouts,
and (GPU only) SGLang 0.5.17's kernels against the PyTorch stand-ins the smoke test uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_kernel_compare.py"
sys.path.insert(0, str(ROOT / "scripts"))

from kernel_research import sglang_ops as so  # noqa: E402
from kernel_research.compare_common import exact_recall  # noqa: E402
from sglang_indexcache.bench.timing import spread  # noqa: E402
from sglang_indexcache.kernels.reference import set_overlap  # noqa: E402


def test_set_overlap_ignores_padding_and_order():
    a = torch.tensor([[3, 1, 2, -1], [5, 6, 7, 8], [-1, -1, -1, -1]], dtype=torch.int32)
    b = torch.tensor([[2, 9, 3, -1], [8, 7, 6, 5], [1, 2, -1, -1]], dtype=torch.int32)
    assert set_overlap(a, b).tolist() == pytest.approx([2 / 3, 1.0, 1.0])


def test_exact_recall_tolerates_near_ties_only():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.9999, 0.0, float("-inf")]])
    swapped = torch.tensor([[0, 1, 3]], dtype=torch.int32)           # 1.9999 for 2.0: a near-tie
    wrong = torch.tensor([[0, 1, 4]], dtype=torch.int32)             # 0.0 for 2.0: an error
    masked = torch.tensor([[0, 1, 5]], dtype=torch.int32)            # -inf: not a candidate
    near = exact_recall(swapped, scores, 3)
    assert near["recall"] == pytest.approx(2 / 3, abs=1e-4) and near["within_tol"] == 1.0
    assert exact_recall(wrong, scores, 3)["within_tol"] == pytest.approx(2 / 3, abs=1e-4)
    assert exact_recall(masked, scores, 3)["invalid"] == 1


def test_spread_percentiles():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["ms"], s["n"]) == (3.0, 5) and s["p10"] < s["ms"] < s["p90"]


def test_index_k_buffer_is_sglangs_layout():
    """Page i: 64 x 128 e4m3 bytes, then 64 fp32 scales (SGLang's DSATokenToKVPool); the views read
    it back without a copy."""
    pages = 3
    k = torch.randn(pages * so.PAGE, so.D_INDEX)
    k8, scale = so.quant_rows_fp8(k)
    buf = so.index_k_buffer(k8, scale)
    assert buf.shape == (pages, so.PAGE * 132) and buf.dtype == torch.uint8
    assert torch.equal(buf[1, :8192], k8[64:128].reshape(-1).view(torch.uint8))
    assert torch.equal(buf[2, 8192:].view(torch.float32), scale[128:])
    kc, ks = so.index_k_views(buf)
    assert kc.data_ptr() == buf.data_ptr() and kc.stride() == (8448, 128, 1) and ks.stride() == (2112, 1)
    assert torch.equal(kc.reshape(-1, 128).view(torch.uint8), k8.view(torch.uint8))
    assert torch.equal(ks.reshape(-1), scale)
    err = (kc.float() * ks[..., None]).reshape(-1, 128) - k
    assert err.abs().max() <= 0.07 * k.abs().max()                   # e4m3: 3 mantissa bits


def test_quantized_queries_fold_the_scale_into_the_weights():
    q, w = torch.randn(5, 4, 128), torch.randn(5, 4)
    q8, w8 = so.quant_queries_fp8(q, w)
    _, qs = so.quant_rows_fp8(q)
    assert torch.allclose(w8, w * qs) and q8.dtype == torch.float8_e4m3fn
    assert torch.allclose(q8.float() * qs[..., None], q, atol=0.07 * q.abs().max())


def test_flat_slots_keep_padding():
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    pos = torch.tensor([[0, 63, 64, 70, -1]], dtype=torch.int32)
    assert so.flat_slots(table, pos).tolist() == [[128, 191, 0, 6, -1]]


def test_bad_arguments_exit_2_with_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", "x", "--only", "attention"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown --only" in result.stderr


def test_smoke_failures_catch_a_disagreement():
    import gpu_kernel_compare as gkc

    case = {"id": "c", "kind": "indexer_prefill", "status": "ok", "impls": {"ours": {"ms": 1.0}},
            "checks": {"overlap ours fp8 vs sglang": {"mean": 0.5},
                       "ours vs sglang (all rows)": {"max_abs_diff": 1.0, "within_bf16_tol_1e-2": False}}}
    assert len(gkc.smoke_failures({"cases": [case]})) == 2
    case["checks"] = {"overlap ours fp8 vs sglang": {"mean": 1.0}}
    assert gkc.smoke_failures({"cases": [case]}) == []


def test_one_import_block():
    """Every import the run makes (smoke or GPU) is in ``imports()``, which the smoke run executes:
    no function of the script imports anything else (issue 24: the GPU path imported a moved module
    the smoke run never reached)."""
    import ast

    tree = ast.parse(SCRIPT.read_text())
    allowed = {"imports", "_import_package"}
    stray = [f"{fn.name}:{node.lineno}" for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
             and fn.name not in allowed for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not stray, f"imports outside imports(): {stray}"
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
           for a in n.names} | {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top & {"torch", "triton", "sglang_indexcache", "kernel_research"}, top


def test_smoke_run(tmp_path):
    """The whole script on the CPU interpreter at tiny shapes, SGLang's side replaced by the PyTorch
    references: every case runs, the JSON is written, ours agrees with the references (~60 s)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke ok" in result.stdout
    doc = json.loads((tmp_path / "kernel_compare.json").read_text())
    assert doc["sglang_side_real"] is False and "smoke test only" in doc["sglang_side"]
    assert [c["kind"] for c in doc["cases"]] == ["indexer_prefill", "indexer_decode", "mla_decode", "mla_prefill",
                                                 "whole_prefill"]
    for case in doc["cases"]:
        assert case["status"] == "ok" and all("ms" in r for r in case["impls"].values()), case


# ------------------------------------------------------------------ GPU: SGLang's real kernels -------

def _real_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        return so.load_sglang_ops()
    except Exception as exc:                                        # noqa: BLE001
        pytest.skip(f"SGLang 0.5.17's stack does not load here: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [32, 64])
def test_gpu_sglang_indexer_matches_stand_in(heads):
    """DeepGEMM's logits (prefill and paged decode) and sgl-kernel's top-k agree with the references
    the smoke test substitutes, so the plumbing checked on the CPU is the one that runs."""
    ops, ref, dev = _real_ops(), so.reference_ops(), torch.device("cuda")
    n, t, p0 = 4096, 256, 4096 - 256
    q8, w8 = so.quant_queries_fp8(torch.randn(t, heads, 128, device=dev), torch.randn(t, heads, device=dev))
    k8, ks = so.quant_rows_fp8(torch.randn(n, 128, device=dev))
    lo = torch.zeros(t, dtype=torch.int32, device=dev)
    hi = (p0 + 1 + torch.arange(t, device=dev)).int()
    got, want = ops.mqa_logits(q8, k8, ks, w8, lo, hi), ref.mqa_logits(q8, k8, ks, w8, lo, hi)
    valid = torch.arange(n, device=dev)[None, :] < hi[:, None]
    assert torch.allclose(got[valid], want[valid], rtol=1e-2, atol=1e-2 * want[valid].abs().max())
    assert set_overlap(ops.topk(want, hi, 2048, lo), ref.topk(want, hi, 2048, lo)).min() >= 0.99
    b, per = 4, 70
    table = torch.randperm(b * per, device=dev).int().view(b, per)
    buf = so.index_k_buffer(*so.quant_rows_fp8(torch.randn(b * per * 64, 128, device=dev)))
    lens = torch.tensor([1, 2049, 3000, per * 64], dtype=torch.int32, device=dev)
    qd, wd = q8[:b].contiguous(), w8[:b].contiguous()
    got = ops.paged_logits(qd, buf, wd, lens, table, ops.paged_meta(lens))
    want = ref.paged_logits(qd, buf, wd, lens, table, None)
    valid = torch.arange(per * 64, device=dev)[None, :] < lens[:, None]
    assert torch.allclose(got[:, :per * 64][valid], want[valid], rtol=1e-2, atol=1e-2 * want[valid].abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [64, 128])
def test_gpu_flash_mla_sparse_matches_stand_in(heads):
    ops, ref, dev = _real_ops(), so.reference_ops(), torch.device("cuda")
    s, slots_n = 8, 64 * 64
    kv = torch.randn(slots_n, 1, 576, device=dev, dtype=torch.bfloat16)
    slots = torch.rand(s, slots_n, device=dev).topk(2048, dim=1).indices.int()
    slots[0, 100:] = -1                                             # padded row
    q = torch.randn(s, heads, 576, device=dev, dtype=torch.bfloat16)
    lens = (slots >= 0).sum(1).int()
    got, want = ops.sparse_mla(q, kv, slots, 576 ** -0.5, lens), ref.sparse_mla(q, kv, slots, 576 ** -0.5)
    assert (got.float() - want.float()).abs().max() <= 1e-2
