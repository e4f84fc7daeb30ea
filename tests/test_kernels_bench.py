"""`indexcache bench kernels` on a machine without a GPU: argument checks and clear exit-2 errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sglang_indexcache.cli import main
from sglang_indexcache.commands.options import int_list


def test_number_lists():
    assert int_list("8k, 200,128K", "--contexts") == [8192, 200, 131072]


@pytest.mark.parametrize("args,match", [
    (["--ops", "mla,attention"], "unknown --ops value"),
    (["--shapes", "llama"], "unknown shape"),
    (["--contexts", "8q"], "bad number list"),
    (["--mla-config", "{block_h: 1"], "bad number list or JSON"),
])
def test_bad_arguments_exit_2(capsys, args, match):
    assert main(["bench", "kernels", *args]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA GPU exists")
def test_without_gpu_exit_2(capsys):
    assert main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_occupancy_bounds():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from kernel_research.resources import occupancy

    # The current sparse MLA tile on an H100: ~230 registers x 8 warps, 216 KB of shared memory.
    one = occupancy(232, 8, 216 * 1024)
    assert (one["ctas_per_sm"], one["ctas_by_regs"], one["ctas_by_smem"]) == (1, 1, 1)
    two = occupancy(128, 4, 108 * 1024)
    assert (two["ctas_per_sm"], two["limited_by"]) == (2, "smem")
    assert occupancy(64, 4, 0)["limited_by"] == "regs"           # 2048 registers a warp: 8 CTAs
    assert occupancy(24, 16, 0)["limited_by"] == "warps"


@pytest.mark.parametrize("data", ["random", "contiguous", "l2"])
@pytest.mark.parametrize("shared_table", [False, True])
def test_mla_diagnose_index_sets(data, shared_table):
    """The diagnostic index sets select what they claim, through the page table the kernel gets."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from kernel_research.mla_inputs import TOPK, mla_inputs
    from sglang_indexcache.kernels.reference import sparse_mla_decode_ref

    torch.manual_seed(0)
    b, ctx, heads = 3, 4096, 4
    q, cache, table, idx, rows = mla_inputs(b, ctx, heads, shared_table, torch.device("cpu"), data)
    assert idx.shape == rows.shape == (b, TOPK) and int(idx.min()) >= 0 and int(idx.max()) < ctx
    assert torch.equal(rows.long(), table.long().gather(1, idx.long() // 64) * 64 + idx.long() % 64)
    assert all(len(set(r.tolist())) == TOPK for r in rows)        # no repeated row in a request
    if data == "contiguous":
        assert torch.equal(rows - rows[:, :1], torch.arange(TOPK, dtype=rows.dtype).expand(b, -1))
    if data == "l2" or shared_table:
        assert all(torch.equal(rows[0], r) for r in rows) == (data != "random")
    if data == "random" and not shared_table:
        assert len(set(rows.flatten().tolist())) == b * TOPK    # each request its own rows
    out = sparse_mla_decode_ref(q[:1, :, :], cache, table[:1], idx[:1], 0.1)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="data must be one of"):
        mla_inputs(b, ctx, heads, shared_table, torch.device("cpu"), "sorted")


@pytest.mark.interpreter
def test_ncu_targets_smoke():
    """scripts/ncu_targets.py (the programs scripts/gpu_mla_profile.sh profiles) runs every case at tiny
    sizes on the CPU interpreter, so an API change shows here and not in a GPU call."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(root / "scripts" / "ncu_targets.py"), "--smoke"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("smoke ok:") == 4, result.stdout


@pytest.mark.interpreter
def test_cpu_smoke_saves_rows(tmp_path):
    """`bench kernels --device cpu` under the interpreter runs the library end to end at a tiny size:
    the saved document holds the timed rows that the printed table shows."""
    import json
    import os
    import subprocess

    save = tmp_path / "kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "sglang_indexcache", "--quiet", "bench", "kernels", "--device", "cpu",
                             "--shapes", "glm-5", "--ops", "indexer-decode", "--batch", "1", "--contexts", "4k",
                             "--budget", "0.01", "--save", str(save)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(save.read_text())
    impls = {row["impl"] for row in doc["rows"] if row["kernel"] == "indexer_decode"}
    assert {"triton bf16 (ours)", "torch gather+einsum+topk"} <= impls, impls
    assert all(row["ms"] > 0 and row["context"] == 4096 for row in doc["rows"])
    assert result.stdout.count("indexer_decode | glm-5") == len(doc["rows"])
