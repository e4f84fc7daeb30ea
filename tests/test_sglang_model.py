"""Model-level regression against stock SGLang (each supported release): its own GlmMoeDsaForCausalLM, on the CPU.

For each case, SGLang's model class is built from the resolved server args and loaded with
SGLang's own ``load_weights``; per layer we read ``(skip_topk, next_skip_topk, has_indexer,
indexer weights equal to the checkpoint's)`` (``tests/sglang_support/driver.py``). Cases are batched:
one subprocess for the stock tree and one for the patched tree (plus one for the embedded model),
so the module stays well under 3 minutes on two cores.
"""

from __future__ import annotations

import json

import pytest
from sglang_support import checkpoints as ck
from sglang_support import trees as sgl

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file
from sglang_indexcache.configs import TINY_MODEL_DIR
from sglang_indexcache.model_info import load_model_info

pytestmark = pytest.mark.sglang
N = ck.NUM_LAYERS
GLM52_MISSING = {i for i, c in enumerate(ck.GLM52_PATTERN) if c == pat.SHARED}  # no indexer weights there


def expected_layers(pattern: str, last_next: bool = False, unloaded=(), release: str = "0.5.23",
                    flag: bool = False) -> list[list]:
    """Per layer ``[skip_topk, next_skip_topk, has_indexer, weights equal]`` for ``pattern``.

    ``last_next``: stock's frequency rule can mark the last layer's (absent) successor shared.
    ``unloaded``: layers whose indexer the checkpoint has no weights for (they stay at init values).
    0.5.23 builds no indexer on S layers; stock 0.5.17 builds one on every layer and loads it where
    the checkpoint has weights (an S layer just does not run it). With a pattern ``flag`` (not
    calibration mode) S layers hold nothing on both releases.
    """
    rows = []
    for i, c in enumerate(pattern):
        nxt = pattern[i + 1] == pat.SHARED if i + 1 < len(pattern) else last_next
        full = c == pat.FULL
        if release == "0.5.17" and not flag:
            rows.append([not full, nxt, True, i not in unloaded])
        else:
            rows.append([not full, nxt, full, (i not in unloaded) if full else None])
    return rows


# (id, checkpoint, --json-model-override-args, pattern stock builds, last layer's next_skip_topk, F layers unloaded)
NO_FLAG_CASES = [
    ("types", "types", None, "FFFFFFFF", False, ()),
    ("types-override-pattern", "types", {"index_topk_pattern": "FSSFSSSF"}, "FFFFFFFF", False, ()),  # the trap
    ("types-override-freq", "types", {"index_topk_freq": 2}, "FFFFFFFF", False, ()),  # the trap
    ("types-override-types", "types", {"indexer_types": pat.to_indexer_types("FFSSFSSS")}, "FFSSFSSS", False, ()),
    ("types-null-types-pattern", "types", {"indexer_types": None, "index_topk_pattern": "FSFSFSFS"},
     "FSFSFSFS", False, ()),
    ("types-null-types-freq-offset", "types",
     {"indexer_types": None, "index_topk_pattern": None, "index_topk_freq": 3, "index_skip_topk_offset": 3},
     "FFFSSFSS", False, ()),
    ("types-null-types-freq", "types", {"indexer_types": None, "index_topk_pattern": None, "index_topk_freq": 4},
     "FFSSSFSS", True, ()),  # stock: layer 8 (absent) would be shared
    ("plain", "plain", None, "FFFFFFFF", False, ()),
    ("plain-freq4", "plain_freq4", None, "FFSSSFSS", False, ()),
    ("plain-pattern", "plain_pattern", None, "FSFSSFSS", False, ()),
    ("plain-offset", "plain_offset", None, "FSSFSSFS", False, ()),
    ("plain-override-freq", "plain", {"index_topk_freq": 4}, "FFFFFFFF", False, ()),  # the trap
    ("plain-cli4", "plain_cli4", None, "FFFFFFFF", False, ()),  # 0.5.23 does not read cli_factor; 0.5.17 does
    ("glm52", "glm52", None, ck.GLM52_PATTERN, False, ()),
    ("glm52-override-all-f", "glm52", {"indexer_types": None, "index_topk_pattern": "FFFFFFFF"},
     "FFFFFFFF", False, GLM52_MISSING),  # stock: silently uninitialised indexers
]
# (id, checkpoint, flags, pattern): patched only; the layers follow the flag on all three flavours.
FLAG_CASES = [
    ("pattern-types", "types", ["--index-cache-pattern", "FSSFSSSF"], "FSSFSSSF"),
    ("pattern-plain-freq4", "plain_freq4", ["--index-cache-pattern", "FSFSFSFS"], "FSFSFSFS"),
    ("pattern-glm52", "glm52", ["--index-cache-pattern", "FSSSSSFS"], "FSSSSSFS"),
    ("every-types", "types", ["--index-cache-every", "4"], "FSSSFSSS"),
    ("every-plain", "plain", ["--index-cache-every", "2"], "FSFSFSFS"),
    ("every-glm52", "glm52", ["--index-cache-every", "3"], "FSSFSSFS"),
    ("pattern-plain-cli4", "plain_cli4", ["--index-cache-pattern", "FSFSFSFS"], "FSFSFSFS"),  # wins over cli_factor
    ("file-types", "types", ["--index-cache-pattern-file", "@types:FFSSFSSS"], "FFSSFSSS"),
    ("file-plain-pattern", "plain_pattern", ["--index-cache-pattern-file", "@plain_pattern:FSSSFSSS"], "FSSSFSSS"),
    ("file-glm52", "glm52", ["--index-cache-pattern-file", "@glm52:FSSFSSSS"], "FSSFSSSS"),
]
CALIBRATION_SWITCHES = ["FSFSFSFS", "SFFFFFFF", "FFFF", "FxSSSSSS", "FFFFFFFF", "fsssfsss"]


def _argv(path, extra) -> list[str]:
    return ["--model-path", str(path), "--device", "cpu", "--random-seed", "0", *extra]


@pytest.fixture(scope="module")
def results(tmp_path_factory, sglang_release):
    trees = sgl.trees(tmp_path_factory, sglang_release)
    ckpts = ck.session_checkpoints(tmp_path_factory)
    work = tmp_path_factory.mktemp("sglang-model")
    files = {}
    for _, _, flags, _ in FLAG_CASES:
        if flags[-1].startswith("@"):
            name, spec = flags[-1][1:].split(":")
            path = work / f"{name}-{spec}.json"
            pattern_file.write(path, pattern_file.make_document(spec, load_model_info(ckpts[name])))
            files[flags[-1]] = str(path)
    no_flag = [{"argv": _argv(ckpts[c], [] if o is None else ["--json-model-override-args", json.dumps(o)]),
                "build": True} for _, c, o, *_ in NO_FLAG_CASES]
    flagged = [{"argv": _argv(ckpts[c], [files.get(f, f) for f in flags]), "build": True}
               for _, c, flags, _ in FLAG_CASES]
    special = [
        {"argv": _argv(ckpts["glm52"], ["--index-cache-pattern", "FFSFSSFS"]), "build": True},
        {"argv": _argv(ckpts["types"], ["--index-cache-calibration", "--index-cache-pattern", "FSSFSSSF"]),
         "build": True, "switch": CALIBRATION_SWITCHES},
    ]
    stock = sgl.run_driver(trees.stock, no_flag, work / "stock", sglang_release)
    patched = sgl.run_driver(trees.patched, no_flag + flagged + special, work / "patched", sglang_release)
    # The last flagged case again, alone in a fresh process: batching must not change any result.
    [alone] = sgl.run_driver(trees.patched, [flagged[-1]], work / "alone", sglang_release)
    return {"release": sglang_release, "ckpts": ckpts, "stock": stock, "patched": patched[:len(no_flag)],
            "flagged": patched[len(no_flag):len(no_flag) + len(flagged)],
            "refused": patched[-2], "calibration": patched[-1], "alone": alone}


def stock_expectation(results, index):
    """(pattern, last layer's next_skip_topk, unloaded F layers) stock builds for NO_FLAG_CASES[index].

    0.5.23: the table above (it reads indexer_types first, the trap). 0.5.17 reads no indexer_types:
    ``pattern.sglang_config_pattern`` of config.json with the override, over one layer more for the
    absent successor's flag.
    """
    _, checkpoint, override, expected, last_next, unloaded = NO_FLAG_CASES[index]
    if results["release"] == "0.5.23":
        return expected, last_next, unloaded
    config = {**json.loads((results["ckpts"][checkpoint] / "config.json").read_text()), **(override or {})}
    selected, _ = pat.sglang_config_pattern({**config, "num_hidden_layers": N + 1}, reads_indexer_types=False,
                                            reads_cli_factor=True)
    selected = selected or pat.FULL * (N + 1)
    return selected[:N], selected[N] == pat.SHARED, GLM52_MISSING if checkpoint == "glm52" else set()


def release_layers(results, pattern: str, **kwargs) -> list[list]:
    return expected_layers(pattern, release=results["release"], **kwargs)


@pytest.mark.parametrize("index", range(len(NO_FLAG_CASES)), ids=[c[0] for c in NO_FLAG_CASES])
def test_without_flags_model_equals_stock(results, index):
    expected, last_next, unloaded = stock_expectation(results, index)
    stock, patched = results["stock"][index], results["patched"][index]
    assert "error" not in stock, stock.get("error")
    assert stock["layers"] == release_layers(results, expected, last_next=last_next, unloaded=unloaded)
    assert patched["layers"] == stock["layers"]
    assert patched["load_warnings"] == stock["load_warnings"]
    assert patched["logs"] == []


@pytest.mark.parametrize("index", range(len(FLAG_CASES)), ids=[c[0] for c in FLAG_CASES])
def test_flag_pattern_reaches_every_layer(results, index):
    _, checkpoint, _, expected = FLAG_CASES[index]
    result = results["flagged"][index]
    assert "error" not in result, result.get("error")
    unloaded = GLM52_MISSING if checkpoint == "glm52" else set()
    assert result["layers"] == release_layers(results, expected, unloaded=unloaded, flag=True)
    assert result["load_warnings"] == []  # S layers' indexer weights (types, plain) skipped silently
    overrode = [line for line in result["logs"] if "overrode the checkpoint's" in line]
    config = json.loads((results["ckpts"][checkpoint] / "config.json").read_text())
    new = results["release"] == "0.5.23"
    _, key = pat.sglang_config_pattern(config, reads_indexer_types=new, reads_cli_factor=not new)
    if key is not None:  # config.json carries a pattern this release reads: the flag wins, and says so
        assert len(overrode) == 1 and key in overrode[0] and overrode[0].endswith(expected)
    else:
        assert overrode == []


def test_a_case_alone_equals_the_same_case_in_a_batch(results):
    batched = results["flagged"][-1]
    assert results["alone"]["layers"] == batched["layers"] and results["alone"]["logs"] == batched["logs"]


def test_f_layer_without_indexer_weights_is_refused_before_loading(results):
    result = results["refused"]
    assert "layers" not in result  # nothing was built or loaded
    # 0.5.23 raises it from resolve_once(); 0.5.17 resolves inside prepare_server_args, where the
    # patch turns it into the one stderr line and exit 2 already
    assert result["error"]["type"] == ("IndexCacheError" if results["release"] == "0.5.23" else "SystemExit")
    assert "layer 1 is F but" in result["error"]["message"] and "no indexer weights" in result["error"]["message"]


def test_calibration_keeps_every_indexer_and_switches(results):
    result = results["calibration"]
    assert "error" not in result, result.get("error")
    assert result["layers"] == release_layers(results, "F" * N)  # built all-F: every indexer and its weights
    start = expected_layers("FSSFSSSF")
    assert result["layers_after_load"] == [s[:2] + [True, True] for s in start]
    previous = result["layers_after_load"]
    for step in result["switched"]:
        raw = step["pattern"]
        if raw in ("SFFFFFFF", "FFFF", "FxSSSSSS"):  # invalid: refused, model unchanged
            assert "error" in step, raw
            assert step["layers"] == previous
            continue
        assert "error" not in step, step
        wanted = expected_layers(raw.upper())
        assert step["layers"] == [w[:2] + [True, True] for w in wanted]
        previous = step["layers"]


def test_embedded_model_loads_in_sglang(tmp_path_factory, sglang_release):
    """models/tiny-glm-dsa through SGLang's own loader; config keys SGLang needs are listed if missing."""
    if not (TINY_MODEL_DIR / "config.json").is_file() or not (TINY_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{TINY_MODEL_DIR} has no config.json + model.safetensors yet")
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    gaps = ck.sglang_config_gaps(config)
    overrides = {key: value for key, value, _ in gaps if key is not None}
    model_dir = TINY_MODEL_DIR
    if sglang_release == "0.5.17" and "layer_types" in config:
        # transformers 5.12.1 rejects the layer_types later releases write: a copy without the key
        model_dir = tmp_path_factory.mktemp("embedded-0.5.17")
        for entry in TINY_MODEL_DIR.iterdir():
            if entry.name != "config.json":
                (model_dir / entry.name).symlink_to(entry)
        (model_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "layer_types"}))
    argv = _argv(model_dir, ["--dtype", "bfloat16", "--skip-tokenizer-init"]
                 + (["--json-model-override-args", json.dumps(overrides)] if overrides else []))
    trees = sgl.trees(tmp_path_factory, sglang_release)
    work = tmp_path_factory.mktemp("embedded")
    [stock] = sgl.run_driver(trees.stock, [{"argv": argv, "build": True}], work / "stock", sglang_release)
    assert "error" not in stock, f"gaps {[g[2] for g in gaps]}: {stock.get('error')}"
    layers = stock["layers"]
    assert all(row[3] for row in layers if row[2]), f"indexer weights not loaded: {layers}"
    layer_count = len(layers)
    plain, every4 = sgl.run_driver(trees.patched, [{"argv": argv, "build": True},
                                                   {"argv": argv + ["--index-cache-every", "4"], "build": True}],
                                   work / "patched", sglang_release)
    assert plain["layers"] == layers
    if set(load_model_info(model_dir).layers_with_indexer) == set(range(layer_count)):
        assert every4["layers"] == expected_layers(pat.uniform(layer_count, 4), release=sglang_release, flag=True), \
            every4.get("error")
    if gaps:
        print("embedded model needs for SGLang:", "; ".join(g[2] for g in gaps))
