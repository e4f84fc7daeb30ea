"""`indexcache serve`: checks the pattern file and the installed SGLang, prints the launch command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sglang_support import trees as sgl

from sglang_indexcache import pattern_file
from sglang_indexcache.model_info import load_model_info


def serve(*args, pythonpath=None):
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(sgl.REPO)])
    return subprocess.run([sys.executable, "-m", "sglang_indexcache", "serve", *map(str, args)],
                          capture_output=True, text=True, env=env)


@pytest.fixture
def model_and_file(make_checkpoint, tmp_path):
    model = make_checkpoint("m", num_layers=8)
    path = tmp_path / "p.json"
    pattern_file.write(path, pattern_file.make_document("FSSFSSSF", load_model_info(model)))
    return model, path


@pytest.mark.sglang
def test_dry_run_prints_the_launch_command(model_and_file, tmp_path_factory):
    model, path = model_and_file
    patched = sgl.trees(tmp_path_factory).patched
    proc = serve("--model", model, "--pattern-file", path, "--dry-run", "--", "--port", "31000", pythonpath=patched)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(
        f"-m sglang.launch_server --model-path {model} --index-cache-pattern-file {path} --port 31000")
    proc = serve("--model", model, "--calibration", "--dry-run", pythonpath=patched)
    assert proc.stdout.strip().endswith("--index-cache-calibration")
    proc = serve("--model", model, "--pattern-file", path, "--decode-stride", "4", "--dry-run", pythonpath=patched)
    assert proc.stdout.strip().endswith(f"--index-cache-pattern-file {path} --index-cache-decode-stride 4")
    proc = serve("--model", model, "--pattern-file", path, "--decode-stride", "0", "--dry-run", pythonpath=patched)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.sglang
def test_dry_run_checks_the_installed_sglang(model_and_file, tmp_path_factory):
    model, path = model_and_file
    proc = serve("--model", model, "--pattern-file", path, "--dry-run", pythonpath=sgl.trees(tmp_path_factory).stock)
    assert proc.returncode == 2 and "is not patched: indexcache apply-patches" in proc.stderr and proc.stdout == ""


def test_pattern_file_of_another_model_is_refused(model_and_file, make_checkpoint):
    _, path = model_and_file
    other = make_checkpoint("other", num_layers=8, indexer_layers=[0, 3, 6])
    proc = serve("--model", other, "--pattern-file", path, "--dry-run")
    assert proc.returncode == 2 and "fingerprint does not match" in proc.stderr and proc.stdout == ""


def test_needs_a_pattern_file_or_calibration(model_and_file):
    model, _ = model_and_file
    proc = serve("--model", model, "--dry-run")
    assert proc.returncode == 2 and "--pattern-file" in proc.stderr


@pytest.mark.sglang
def test_refuses_an_unpatched_sglang(model_and_file, tmp_path_factory, sglang_release):
    model, path = model_and_file
    trees = sgl.trees(tmp_path_factory, sglang_release)
    proc = serve("--model", model, "--pattern-file", path, pythonpath=trees.stock)
    assert proc.returncode == 2 and "is not patched: indexcache apply-patches" in proc.stderr


@pytest.mark.sglang
def test_config_only_checkpoint_serves_with_dummy_weights(model_and_file, tmp_path, tmp_path_factory, sglang_release):
    """make-checkpoint --weights none is the checkpoint for --load-format dummy: serve checks what the
    config decides and says in one line that the indexer weights were not checked."""
    import shutil

    model, path = model_and_file
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copyfile(model / "config.json", config_only / "config.json")
    patched = sgl.trees(tmp_path_factory, sglang_release).patched
    proc = serve("--model", config_only, "--pattern-file", path, "--dry-run", "--", "--load-format", "dummy",
                 pythonpath=patched)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "indexer weights not checked: the load format reads no safetensors weights"]
    assert proc.stdout.strip().endswith(f"--index-cache-pattern-file {path} --load-format dummy")
    proc = serve("--model", config_only, "--calibration", "--dry-run", pythonpath=patched)
    assert proc.returncode == 0 and "has no safetensors weights (a config-only checkpoint)" in proc.stderr
    bad = tmp_path / "bad.json"  # layer 0 S is still refused
    bad.write_text(path.read_text().replace('"pattern": "FSSFSSSF"', '"pattern": "SSSFSSSF"'))
    proc = serve("--model", config_only, "--pattern-file", bad, "--dry-run", "--", "--load-format", "dummy",
                 pythonpath=patched)
    assert proc.returncode == 2 and "layer 0 must be F" in proc.stderr
