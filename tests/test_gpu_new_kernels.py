"""scripts/gpu_new_kernels.py: its CPU smoke run goes through every import and check the GPU run makes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_new_kernels.py"


@pytest.mark.interpreter
def test_smoke_run_checks_both_kernels(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "new_kernels.json").read_text())
    assert result["ok"] and result["merge"]["eager_equal"] and len(result["mla"]["layers"]) == 3
    assert all(layer["relative_error"] < 1e-2 for layer in result["mla"]["layers"])


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
