"""eval / overlap / calibrate on a small saved checkpoint: exit codes, outputs, bad data sources."""

import json

import pytest

from dsa_models import save_micro_checkpoint, write_text
from sglang_indexcache import cli

SMALL = ["--seq-len", "32", "--max-tokens", "512", "--batch-size", "4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_micro_checkpoint(root / "model", layers=5, topk=8, seed=2)
    data = write_text(root / "cal.txt", n_docs=30)
    return root, model, data


def test_eval_json_and_table(workspace, capsys):
    root, model, data = workspace
    assert cli.main(["eval", "--model", str(model), "--data", str(data), "--pattern", "all-F",
                     "--pattern", "every-2", "--pattern", "fssfs", "--json", *SMALL]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["pattern"] for r in results] == ["FFFFF", "FSFSF", "FSSFS"]
    assert all(r["tokens"] == 16 * 31 and r["loss"] > 0 for r in results)
    assert cli.main(["eval", "--model", str(model), "--data", str(data), "--pattern", "all-F", *SMALL]) == 0
    assert "all-F" in capsys.readouterr().out


def test_calibrate_then_eval_the_file(workspace, capsys):
    root, model, data = workspace
    out = root / "cal" / "pattern.json"
    assert cli.main(["--quiet", "calibrate", "--model", str(model), "--data", str(data), "--keep", "0.4",
                     "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "layer-forwards" in printed and "naive" in printed
    doc = json.loads(out.read_text())
    cal = doc["calibration"]
    assert doc["pattern"].count("F") == 2 and len(cal["steps"]) == 3
    assert {"baseline_loss", "loss", "layer_forwards", "naive_layer_forwards", "data", "keep_ratio"} <= set(cal)
    assert cal["data"]["tokens"] == 512 and cal["layer_forwards"] < cal["naive_layer_forwards"]
    assert cal["data"]["seed"] == 0 and cal["data"]["sha256"].startswith("sha256:")
    assert (out.parent / "pattern.calibration.png").stat().st_size > 1000
    assert not (out.parent / "pattern.json.state.json").exists()
    assert cli.main(["eval", "--model", str(model), "--data", str(data), "--pattern", str(out), "--json", *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["pattern"] == doc["pattern"] and result["loss"] == pytest.approx(cal["loss"], rel=1e-6)


def test_calibrate_max_seconds_then_resume(workspace, capsys):
    root, model, data = workspace
    out = root / "stopped" / "pattern.json"
    argv = ["--quiet", "calibrate", "--model", str(model), "--data", str(data), "--keep", "0.4", "--out", str(out),
            *SMALL]
    assert cli.main([*argv, "--max-seconds", "0.001"]) == 0
    printed = capsys.readouterr().out
    assert "--max-seconds 0.001" in printed and "--resume" in printed and not out.exists()
    state = json.loads((out.parent / "pattern.json.state.json").read_text())
    assert state["baseline_loss"] > 0 and state["steps"] == []
    assert cli.main([*argv, "--resume"]) == 0
    doc = json.loads(out.read_text())
    assert doc["pattern"].count("F") == 2 and doc["calibration"]["evaluations"] == 4 + 3 + 2
    assert not (out.parent / "pattern.json.state.json").exists()


def test_seed_shuffles_the_documents_before_the_budget(workspace):
    from transformers import AutoTokenizer

    from sglang_indexcache.calibration.data import load_blocks

    root, model, _ = workspace
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 20}) + "\n" for i in range(50)))
    tokenizer = AutoTokenizer.from_pretrained(model)
    ordered = load_blocks(rows, tokenizer, 16, 64)
    first, again, other = (load_blocks(rows, tokenizer, 16, 64, seed=s) for s in (1, 1, 2))
    assert ordered.seed is None and first.describe()["seed"] == 1
    assert first.sha256 == again.sha256 and len({ordered.sha256, first.sha256, other.sha256}) == 3
    assert first.tokens == ordered.tokens == 64


def test_eval_decode_stride(workspace, capsys):
    root, model, data = workspace
    argv = ["eval", "--model", str(model), "--data", str(data), "--pattern", "all-F", "--pattern", "every-2", *SMALL]
    assert cli.main([*argv, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)["results"]
    assert cli.main([*argv, "--decode-stride", "1", "--decode-stride", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["pattern"], r["decode_stride"]) for r in results] == [
        ("FFFFF", [1] * 5), ("FFFFF", [4] * 5), ("FSFSF", [1] * 5), ("FSFSF", [4] * 5)]
    assert [results[0]["loss"], results[2]["loss"]] == [default[0]["loss"], default[1]["loss"]]  # stride 1 = today
    assert results[1]["loss"] != results[0]["loss"] and results[3]["loss"] != results[2]["loss"]
    assert cli.main([*argv, "--decode-stride", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "stride" in table[1] and "vs all-F" in table[1] and " 4 " in table[2]


def test_calibrate_stride_then_eval_the_file(workspace, capsys):
    root, model, data = workspace
    base = root / "stride" / "base.json"
    assert cli.main(["--quiet", "calibrate", "--model", str(model), "--data", str(data), "--keep", "0.6",
                     "--out", str(base), "--no-plot", *SMALL]) == 0
    out = root / "stride" / "strided.json"
    assert cli.main(["--quiet", "calibrate", "--model", str(model), "--data", str(data), "--pattern", str(base),
                     "--stride-target", "2", "--max-stride", "4", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "decode stride" in printed and "uniform stride 2" in printed
    doc, before = json.loads(out.read_text()), json.loads(base.read_text())
    cal = doc["decode_stride_calibration"]
    assert doc["pattern"] == before["pattern"] and doc["calibration"] == before["calibration"]  # the keep search kept
    full = [i for i, c in enumerate(doc["pattern"]) if c == "F"]
    assert cal["effective_stride"] >= 2 and all(doc["decode_stride"][i] in (1, 2, 4) for i in full)
    assert len(cal["steps"]) >= 1 and cal["layer_forwards"] <= cal["naive_layer_forwards"]
    assert (out.parent / "strided.calibration.png").stat().st_size > 1000
    assert not (out.parent / "strided.json.state.json").exists()
    assert cli.main(["eval", "--model", str(model), "--data", str(data), "--pattern", str(out), "--json", *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["decode_stride"] == doc["decode_stride"] and result["loss"] == pytest.approx(cal["loss"], rel=1e-6)


def test_overlap_outputs(workspace, capsys):
    root, model, data = workspace
    out = root / "ov"
    assert cli.main(["overlap", "--model", str(model), "--data", str(data), "--out", str(out), *SMALL]) == 0
    doc = json.loads((out / "overlap.json").read_text())
    assert doc["layers"] == 5 and doc["topk"] == 8 and doc["tokens"] == 16 * (32 - 8)
    matrix = doc["matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert all(matrix[i][i] == pytest.approx(1.0) for i in range(5))
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert (out / "overlap.png").stat().st_size > 1000
    assert "adjacent" in capsys.readouterr().out


def _bad_sources(root):
    missing = root / "nope.txt"
    empty = root / "empty.txt"
    empty.write_text("")
    latin = root / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    rows = root / "rows.jsonl"
    rows.write_text('{"content": "hello"}\n')
    return [(missing, "does not exist"), (empty, "empty"), (latin, "not UTF-8"), (rows, "no text field 'text'")]


@pytest.mark.parametrize("verb", ["eval", "overlap", "calibrate"])
def test_bad_data_sources_exit_2(workspace, verb, capsys):
    root, model, _ = workspace
    extra = {"eval": ["--pattern", "all-F"], "overlap": ["--out", str(root / "o")],
             "calibrate": ["--keep", "0.5", "--out", str(root / "p.json")]}[verb]
    for source, message in _bad_sources(root):
        assert cli.main([verb, "--model", str(model), "--data", str(source), *extra, *SMALL]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_arguments_exit_2(workspace, capsys):
    root, model, data = workspace
    cases = [
        ["eval", "--model", str(model), "--data", str(data), "--pattern", "FSXFF"],
        ["eval", "--model", str(model), "--data", str(data), "--pattern", "all-F", "--seq-len", "0"],
        ["calibrate", "--model", str(model), "--data", str(data), "--keep", "1.5", "--out", str(root / "x.json")],
        ["calibrate", "--data", str(data), "--keep", "0.5", "--out", str(root / "x.json")],
        ["calibrate", "--model", str(model), "--data", str(data), "--keep", "0.5", "--out", str(root / "x.json"),
         "--in-flight", "2"],
        ["calibrate", "--model", str(model), "--data", str(data), "--keep", "0.5", "--out", str(root / "x.json"),
         "--max-seconds", "0"],
        ["eval", "--model", str(root / "missing"), "--data", str(data), "--pattern", "all-F"],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        assert "indexcache: error:" in capsys.readouterr().err
