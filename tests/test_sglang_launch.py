"""Start-up of the patched server: a bad IndexCache flag is one line on stderr and exit 2.

Runs SGLang's own ``run_server`` (each supported release) (the entry of ``python -m sglang.launch_server`` and
``sglang serve``) in a fresh interpreter on the CPU; resolution stops before any server starts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from sglang_support import checkpoints as ck
from sglang_support import trees as sgl

pytestmark = pytest.mark.sglang

LAUNCH = """
import os, sys
import torch
from sglang.test.test_utils import maybe_stub_sgl_kernel
maybe_stub_sgl_kernel()
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # DSA hooks ask unconditionally (FACTS.md)
from sglang.launch_server import run_server
from sglang.srt.server_args import prepare_server_args
run_server(prepare_server_args(sys.argv[1:]))
"""


def _launch(tree, release, argv, tmp_path):
    return subprocess.run([sys.executable, "-c", LAUNCH, *argv], env=sgl.env(tree, release), capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--index-cache-pattern", "SFFFFFFF"], "layer 0 must be F"),
    (["--index-cache-pattern", "FSSF"], "4 layers but the model has 8"),
    (["--index-cache-decode-stride", "4"], "--index-cache-decode-stride needs a pattern"),
    (["--index-cache-every", "4", "--index-cache-decode-stride", "4", "--enable-torch-compile"],
     "--index-cache-decode-stride 4 cannot run with --enable-torch-compile"),
])
def test_bad_flag_is_one_line_and_exit_2(tmp_path_factory, tmp_path, sglang_release, flags, message):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    model = ck.write_glm_dsa_checkpoint(tmp_path / "model", "types")
    proc = _launch(trees.patched, sglang_release, ["--model-path", str(model), "--device", "cpu", *flags], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("IndexCache: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_feature_copying_every_index_k_is_refused_with_a_pattern(tmp_path_factory, tmp_path, sglang_release):
    """S layers hold no index-K: a server feature this release runs only with every layer's stops at
    start-up (shared_layers.UNSUPPORTED; the first one of each release is launched here)."""
    from sglang_indexcache.sglang_overlay.shared_layers import UNSUPPORTED

    _, flag, _, _ = UNSUPPORTED[sglang_release][0]
    trees = sgl.trees(tmp_path_factory, sglang_release)
    model = ck.write_glm_dsa_checkpoint(tmp_path / "model", "types")
    argv = ["--model-path", str(model), "--device", "cpu", "--index-cache-every", "4", flag]
    proc = _launch(trees.patched, sglang_release, argv, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("IndexCache: error:")]
    assert len(lines) == 1 and f"{flag} cannot run with --index-cache-every 4" in lines[0], proc.stderr[-2000:]
