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


@pytest.mark.sglang
def test_dry_run_checks_the_installed_sglang(model_and_file, tmp_path_factory):
    model, path = model_and_file
    proc = serve("--model", model, "--pattern-file", path, "--dry-run", pythonpath=sgl.trees(tmp_path_factory).stock)
    assert proc.returncode == 2 and "is not patched: make apply-patches" in proc.stderr and proc.stdout == ""


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
    assert proc.returncode == 2 and "is not patched: make apply-patches" in proc.stderr
