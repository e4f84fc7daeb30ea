"""The `indexcache` command line: pattern and validate verbs, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from sglang_indexcache import pattern_file
from sglang_indexcache.model_info import load_model_info


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sglang_indexcache", *args], capture_output=True, text=True)


def assert_usage_error(result, match):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in lines[0], lines[0]


def test_every_4():
    result = cli("pattern", "--every", "4", "--layers", "8")
    assert (result.returncode, result.stdout) == (0, "FSSSFSSS\n")


def test_shorthands():
    assert cli("pattern", "every-4", "--layers", "8").stdout == "FSSSFSSS\n"
    assert cli("pattern", "all-F", "--layers", "3").stdout == "FFF\n"
    result = cli("pattern", "every-4", "--layers", "8", "--from-engine-freq", "sglang")
    assert (result.returncode, result.stdout) == (0, "FFSSSFSS\n")


def test_from_engine_freq_sglang():
    result = cli("pattern", "--every", "4", "--layers", "8", "--from-engine-freq", "sglang")
    assert (result.returncode, result.stdout) == (0, "FFSSSFSS\n")


def test_engine_export():
    result = cli("pattern", " fsssfsss ", "--engine", "sglang")
    assert result.returncode == 0
    flag = result.stdout.strip()
    assert json.loads(flag.split("'")[1])["index_topk_pattern"] == "FSSSFSSS"
    result = cli("pattern", "FSSF", "--engine", "transformers")
    assert json.loads(result.stdout) == {"indexer_types": ["full", "shared", "shared", "full"]}


@pytest.mark.parametrize("args, match", [
    (("pattern", "SFFF"), "layer 0 must be F"),
    (("pattern", "FSS", "--layers", "4"), "3 layers but the model has 4"),
    (("pattern", "FS SF"), "position 3"),
    (("pattern", ""), "empty"),
    (("pattern", "--every", "0", "--layers", "8"), "positive integer"),
    (("pattern", "--every", "4", "--layers", "0"), "positive integer"),
    (("pattern", "--every", "4"), "needs --layers"),
    (("pattern", "--every", "x", "--layers", "4"), "invalid int value"),
    (("pattern",), "either a PATTERN or --every"),
    (("pattern", "every-4"), "needs --layers"),
    (("pattern", "every-0", "--layers", "8"), "positive integer"),
    (("pattern", "every-x", "--layers", "8"), "neither every-N"),
    (("pattern", "every-4", "--every", "2", "--layers", "8"), "not both"),
    (("pattern", "FS", "--engine", "tgi"), "invalid choice"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_exits_2(args, match):
    assert_usage_error(cli(*args), match)


def test_validate_ok(dsa_checkpoint):
    result = cli("validate", "every-4", "--model", str(dsa_checkpoint))
    assert result.returncode == 0 and "FSSSFSSS (2/8 indexers kept" in result.stdout


def test_validate_file(tmp_path, dsa_checkpoint, make_checkpoint):
    doc = pattern_file.make_document("FSSSFSSS", load_model_info(dsa_checkpoint), method="manual")
    path = tmp_path / "p.json"
    pattern_file.write(path, doc)
    assert cli("validate", str(path), "--model", str(dsa_checkpoint)).returncode == 0
    other = make_checkpoint("other", extra_config={"vocab_size": 512})
    assert_usage_error(cli("validate", str(path), "--model", str(other)), "vocab_size is 256 in the file but 512")
    doc["decode_stride"] = [8, 1, 1, 1, 4, 1, 1, 1]
    pattern_file.write(path, doc)
    result = cli("validate", str(path), "--model", str(dsa_checkpoint))
    assert result.returncode == 0 and "; decode stride 8/4" in result.stdout
    doc["decode_stride"] = [8, 1, 1, 1, 4, 1, 1]
    pattern_file.write(path, doc)
    assert_usage_error(cli("validate", str(path), "--model", str(dsa_checkpoint)), "decode_stride has 7 entries")


@pytest.mark.parametrize("spec, match", [
    ("FSSS", "4 layers but the model has 8"),
    ("SSSSFSSS", "layer 0 must be F"),
    ("missing.json", "does not exist"),
])
def test_validate_bad(dsa_checkpoint, spec, match):
    assert_usage_error(cli("validate", spec, "--model", str(dsa_checkpoint)), match)


def test_validate_missing_indexer(make_checkpoint):
    model = make_checkpoint(indexer_layers=[0, 4])
    assert cli("validate", "FSSSFSSS", "--model", str(model)).returncode == 0
    assert_usage_error(cli("validate", "every-2", "--model", str(model)), "layer 2 is F but")


def test_validate_model_dir_errors(tmp_path):
    assert_usage_error(cli("validate", "F", "--model", str(tmp_path / "none")), "does not exist")
    assert_usage_error(cli("validate", "F", "--model", str(tmp_path)), "no config.json")


def test_every_verb_is_documented():
    from pathlib import Path

    from sglang_indexcache.cli import VERBS

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = [verb for verb in VERBS if f"indexcache {verb} " not in text and f"indexcache {verb}\n" not in text]
    assert not missing, f"docs/cli.md lacks a synopsis of {missing}"


def test_embedded_model_by_name_from_any_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sglang_indexcache", "validate", "every-4", "--model", "tiny-glm-dsa"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "(12 DSA layers)" in result.stdout, result.stderr
    (tmp_path / "tiny-glm-dsa").mkdir()  # a local folder of that name wins (and is refused: no config.json)
    result = subprocess.run([sys.executable, "-m", "sglang_indexcache", "validate", "every-4", "--model", "tiny-glm-dsa"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert_usage_error(result, "has no config.json")


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """What `make-checkpoint --weights none` writes (config and tokenizer, no safetensors)."""
    out = tmp_path_factory.mktemp("config-only") / "m"
    result = cli("make-checkpoint", str(out), "--layers", "8", "--hidden", "256", "--weights", "none")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.safetensors"))
    return out


@pytest.mark.parametrize("spec, ok, match", [
    ("every-4", True, "FSSSFSSS (2/8 indexers kept"),
    ("FFFFFFFF", True, "(8/8 indexers kept"),
    ("SFFFFFFF", False, "layer 0 must be F"),
    ("FSSF", False, "4 layers but the model has 8"),
    ("FSxSFSSS", False, "'x' (U+0078) at position 3"),
])
def test_validate_config_only_checkpoint(config_only, spec, ok, match):
    """No safetensors: layers, layer 0, characters and length are checked; one line says the indexer
    weights were not."""
    result = cli("validate", spec, "--model", str(config_only))
    if not ok:
        assert_usage_error(result, match)
        return
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and match in lines[0], lines
    assert lines[1].startswith("indexer weights not checked:") and "no safetensors" in lines[1]


def test_config_only_checkpoint_and_pattern_files(config_only, tmp_path):
    """A pattern file of the same config passes (the weights' part of the fingerprint cannot be
    compared); one of another config is refused naming the field. Commands that load the weights
    refuse the checkpoint in one line."""
    import json
    import shutil

    weighted = tmp_path / "weighted"
    shutil.copytree(config_only, weighted)
    config = json.loads((config_only / "config.json").read_text())
    from conftest import write_dsa_checkpoint  # indexer tensors for the same config

    write_dsa_checkpoint(tmp_path / "w", num_layers=8, extra_config=config)
    shutil.copyfile(tmp_path / "w" / "model.safetensors", weighted / "model.safetensors")
    path = tmp_path / "p.json"
    pattern_file.write(path, pattern_file.make_document("FSSFSSSF", load_model_info(weighted)))
    result = cli("validate", str(path), "--model", str(config_only))
    assert result.returncode == 0 and "indexer weights not checked" in result.stdout, result.stderr
    other = tmp_path / "other"
    shutil.copytree(config_only, other)
    (other / "config.json").write_text(json.dumps(dict(config, num_attention_heads=32)))
    assert_usage_error(cli("validate", str(path), "--model", str(other)), "num_attention_heads is 64 in the file but 32")
    data = tmp_path / "d.txt"
    data.write_text("text " * 100)
    assert_usage_error(cli("eval", "--model", str(config_only), "--data", str(data), "--pattern", "all-F"),
                       "has no model.safetensors")
