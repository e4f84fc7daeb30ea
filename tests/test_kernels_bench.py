"""`indexcache bench kernels` on a machine without a GPU: argument checks and clear exit-2 errors."""

from __future__ import annotations

import pytest
import torch

from sglang_indexcache.bench import kernels as bench_kernels
from sglang_indexcache.cli import main


def test_number_lists():
    assert bench_kernels._ints("8k, 200,128K") == [8192, 200, 131072]


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
