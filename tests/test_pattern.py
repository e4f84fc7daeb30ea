"""Pattern semantics: parse, validate, uniform, engine frequency readings, exports."""

import json

import pytest

from sglang_indexcache import pattern as pat
from sglang_indexcache.errors import PatternError


@pytest.mark.parametrize("text, expected", [
    ("FSSSFSSS", "FSSSFSSS"),
    ("fsssfsss", "FSSSFSSS"),       # case-insensitive
    ("  FsSf\n", "FSSF"),           # surrounding whitespace stripped
    ("\tF ", "F"),
])
def test_parse_normalises(text, expected):
    assert pat.parse(text) == expected


@pytest.mark.parametrize("text, position", [
    ("FS SF", 3),                   # interior whitespace
    ("FSX", 3),
    ("F1SS", 2),
    ("FS\u0405S", 3),               # Cyrillic capital DZE, looks like S
    ("F\u017f", 2),                 # long s: "ſ".upper() == "S", must still be refused
    ("\uff26S", 1),                 # fullwidth F
])
def test_parse_refuses_other_characters_with_position(text, position):
    with pytest.raises(PatternError, match=f"at position {position} "):
        pat.parse(text)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_parse_refuses_empty(text):
    with pytest.raises(PatternError, match="empty"):
        pat.parse(text)


def test_parse_refuses_non_string():
    with pytest.raises(PatternError, match="string"):
        pat.parse(None)


def test_validate_layer0_must_be_full():
    with pytest.raises(PatternError, match="layer 0 must be F"):
        pat.validate("SFFF", 4)


@pytest.mark.parametrize("text, layers", [("FSS", 4), ("FSSSS", 4)])
def test_validate_length_names_both_numbers(text, layers):
    with pytest.raises(PatternError, match=f"{len(text)} layers but the model has {layers} DSA layers"):
        pat.validate(text, layers)


@pytest.mark.parametrize("layers", [0, -1, 2.5, True, None])
def test_validate_refuses_bad_layer_count(layers):
    with pytest.raises(PatternError, match="positive integer"):
        pat.validate("F", layers)


@pytest.mark.parametrize("layers, every, expected", [
    (8, 4, "FSSSFSSS"),
    (8, 1, "FFFFFFFF"),
    (5, 2, "FSFSF"),
    (3, 8, "FSS"),                  # every > layers: only layer 0
])
def test_uniform(layers, every, expected):
    assert pat.uniform(layers, every) == expected


@pytest.mark.parametrize("every", [0, -4, True])
def test_uniform_refuses_bad_every(every):
    with pytest.raises(PatternError, match="positive integer"):
        pat.uniform(8, every)


@pytest.mark.parametrize("engine", pat.ENGINES)
@pytest.mark.parametrize("freq, expected", [(4, "FFSSSFSS"), (2, "FFSFSFSF"), (1, "FFFFFFFF")])
def test_engine_freq_matches_measured_stock_sglang(engine, freq, expected):
    # FACTS.md measured these on stock SGLang 0.5.23 and transformers 5.19 (8 layers).
    assert pat.from_engine_freq(engine, 8, freq) == expected


def test_engine_freq_offset_one_is_uniform():
    assert pat.from_engine_freq("sglang", 8, 4, offset=1) == pat.uniform(8, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(engine="tensorrt", num_layers=8, freq=4), "unknown engine"),
    (dict(engine="sglang", num_layers=8, freq=0), "index_topk_freq"),
    (dict(engine="sglang", num_layers=0, freq=4), "positive integer"),
    (dict(engine="sglang", num_layers=8, freq=4, offset=0), "offset"),
])
def test_engine_freq_bad_input(kwargs, match):
    with pytest.raises(PatternError, match=match):
        pat.from_engine_freq(**kwargs)


def test_reuse_source_and_served_layers():
    assert pat.reuse_source("FSSFSF") == [0, 0, 0, 3, 3, 5]
    assert pat.served_layers("FSSFSF") == {0: [0, 1, 2], 3: [3, 4], 5: [5]}
    assert pat.full_layers("FSSFSF") == [0, 3, 5]


def test_exports():
    p = "FSSF"
    assert json.loads(pat.sglang_override_json(p)) == {"index_topk_pattern": p, "indexer_types": None}
    assert json.loads(pat.vllm_override_json(p)) == {"use_index_cache": True, "index_topk_pattern": p}
    assert pat.to_indexer_types(p) == ["full", "shared", "shared", "full"]
    assert pat.from_indexer_types(pat.to_indexer_types(p)) == p
    assert pat.export(p, "sglang").startswith("--json-model-override-args '")
    assert pat.export(p, "vllm").startswith("--hf-overrides '")
    with pytest.raises(PatternError):
        pat.from_indexer_types(["full", "dense"])


def test_transformers_config_agrees_with_our_indexer_types():
    transformers = pytest.importorskip("transformers")
    config = transformers.GlmMoeDsaConfig(num_hidden_layers=8, index_topk_freq=4)
    assert pat.from_indexer_types(config.indexer_types) == pat.from_engine_freq("transformers", 8, 4)
    config = transformers.GlmMoeDsaConfig(num_hidden_layers=8, indexer_types=pat.to_indexer_types("FSSSFSSS"))
    assert pat.from_indexer_types(config.indexer_types) == "FSSSFSSS"


def test_pattern_module_is_pure():
    import subprocess
    import sys
    code = "import sys, sglang_indexcache.pattern, sglang_indexcache.pattern_file; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_shorthands_and_counts():
    assert pat.shorthand(" All-F ") == ("all-F", 1) and pat.shorthand("FULL") == ("all-F", 1)
    assert pat.shorthand("every4") == ("every", 4) and pat.shorthand("Every-12") == ("every", 12)
    assert pat.shorthand("FSFS") is None and pat.shorthand("every-x") is None
    with pytest.raises(PatternError, match="neither every-N"):
        pat.refuse_shorthand_lookalike("every-x")
    pat.refuse_shorthand_lookalike("FSSF")  # a plain pattern is left to parse()
    assert pat.all_full(3) == "FFF" and pat.kept("FSFS") == 2
    assert pat.is_all_full("FFF") and not pat.is_all_full("FSF")
    with pytest.raises(PatternError, match="positive integer"):
        pat.all_full(0)
    with pytest.raises(PatternError, match="--index-cache-every must be a positive integer, got 0"):
        pat.check_every(0, "--index-cache-every")
