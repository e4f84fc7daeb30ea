"""Pattern files (indexcache-pattern/v1), model info from safetensors headers, fingerprints."""

import json

import pytest

from sglang_indexcache import pattern_file
from sglang_indexcache.atomic import atomic_write_text
from sglang_indexcache.errors import ModelDirError, PatternError, PatternFileError
from sglang_indexcache.model_info import load_model_info
from sglang_indexcache.validation import check_against_model


def test_model_info_reads_headers(dsa_checkpoint):
    info = load_model_info(dsa_checkpoint)
    assert info.num_dsa_layers == 8
    assert info.layers_with_indexer == set(range(8))
    assert info.indexer_weights["model.layers.3.self_attn.indexer.wk.weight"] == [128, 64]
    assert info.fingerprint().startswith("sha256:")


def test_sharded_checkpoint_same_fingerprint(make_checkpoint):
    single = load_model_info(make_checkpoint("a"))
    sharded = load_model_info(make_checkpoint("b", sharded=True))
    assert sharded.indexer_weights == single.indexer_weights
    assert sharded.fingerprint() == single.fingerprint()


def test_roundtrip(tmp_path, dsa_checkpoint):
    info = load_model_info(dsa_checkpoint)
    doc = pattern_file.make_document("fsssFSSS", info, method="greedy", keep_ratio=0.25,
                                     baseline_loss=2.0, loss=2.1, steps=[])
    out = tmp_path / "p.json"
    pattern_file.write(out, doc)
    read = pattern_file.read(out)
    assert read["pattern"] == "FSSSFSSS"
    assert read["format"] == "indexcache-pattern/v1"
    assert read["calibration"]["method"] == "greedy"
    pattern_file.check_matches(read, info)
    assert pattern_file.resolve(str(out), 8, info) == "FSSSFSSS"


def _write(tmp_path, dsa_checkpoint, mutate):
    doc = pattern_file.make_document("FSSSFSSS", load_model_info(dsa_checkpoint))
    mutate(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="indexcache-pattern/v2"), "only 'indexcache-pattern/v1'"),
    (lambda d: d.pop("format"), "has format None"),
    (lambda d: d.update(pattern="SSSSFSSS"), "layer 0 must be F"),
    (lambda d: d.update(pattern="FSSS"), "4 layers but the model has 8"),
    (lambda d: d.update(pattern="FSSSFSS?"), "position 8"),
    (lambda d: d.pop("pattern"), "lacks a valid 'pattern'"),
    (lambda d: d["model"].pop("fingerprint"), "lacks model.fingerprint"),
])
def test_read_refuses_bad_documents(tmp_path, dsa_checkpoint, mutate, match):
    with pytest.raises(PatternFileError, match=match):
        pattern_file.read(_write(tmp_path, dsa_checkpoint, mutate))


@pytest.mark.parametrize("content, match", [
    ('{"format": "indexcache-pattern/v1", "pattern": "FSS', "not valid JSON"),   # truncated
    ("\x00\x01garbage", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_read_refuses_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PatternFileError, match=match):
        pattern_file.read(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(PatternFileError, match="does not exist"):
        pattern_file.read(tmp_path / "nope.json")


def test_fingerprint_mismatch_names_the_field(tmp_path, make_checkpoint):
    doc = pattern_file.make_document("FSSSFSSS", load_model_info(make_checkpoint("a")))
    other = load_model_info(make_checkpoint("b", extra_config={"hidden_size": 96}))
    with pytest.raises(PatternFileError, match="hidden_size is 64 in the file but 96"):
        pattern_file.check_matches(doc, other)
    other = load_model_info(make_checkpoint("c", index_head_dim=64))
    with pytest.raises(PatternFileError, match="index_head_dim is 128 in the file but 64"):
        pattern_file.check_matches(doc, other)
    other = load_model_info(make_checkpoint("d", num_layers=12))
    with pytest.raises(PatternFileError, match="num_dsa_layers is 8 in the file but 12"):
        pattern_file.check_matches(doc, other)
    other = load_model_info(make_checkpoint("e", indexer_layers=[0, 4]))
    with pytest.raises(PatternFileError, match="indexer_weights"):
        pattern_file.check_matches(doc, other)


def test_resolve_specs(dsa_checkpoint):
    assert pattern_file.resolve("all-F", 4) == "FFFF"
    assert pattern_file.resolve("every-2", 5) == "FSFSF"
    assert pattern_file.resolve(" fssf ", 4) == "FSSF"
    assert pattern_file.spec_label("every-4") == "every-4"
    with pytest.raises(PatternError):
        pattern_file.resolve("every-0", 4)
    with pytest.raises(PatternError, match="neither every-N"):
        pattern_file.resolve("every-x", 4)


def test_check_against_model_missing_indexer(make_checkpoint):
    info = load_model_info(make_checkpoint(indexer_layers=[0, 4]))
    assert check_against_model("FSSSFSSS", info) == "FSSSFSSS"
    with pytest.raises(PatternError, match="layer 2 is F but .* has no indexer weights"):
        check_against_model("FSFSFSSS", info)


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{bad")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')),
     "not a DSA model"),
])
def test_model_dir_errors(tmp_path, setup, match):
    path = tmp_path / "m"
    setup(path)
    with pytest.raises(ModelDirError, match=match):
        load_model_info(path)


def test_model_dir_without_indexer(make_checkpoint):
    with pytest.raises(ModelDirError, match="no indexer weights"):
        load_model_info(make_checkpoint(indexer_layers=[]))


def test_model_dir_without_weights(tmp_path, dsa_checkpoint):
    (dsa_checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="no model.safetensors"):
        load_model_info(dsa_checkpoint)


def test_truncated_safetensors(dsa_checkpoint):
    (dsa_checkpoint / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ModelDirError, match="truncated"):
        load_model_info(dsa_checkpoint)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "x.json", "1")
    atomic_write_text(tmp_path / "x.json", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert (tmp_path / "x.json").read_text() == "2"


def test_decode_stride_roundtrip(tmp_path, dsa_checkpoint):
    info = load_model_info(dsa_checkpoint)
    strides = [8, 1, 1, 1, 4, 1, 1, 1]
    out = tmp_path / "p.json"
    pattern_file.write(out, pattern_file.make_document("FSSSFSSS", info, decode_stride=strides))
    assert pattern_file.read(out)["decode_stride"] == strides
    assert pattern_file.resolve_with_strides(str(out), 8, info) == ("FSSSFSSS", strides)
    assert pattern_file.resolve(str(out), 8, info) == "FSSSFSSS"


def test_older_files_have_no_decode_stride(tmp_path, dsa_checkpoint):
    path = _write(tmp_path, dsa_checkpoint, lambda d: None)
    assert "decode_stride" not in json.loads(path.read_text())
    assert pattern_file.resolve_with_strides(str(path), 8) == ("FSSSFSSS", None)
    assert pattern_file.resolve_with_strides("every-4", 8) == ("FSSSFSSS", None)


@pytest.mark.parametrize("strides, match", [
    ([1, 2, 4], "decode_stride has 3 entries but the model has 8"),
    ([1, 2, 4, 8, 1, 1, 1, 0], r"decode_stride\[7\] is 0"),
    ([1, -2, 1, 1, 1, 1, 1, 1], r"decode_stride\[1\] is -2"),
    ([1, 2.5, 1, 1, 1, 1, 1, 1], r"decode_stride\[1\] is 2.5"),
    ([1, "4", 1, 1, 1, 1, 1, 1], r"decode_stride\[1\] is '4'"),
    ([False] * 8, r"decode_stride\[0\] is False"),
    (4, "must be a list of 8 positive integers"),
    (None, "must be a list of 8 positive integers"),
])
def test_bad_decode_stride_refused(tmp_path, dsa_checkpoint, strides, match):
    path = _write(tmp_path, dsa_checkpoint, lambda d: d.update(decode_stride=strides))
    with pytest.raises(PatternFileError, match=match) as err:
        pattern_file.read(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    if strides is not None:  # None: make_document's "no strides"; in a file: a bad value
        with pytest.raises(PatternError, match=match):
            pattern_file.make_document("FSSSFSSS", load_model_info(dsa_checkpoint), decode_stride=strides)


def test_server_serves_a_pattern_files_decode_stride(tmp_path, dsa_checkpoint):
    """The patched server takes a pattern file's per-layer decode_stride (patch 0007): strides above 1 on
    S layers only mean nothing to store (stride 1, stock), on F layers they are the server's strides."""
    from sglang_indexcache.sglang_overlay import settings

    info = load_model_info(dsa_checkpoint)
    path = tmp_path / "p.json"
    flags = settings.Flags(str(dsa_checkpoint), None, None, str(path), None, False)
    for strides, served in (([1, 4, 1, 1, 1, 1, 1, 1], None), ([8, 1, 1, 1, 4, 1, 1, 1], (8, 1, 1, 1, 4, 1, 1, 1))):
        pattern_file.write(path, pattern_file.make_document("FSSSFSSS", info, decode_stride=strides))
        pattern, _, file_strides = settings._flag_pattern(flags, info)
        assert pattern == "FSSSFSSS" and file_strides == strides
        got, source = settings._strides(flags, pattern, file_strides)
        assert got == served and (source is None) is (served is None)
