"""Bad input of every class, table-driven: one line on stderr, exit 2, refused before torch loads.

Classes (issue 15): outputs that would destroy data (an input, the shipped model, an existing
output), input that used to end in a traceback (truncated checkpoints, unwritable outputs, a CPU
kernel bench without Triton's interpreter), misleading messages, flags that were silently ignored,
and numeric flags (refused while parsing). Each case runs in a fresh interpreter that reports
whether torch was imported: every check here must come before any heavy work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sglang_indexcache import progress
from sglang_indexcache.calibration.pattern_losses import format_table
from sglang_indexcache.configs import TINY_MODEL_DIR

DRIVER = ("import json, sys\nfrom sglang_indexcache.cli import main\nrc = main(sys.argv[1:])\n"
          "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'datasets': 'datasets' in sys.modules}))")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import write_dsa_checkpoint

    root = tmp_path_factory.mktemp("bad")
    model = write_dsa_checkpoint(root / "model")
    truncated = write_dsa_checkpoint(root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    sharded = write_dsa_checkpoint(root / "sharded", sharded=True)
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    data = root / "data.txt"
    data.write_text("some text\n" * 50)
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("not yours\n")
    existing = root / "existing.json"
    existing.write_text("{}\n")
    return {"model": model, "trunc": truncated, "sharded": sharded, "data": data, "nonempty": nonempty,
            "existing": existing, "tmp": root, "shipped": TINY_MODEL_DIR}


def _stride(extra):
    """calibrate --stride-target 4 (unless ``extra`` gives its own) into {tmp}/p.json."""
    target = [] if "--stride-target" in extra else ["--stride-target", "4"]
    return ["calibrate", "--model", "{model}", "--data", "{data}", "--out", "{tmp}/p.json", *target, *extra]


def _cal(out="{tmp}/p.json", model="{model}"):
    return ["calibrate", "--model", model, "--data", "{data}", "--keep", "0.5", "--out", out]


def _distill(out="{tmp}/d", pattern="every-4", model="{model}"):
    return ["distill", "--model", model, "--pattern", pattern, "--data", "{data}", "--out", out]


CASES = {
    # outputs that would overwrite an input, the shipped model or an earlier output
    "train-tiny into the shipped model": (["train-tiny", "--out", "{shipped}"], "which only --force replaces"),
    "train-tiny into a non-empty folder": (["train-tiny", "--out", "{nonempty}"], "exists and is not empty"),
    "calibrate over an existing file": (_cal("{existing}"), "exists: choose a new name (or pass --force"),
    "calibrate over its data": (_cal("{data}"), "is the input"),
    "calibrate into the model folder": (_cal("{model}/p.json"), "lies inside the input"),
    "overlap into a non-empty folder": (["overlap", "--model", "{model}", "--data", "{data}", "--out", "{nonempty}"],
                                        "exists and is not empty"),
    "distill into a non-empty folder": (_distill("{nonempty}"), "exists and is not empty"),
    "distill into the model": (_distill("{model}"), "is the input"),
    "bench --save over a file": (["bench", "prefill", "--save", "{existing}"], "exists: choose a new name"),
    # what used to be a traceback
    "validate a truncated checkpoint": (["validate", "every-4", "--model", "{trunc}"], "is truncated"),
    "validate a truncated shard": (["validate", "every-4", "--model", "{sharded}"], "is truncated"),
    "eval a truncated checkpoint": (["eval", "--model", "{trunc}", "--data", "{data}", "--pattern", "all-F"],
                                    "is truncated"),
    "overlap a truncated checkpoint": (["overlap", "--model", "{trunc}", "--data", "{data}", "--out", "{tmp}/o"],
                                       "is truncated"),
    "calibrate a truncated checkpoint": (_cal(model="{trunc}"), "is truncated"),
    "distill a truncated checkpoint": (_distill(model="{trunc}"), "is truncated"),
    "calibrate --out under a file": (_cal("{existing}/p.json"), "is a file, not a folder"),
    "bench kernels on the CPU without the interpreter": (["bench", "kernels", "--device", "cpu"], "TRITON_INTERPRET=1"),
    # messages that said the wrong thing
    "bench pattern longer than the bench's layer cap": (
        ["bench", "prefill", "--config", "tiny", "--patterns", "FSSSFSSSFSSS"], "default cap of 8; the config has 12"),
    # flags that were ignored
    "--screen-top without --screen-batches": (_cal() + ["--screen-top", "2"], "--screen-top only applies with"),
    # decode-stride search: which search, and its pattern, before any weight is loaded
    "calibrate without --keep or --stride-target": (_cal()[:-4] + ["--out", "{tmp}/p.json"],
                                                    "give --keep RATIO"),
    "calibrate --keep and --stride-target": (_cal() + ["--stride-target", "4"], "one of them"),
    "--stride-target without --pattern": (_stride([]), "--stride-target needs --pattern P"),
    "--pattern without --stride-target": (_cal() + ["--pattern", "every-4"], "only apply with --stride-target"),
    "--stride-target over a server": (_stride(["--pattern", "every-4", "--url", "http://127.0.0.1:9"]),
                                      "runs in-process only"),
    "--stride-target above --max-stride": (_stride(["--pattern", "every-4", "--stride-target", "16"]),
                                           "between 1 and --max-stride 8, got 16"),
    "--stride-target with a pattern of another length": (_stride(["--pattern", "FS"]),
                                                         "2 layers but the model has 8"),
    "calibrate --resume with nothing to resume": (_cal() + ["--resume"], "no interrupted search to continue"),
    "distill --resume with nothing to resume": (_distill() + ["--resume"], "no interrupted run to continue"),
    "distilling all-F": (_distill(pattern="all-F"), "nothing to distill"),
    # numeric flags, refused while parsing
    "calibrate --keep 0": (_cal()[:-4] + ["--keep", "0", "--out", "{tmp}/p.json"], "--keep: must be in (0, 1]"),
    "calibrate --stride-target 0": (_stride(["--stride-target", "0"]), "--stride-target: must be a positive"),
    "eval --decode-stride 0": (["eval", "--model", "{model}", "--data", "{data}", "--pattern", "all-F",
                                "--decode-stride", "0"], "--decode-stride: must be a positive integer"),
    "eval --max-tokens -5": (["eval", "--model", "{model}", "--data", "{data}", "--pattern", "all-F",
                              "--max-tokens", "-5"], "--max-tokens: must be a positive integer"),
    "distill --lr 0": (_distill() + ["--lr", "0"], "--lr: must be a positive finite number"),
    "distill --steps x": (_distill() + ["--steps", "x"], "--steps: must be a positive integer, got 'x'"),
    "bench decode --repeats 0": (["bench", "decode", "--repeats", "0"], "--repeats: must be a positive integer"),
    "bench prefill --warmup -1": (["bench", "prefill", "--warmup", "-1"], "--warmup: must be an integer >= 0"),
    "bench decode --batch 0": (["bench", "decode", "--batch", "0"], "--batch must be positive"),
    "train-tiny --seq-len 0": (["train-tiny", "--seq-len", "0"], "--seq-len: must be a positive integer"),
}
if importlib.util.find_spec("sglang") is None:
    CASES["serve --dry-run without SGLang"] = (["serve", "--model", "{model}", "--calibration", "--dry-run"],
                                               "SGLang is not installed")


def run_cli(argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, *argv], capture_output=True, text=True, cwd=cwd, env=env)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_before_torch(name, files, tmp_path):
    template, message = CASES[name]
    argv = [arg.format(**files) for arg in template]
    proc, report = run_cli(argv, tmp_path)
    err = proc.stderr.strip()
    assert report["rc"] == 2, (argv, proc.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not report["torch"], f"{name}: torch was imported before the input was refused"
    assert not any(tmp_path.iterdir()), "a refused command wrote into its working directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc, report = run_cli([a.format(**files) for a in _cal(str(locked / "p.json"))], tmp_path)
    assert report["rc"] == 2 and "permission denied" in proc.stderr and not report["torch"]


def test_force_lets_an_output_be_replaced(files, tmp_path):
    from sglang_indexcache.commands.options import check_output
    from sglang_indexcache.errors import UsageError

    with pytest.raises(UsageError, match="exists and is not empty"):
        check_output("--out", files["nonempty"], "dir")
    assert check_output("--out", files["nonempty"], "dir", force=True) == files["nonempty"]
    assert check_output("--out", files["nonempty"], "dir", resume=True) == files["nonempty"]
    with pytest.raises(UsageError, match="is the input"):  # resuming never allows writing into an input
        check_output("--out", files["model"], "dir", resume=True, inputs=(files["model"],))
    assert check_output("--out", files["existing"], "file", force=True) == files["existing"]


def test_quiet_is_accepted_after_the_verb(files, tmp_path):
    proc, report = run_cli(["validate", "every-4", "--model", str(files["model"]), "--quiet"], tmp_path)
    assert report["rc"] == 0 and "valid for" in proc.stdout


def test_bench_modes_have_descriptions(tmp_path):
    for mode in ("prefill", "decode", "kernels"):
        proc = subprocess.run([sys.executable, "-m", "sglang_indexcache", "bench", mode, "--help"],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "Times " in proc.stdout, proc.stdout[:300]


def test_eval_table_names_its_baseline():
    rows = [{"pattern": "FSFS", "label": "every-2", "loss": 2.0, "tokens": 10},
            {"pattern": "FSSS", "label": "every-4", "loss": 2.2, "tokens": 10}]
    table = format_table(rows)
    assert "vs every-2" in table.splitlines()[0] and "vs all-F" not in table and "+10.00%" in table
    rows.append({"pattern": "FFFF", "label": "all-F", "loss": 1.0, "tokens": 10})
    assert "vs all-F" in format_table(rows).splitlines()[0] and "+100.00%" in format_table(rows)


def test_progress_lines_in_a_log(monkeypatch, caplog):
    monkeypatch.setattr(progress, "QUIET", False)
    caplog.set_level("INFO", logger="sglang_indexcache.progress")
    import threading

    release = threading.Event()
    bar = progress.LogBar(total=4, desc="work", unit="step", interval=0.05)
    bar.update(1)
    for _ in range(100):  # the timer reports even while no update comes
        if any("work: 1/4 step (25%)" in r.message for r in caplog.records):
            break
        release.wait(0.05)
    bar.update(3)
    bar.close()
    messages = [r.message for r in caplog.records]
    assert any("work: 1/4 step (25%)" in m and "left" in m for m in messages), messages
    assert messages[-1].startswith("work: 4/4 step (100%)") and messages[-1].endswith("(done)")


def test_demo_ctrl_c_is_one_line(monkeypatch, capsys, tmp_path):
    from sglang_indexcache import cli
    from sglang_indexcache.commands import demo

    def interrupted(out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "pattern.json.state.json").write_text("{}")  # a search step was saved
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run", interrupted)
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the same command again resumes" in err and "--resume" not in err


def test_outputs_are_readable_by_others(tmp_path):
    from sglang_indexcache.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_busy_machine_gets_one_thread(monkeypatch):
    import torch

    from sglang_indexcache.calibration import session

    threads = torch.get_num_threads()
    monkeypatch.setattr(session.os, "cpu_count", lambda: 2)
    try:
        monkeypatch.setattr(session.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        assert not session.busy_cpu()
        monkeypatch.setattr(session.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
        assert session.busy_cpu()
        if not torch.cuda.is_available():
            session.set_threads(None)
            assert torch.get_num_threads() == 1
        session.set_threads(2)  # an explicit --threads always wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
