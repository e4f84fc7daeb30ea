"""Server-args level regression of the patched SGLang against stock (every supported release), on the CPU.

All cases run in two fresh subprocesses (one imports the stock tree, one the patched tree): parse
the command line, resolve it, build ``ModelConfig`` and read ``dsa_layer_skips_topk`` per layer.

- Without IndexCache flags the patched tree must give exactly stock's per-layer decisions, resolved
  arguments and errors, over pattern/frequency/offset/indexer_types settings in config.json and in
  ``--json-model-override-args``.
- With a flag, the per-layer F/S equals our canonical pattern on every checkpoint flavour.
- Every bad input is refused with one clear line naming the flag.
"""

from __future__ import annotations

import json
import shutil

import pytest
from sglang_support import checkpoints as ck
from sglang_support import trees as sgl

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file
from sglang_indexcache.model_info import load_model_info

pytestmark = pytest.mark.sglang

N = ck.NUM_LAYERS
# (id, checkpoint, --json-model-override-args or None): no IndexCache flag; stock == patched.
NO_FLAG_CASES = [
    ("types", "types", None),
    ("types-override-pattern", "types", {"index_topk_pattern": "FSSFSSSF"}),  # trap: ignored by both
    ("types-override-freq", "types", {"index_topk_freq": 2}),
    ("types-override-freq-offset", "types", {"index_topk_freq": 4, "index_skip_topk_offset": 1}),
    ("types-null-types-pattern", "types", {"indexer_types": None, "index_topk_pattern": "FSFSFSFS"}),
    ("types-null-types-freq-offset", "types",
     {"indexer_types": None, "index_topk_pattern": None, "index_topk_freq": 3, "index_skip_topk_offset": 3}),
    ("types-override-types", "types", {"indexer_types": pat.to_indexer_types("FFSSFSSS")}),
    ("types-short-pattern", "types", {"indexer_types": None, "index_topk_pattern": "FS"}),  # stock: rest F
    ("types-lower-case", "types", {"indexer_types": None, "index_topk_pattern": "fsssfsss"}),  # stock: all F
    ("types-freq-zero", "types", {"indexer_types": None, "index_topk_pattern": None, "index_topk_freq": 0}),
    ("plain", "plain", None),
    ("plain-freq4", "plain_freq4", None),
    ("plain-pattern", "plain_pattern", None),
    ("plain-offset", "plain_offset", None),
    ("plain-override-freq", "plain", {"index_topk_freq": 4}),
    ("glm52", "glm52", None),
    ("glm52-null-types-pattern", "glm52", {"indexer_types": None, "index_topk_pattern": "FSSSSSSS"}),
]
# (id, checkpoint, flags, expected pattern): the layers follow the flag on every flavour.
FLAG_CASES = [
    ("pattern-types", "types", ["--index-cache-pattern", "FSSFSSSF"], "FSSFSSSF"),
    ("pattern-lower-case", "types", ["--index-cache-pattern", " fssfsssf "], "FSSFSSSF"),
    ("pattern-plain-freq4", "plain_freq4", ["--index-cache-pattern", "FSFSFSFS"], "FSFSFSFS"),
    ("pattern-glm52", "glm52", ["--index-cache-pattern", "FSSSSSFS"], "FSSSSSFS"),
    ("every-types", "types", ["--index-cache-every", "4"], "FSSSFSSS"),
    ("every-plain-pattern", "plain_pattern", ["--index-cache-every", "2"], "FSFSFSFS"),
    ("every-glm52", "glm52", ["--index-cache-every", "3"], "FSSFSSFS"),
    ("file-types", "types", ["--index-cache-pattern-file", "@file:types:FFSSFSSS"], "FFSSFSSS"),
    ("file-glm52", "glm52", ["--index-cache-pattern-file", "@file:glm52:FSSFSSSS"], "FSSFSSSS"),
    ("calibration", "types", ["--index-cache-calibration", "--index-cache-pattern", "FSSSFSSS"], "FFFFFFFF"),
    # config-only checkpoints (make-checkpoint --weights none) and loaders that read no safetensors
    ("config-only", "config_only", ["--index-cache-pattern", "FSSFSSSF"], "FSSFSSSF"),
    ("config-only-dummy", "config_only", ["--index-cache-every", "4", "--load-format", "dummy"], "FSSSFSSS"),
    ("config-only-file", "config_only", ["--index-cache-pattern-file", "@file:types:FFSSFSSS", "--load-format",
                                         "dummy"], "FFSSFSSS"),
    ("dummy-without-weights", "glm52", ["--index-cache-every", "2", "--load-format", "dummy"], "FSFSFSFS"),
    # the decode stride (patch 0007): from the flag, from a pattern file, 1 = none
    ("stride-every", "types", ["--index-cache-every", "4", "--index-cache-decode-stride", "4"], "FSSSFSSS"),
    ("stride-one", "types", ["--index-cache-every", "4", "--index-cache-decode-stride", "1"], "FSSSFSSS"),
    ("stride-file", "types", ["--index-cache-pattern-file", "@file:types:FFSSFSSS:2,4,1,1,8,1,1,1"], "FFSSFSSS"),
    ("stride-calibration", "types", ["--index-cache-calibration", "--index-cache-pattern", "FSFSFSFS",
                                     "--index-cache-decode-stride", "2"], "FFFFFFFF"),
]
STRIDES = {"stride-every": ("4", "--index-cache-decode-stride 4"), "stride-one": None,
           "stride-file": ("2/4/8", "--index-cache-pattern-file"), "stride-calibration": ("2", "--index-cache-decode-stride 2")}
WEIGHTS_NOT_CHECKED = {"config-only", "config-only-dummy", "config-only-file", "dummy-without-weights"}
# (id, checkpoint, flags, substring of the one-line error)
BAD_CASES = [
    ("short", "types", ["--index-cache-pattern", "FSS"], "--index-cache-pattern: pattern has 3 layers but the model has 8"),
    ("long", "types", ["--index-cache-pattern", "FSSSFSSSF"], "pattern has 9 layers but the model has 8"),
    ("layer0-shared", "types", ["--index-cache-pattern", "SFFFFFFF"], "layer 0 must be F"),
    ("stray-char", "types", ["--index-cache-pattern", "FxSSFSSS"], "'x' (U+0078) at position 2"),
    ("every-zero", "types", ["--index-cache-every", "0"], "--index-cache-every must be a positive integer"),
    ("every-not-int", "types", ["--index-cache-every", "four"], "argument --index-cache-every: invalid"),
    ("two-flags", "types", ["--index-cache-pattern", "FSSSFSSS", "--index-cache-every", "4"], "give only one of"),
    ("no-indexer-weights", "glm52", ["--index-cache-pattern", "FFSFSSFS"],
     "layer 1 is F but"),
    ("every-without-weights", "glm52", ["--index-cache-every", "2"], "layer 2 is F but"),
    ("calibration-without-weights", "glm52", ["--index-cache-calibration"], "no indexer weights for layers 1-2,4-5,7"),
    ("file-missing", "types", ["--index-cache-pattern-file", "@missing"], "does not exist"),
    ("file-malformed", "types", ["--index-cache-pattern-file", "@malformed"], "not valid JSON"),
    ("file-format", "types", ["--index-cache-pattern-file", "@wrong-format"], "only 'indexcache-pattern/v1'"),
    ("file-other-model", "types", ["--index-cache-pattern-file", "@other-model"],
     "was made for another model: index_topk is 2048"),
    ("file-weights-differ", "types", ["--index-cache-pattern-file", "@file:glm52:FSSFSSSS"], "fingerprint"),
    ("override-conflict", "types",
     ["--index-cache-pattern", "FSSSFSSS", "--json-model-override-args", '{"index_topk_pattern": "FSFSFSFS"}'],
     "--json-model-override-args sets index_topk_pattern, which conflicts"),
    ("override-types-conflict", "types",
     ["--index-cache-every", "2", "--json-model-override-args", '{"indexer_types": null}'], "sets indexer_types"),
    ("override-cli-factor-conflict", "types",
     ["--index-cache-every", "2", "--json-model-override-args", '{"cli_factor": 4}'], "sets cli_factor"),
    ("two-batch-overlap", "types", ["--index-cache-pattern", "FSSSFSSS", "--enable-two-batch-overlap"],
     "--enable-two-batch-overlap cannot run IndexCache"),
    ("not-dsa", "not_dsa", ["--index-cache-pattern", "FSSSFSSS"], "is not a DSA model"),
    ("config-only-layer0", "config_only", ["--index-cache-pattern", "SFFFFFFF", "--load-format", "dummy"],
     "layer 0 must be F"),
    ("stride-without-pattern", "types", ["--index-cache-decode-stride", "4"],
     "--index-cache-decode-stride needs a pattern: add --index-cache-pattern"),
    ("stride-zero", "types", ["--index-cache-every", "4", "--index-cache-decode-stride", "0"],
     "--index-cache-decode-stride must be a positive integer, got 0"),
    ("stride-twice", "types", ["--index-cache-pattern-file", "@file:types:FFSSFSSS:2,4,1,1,8,1,1,1",
                               "--index-cache-decode-stride", "2"], "carries decode_stride 2/4/8 already"),
    ("stride-groups", "types", ["--index-cache-pattern-file", "@file:types:FFFFFFFF:2,4,8,16,32,1,1,1"],
     "at most 4 distinct strides above 1"),
    ("stride-two-batch-overlap", "types", ["--index-cache-every", "1", "--index-cache-decode-stride", "2",
                                           "--enable-two-batch-overlap"],
     "--index-cache-decode-stride 2 cannot run with --enable-two-batch-overlap"),
    ("stride-torch-compile", "types", ["--index-cache-every", "4", "--index-cache-decode-stride", "4",
                                       "--enable-torch-compile"], "cannot run with --enable-torch-compile"),
    ("stride-breakable-graphs", "types", ["--index-cache-every", "4", "--index-cache-decode-stride", "4",
                                          "--cuda-graph-backend-decode", "breakable"],
     "cannot run with --cuda-graph-backend-decode breakable"),
    ("config-only-short", "config_only", ["--index-cache-pattern", "FSSF"], "pattern has 4 layers but the model has 8"),
    ("config-only-other-model", "config_only", ["--index-cache-pattern-file", "@other-model"],
     "was made for another model: index_topk is 2048"),
]


def _pattern_files(tmp_path, ckpts) -> dict[str, str]:
    files = {"missing": str(tmp_path / "absent.json")}
    (tmp_path / "malformed.json").write_text('{"format": "indexcache-pattern/v1", "pattern": "FS')
    files["malformed"] = str(tmp_path / "malformed.json")
    info = load_model_info(ckpts["types"])
    for spec, strides in (("FFSSFSSS", [2, 4, 1, 1, 8, 1, 1, 1]), ("FFFFFFFF", [2, 4, 8, 16, 32, 1, 1, 1])):
        name = f"file:types:{spec}:{','.join(map(str, strides))}"
        files[name] = str(tmp_path / f"{name.replace(':', '-').replace(',', '')}.json")
        pattern_file.write(files[name], pattern_file.make_document(spec, info, decode_stride=strides))
    for flavour, spec in (("types", "FFSSFSSS"), ("glm52", "FSSFSSSS")):
        info = load_model_info(ckpts[flavour])
        path = tmp_path / f"{flavour}-{spec}.json"
        pattern_file.write(path, pattern_file.make_document(spec, info))
        files[f"file:{flavour}:{spec}"] = str(path)
        if flavour == "types":
            other = pattern_file.make_document(spec, info)
            other["model"]["index_topk"] = 2048
            pattern_file.write(tmp_path / "other.json", other)
            files["other-model"] = str(tmp_path / "other.json")
            wrong = dict(other, format="indexcache-pattern/v0")
            pattern_file.write(tmp_path / "wrong.json", wrong)
            files["wrong-format"] = str(tmp_path / "wrong.json")
    return files


def _argv(ckpts, files, name, extra) -> list[str]:
    extra = [files[e[1:]] if e.startswith("@") else e for e in extra]
    return ["--model-path", str(ckpts[name]), "--device", "cpu", "--random-seed", "0", *extra]


@pytest.fixture(scope="module")
def results(tmp_path_factory, sglang_release):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    ckpts = ck.session_checkpoints(tmp_path_factory)
    work = tmp_path_factory.mktemp("sglang-flags")
    not_dsa = work / "not_dsa"
    not_dsa.mkdir()
    config = json.loads((ckpts["types"] / "config.json").read_text())
    for key in ("index_topk", "index_n_heads", "index_head_dim", "indexer_types"):
        config.pop(key)
    (not_dsa / "config.json").write_text(json.dumps(config))
    ckpts["not_dsa"] = not_dsa
    config_only = work / "config_only"  # what make-checkpoint --weights none writes: no safetensors
    config_only.mkdir()
    shutil.copyfile(ckpts["types"] / "config.json", config_only / "config.json")
    ckpts["config_only"] = config_only
    files = _pattern_files(work, ckpts)
    no_flag = [{"argv": _argv(ckpts, files, c, [] if o is None else ["--json-model-override-args", json.dumps(o)])}
               for _, c, o in NO_FLAG_CASES]
    flagged = [{"argv": _argv(ckpts, files, c, f)} for _, c, f, _ in FLAG_CASES + BAD_CASES]
    stock = sgl.run_driver(trees.stock, no_flag, work / "stock", sglang_release)
    patched = sgl.run_driver(trees.patched, no_flag + flagged, work / "patched", sglang_release)
    return {"stock": stock, "patched": patched[:len(no_flag)], "flagged": patched[len(no_flag):],
            "release": sglang_release, "ckpts": ckpts}


@pytest.mark.parametrize("index", range(len(NO_FLAG_CASES)), ids=[c[0] for c in NO_FLAG_CASES])
def test_without_flags_patched_equals_stock(results, index):
    stock, patched = results["stock"][index], results["patched"][index]
    assert patched.get("error") == stock.get("error") or (
        patched["error"]["type"] == stock["error"]["type"] and patched["error"]["message"] == stock["error"]["message"])
    assert patched.get("skips") == stock.get("skips")
    if "args" in stock:
        differ = sorted(k for k in set(stock["args"]) | set(patched["args"])
                        if stock["args"].get(k) != patched["args"].get(k))
        assert not differ, f"resolved args differ: {differ}"
        assert patched["ours"] == {"index_cache_pattern": None, "index_cache_every": None,
                                   "index_cache_pattern_file": None, "index_cache_calibration": False,
                                   "index_cache_decode_stride": None}
    assert patched["logs"] == []


def test_stock_trap_is_real(results):
    """On a checkpoint with indexer_types, stock 0.5.23 ignores a pattern override (what our flag fixes);
    0.5.17 has no indexer_types and follows the override."""
    ids = [c[0] for c in NO_FLAG_CASES]
    trap = results["stock"][ids.index("types-override-pattern")]
    expected = "FFFFFFFF" if results["release"] == "0.5.23" else "FSSFSSSF"
    assert trap["skips"] == [c == "S" for c in expected]
    nulled = results["stock"][ids.index("types-null-types-pattern")]
    assert nulled["skips"] == [c == "S" for c in "FSFSFSFS"]


@pytest.mark.parametrize("index", range(len(FLAG_CASES)), ids=[c[0] for c in FLAG_CASES])
def test_flag_sets_every_layer(results, index):
    _, checkpoint, flags, expected = FLAG_CASES[index]
    result = results["flagged"][index]
    assert "error" not in result, result.get("error")
    assert result["skips"] == [c == pat.SHARED for c in expected]
    startup = [line for line in result["logs"] if line.startswith("IndexCache: pattern ")]
    assert len(startup) == 1
    if "--index-cache-calibration" in flags:
        running = flags[flags.index("--index-cache-pattern") + 1]
        assert startup[0].startswith(f"IndexCache: pattern {pat.describe(running)}")
        # the capture (every forward's top-k copied to the host) stays off: only /index_cache/overlap needs it
        assert result["args"]["enable_return_indexer_topk"] is False
        assert {phase["backend"] for phase in result["args"]["cuda_graph_config"].values()} == {"disabled"}
        assert result["args"]["disable_radix_cache"] is True
        if results["release"] == "0.5.23":
            assert "index_cache_calibration" in result["declared"]  # our declaration (CPU disables graphs anyway)
    else:
        assert "index_cache_calibration" not in result["declared"]
        assert startup[0].startswith(f"IndexCache: pattern {pat.describe(expected)}")
    # the override line names what this release would have read from config.json alone
    config = json.loads((results["ckpts"][checkpoint] / "config.json").read_text())
    new = results["release"] == "0.5.23"
    ckpt_pattern, key = pat.sglang_config_pattern(config, reads_indexer_types=new, reads_cli_factor=not new)
    overrode = [line for line in result["logs"] if "overrode the checkpoint's" in line]
    assert len(overrode) == (0 if key is None else 1)
    if key is not None:
        assert f"overrode the checkpoint's {key} ({ckpt_pattern})" in overrode[0]


@pytest.mark.parametrize("name", sorted(STRIDES))
def test_stride_is_in_the_startup_line(results, name):
    ids = [c[0] for c in FLAG_CASES]
    result = results["flagged"][ids.index(name)]
    startup = [line for line in result["logs"] if line.startswith("IndexCache: pattern ")][0]
    if STRIDES[name] is None:
        assert "decode stride" not in startup
    else:
        described, source = STRIDES[name]
        assert f"; decode stride {described} (effective " in startup and f"from {source}" in startup, startup
    assert all("does not reuse top-k across decode steps" not in line for line in result["logs"])


def test_flag_values_are_parsed(results):
    ids = [c[0] for c in FLAG_CASES]
    assert results["flagged"][ids.index("pattern-lower-case")]["ours"]["index_cache_pattern"] == " fssfsssf "
    assert results["flagged"][ids.index("every-types")]["ours"]["index_cache_every"] == 4
    assert results["flagged"][ids.index("file-types")]["ours"]["index_cache_pattern_file"].endswith(".json")
    assert results["flagged"][ids.index("calibration")]["ours"]["index_cache_calibration"] is True
    assert results["flagged"][ids.index("stride-every")]["ours"]["index_cache_decode_stride"] == 4


def test_unchecked_weights_are_one_log_line(results):
    """With no safetensors or a load format that reads none, one line says the weights were not checked."""
    for index, (name, *_rest) in enumerate(FLAG_CASES):
        lines = [line for line in results["flagged"][index]["logs"] if "indexer weights not checked" in line]
        assert len(lines) == (1 if name in WEIGHTS_NOT_CHECKED else 0), (name, results["flagged"][index]["logs"])


@pytest.mark.parametrize("index", range(len(BAD_CASES)), ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_clear_error(results, index):
    _, _, _, expected = BAD_CASES[index]
    result = results["flagged"][len(FLAG_CASES) + index]
    assert "error" in result, f"accepted: skips {result.get('skips')}"
    message = result["error"]["message"]
    assert expected in message and "\n" not in message.strip(), message
    if result["error"]["type"] != "SystemExit":
        assert result["error"]["type"] == "IndexCacheError", result["error"]
