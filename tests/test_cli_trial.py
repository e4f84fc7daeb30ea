"""What a new user's trial found (issue 25), one table per class of defect, over every verb where it
can occur.

- ``--force`` replaces an earlier output, never an input or anything inside an input folder (nor
  does a forced output folder that holds an input get written);
- an interrupted run says how to resume, and a rerun without ``--resume`` names ``--resume``
  (``--force`` never throws saved steps away);
- an interrupted command leaves all of its outputs or none (no ``overlap.json`` without its plot);
- an output that cannot be written is refused before any work, found by writing (``/sys``);
- a directory where a file is expected (and the reverse) is named as such;
- data-file errors come before torch and before ``datasets`` is imported;
- ``make demo``'s Ctrl-C is one line with advice it can follow; ``indexcache --help`` opens for users.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_bad_input import run_cli

from sglang_indexcache import cli
from sglang_indexcache.configs import TINY_MODEL_DIR


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import write_dsa_checkpoint

    root = tmp_path_factory.mktemp("trial")
    model = write_dsa_checkpoint(root / "model")
    (model / "data").mkdir()
    (model / "data" / "cal.txt").write_text("calibration text\n" * 50)
    data = root / "data.txt"
    data.write_text("some text\n" * 50)
    corpus = root / "corpus"  # a data folder
    corpus.mkdir()
    (corpus / "a.txt").write_text("a document\n" * 50)
    beside = root / "beside"  # a folder holding an input file
    beside.mkdir()
    (beside / "x.txt").write_text("text\n" * 50)
    from sglang_indexcache import pattern_file
    from sglang_indexcache.model_info import load_model_info

    pattern_file.write(beside / "pattern.json", pattern_file.make_document("FSSSFSSS", load_model_info(model)))
    config = root / "config.json"
    config.write_text((TINY_MODEL_DIR / "config.json").read_text())
    a_file = root / "a-file"
    a_file.write_text("not a folder\n")
    return {"model": model, "data": data, "corpus": corpus, "beside": beside, "config": config, "tmp": root,
            "shipped": TINY_MODEL_DIR, "file": a_file}


def _refused(files, tmp_path, template, message):
    argv = [arg.format(**files) for arg in template]
    proc, report = run_cli(argv, tmp_path)
    err = proc.stderr.strip()
    assert report["rc"] == 2, (argv, proc.stderr[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not report["torch"] and not report["datasets"], f"{argv}: refused only after a heavy import"
    return err


def _cal(data="{data}", out="{tmp}/p.json", model="{model}"):
    return ["calibrate", "--model", model, "--data", data, "--keep", "0.5", "--out", out]


def _distill(out="{tmp}/d", pattern="every-4", data="{data}"):
    return ["distill", "--model", "{model}", "--pattern", pattern, "--data", data, "--out", out]


FORCE_CASES = {
    "calibrate over its data file": (_cal("{model}/data/cal.txt", "{model}/data/cal.txt"), "is the input"),
    "calibrate into the model folder": (_cal(out="{model}/p.json"), "lies inside the input"),
    "calibrate into the data folder": (_cal("{corpus}", "{corpus}/p.json"), "lies inside the input"),
    "overlap into the model": (["overlap", "--model", "{model}", "--data", "{data}", "--out", "{model}"],
                               "is the input"),
    "overlap into a folder holding its data": (["overlap", "--model", "{model}", "--data", "{beside}/x.txt",
                                                "--out", "{beside}"], "holds the input"),
    "distill into the model": (_distill("{model}"), "is the input"),
    "distill into the data folder": (_distill("{corpus}/out", data="{corpus}"), "lies inside the input"),
    "distill into the folder of its pattern file": (_distill("{beside}", pattern="{beside}/pattern.json"),
                                                    "holds the input"),
    "bench --save over its config": (["bench", "prefill", "--config", "{config}", "--save", "{config}"],
                                     "is the input"),
    "bench --plot over its pattern file": (["bench", "prefill", "--pattern-file", "{beside}/pattern.json",
                                            "--plot", "{beside}/pattern.json"], "is the input"),
}


@pytest.mark.parametrize("name", list(FORCE_CASES))
def test_force_never_replaces_an_input(name, files, tmp_path):
    template, message = FORCE_CASES[name]
    _refused(files, tmp_path, template + ["--force"], message + " ")
    assert (files["model"] / "data" / "cal.txt").read_text().startswith("calibration text")


NO_FORCE_CASES = {  # verbs without --force: the same rule
    "demo into the embedded model": (["demo", "--out", "{shipped}/demo"], "lies inside the input"),
    "make-checkpoint into the embedded model": (["make-checkpoint", "{shipped}/m", "--weights", "none"],
                                                "lies inside the input"),
    "train-tiny over the shipped model": (["train-tiny", "--out", "{shipped}"], "which only --force replaces"),
}


@pytest.mark.parametrize("name", list(NO_FORCE_CASES))
def test_inputs_of_verbs_without_force(name, files, tmp_path):
    _refused(files, tmp_path, *NO_FORCE_CASES[name])


# (verb argv, the state file an interrupted run leaves, relative to tmp) -> the rerun must name --resume
RESUME_CASES = {
    "calibrate": (_cal(out="{tmp}/r/p.json"), "r/p.json.state.json", "pass --resume to continue it"),
    "distill": (_distill("{tmp}/r"), "r/distill/state.pt", "pass --resume to continue it"),
    "train-tiny": (["train-tiny", "--out", "{tmp}/r/model", "--work-dir", "{tmp}/r/scratch"], "r/scratch/state.pt",
                   "pass --resume to continue it"),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_rerun_of_an_interrupted_run_names_resume(name, force, files, tmp_path):
    template, state, message = RESUME_CASES[name]
    run_files = dict(files, tmp=tmp_path / "run")
    saved = tmp_path / "run" / state
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    argv = [arg.format(**run_files) for arg in template] + (["--force"] if force else [])
    proc, report = run_cli(argv, tmp_path / "run")
    assert report["rc"] == 2 and message in proc.stderr, proc.stderr
    assert not report["torch"] and saved.read_text() == "{}"


def test_interrupted_calibrate_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C after a saved step: one line that names the state file and --resume."""
    from dsa_models import save_micro_checkpoint, write_text

    from sglang_indexcache.calibration import greedy

    model = save_micro_checkpoint(tmp_path / "model", layers=5, topk=8, seed=2)
    data = write_text(tmp_path / "cal.txt", n_docs=30)
    original = greedy.run_search

    def stop_after_first_step(evaluator, state, target, n, on_step=None, **kwargs):
        def saved_then_interrupted(current):
            on_step(current)
            raise KeyboardInterrupt
        return original(evaluator, state, target, n, on_step=saved_then_interrupted, **kwargs)

    monkeypatch.setattr(greedy, "run_search", stop_after_first_step)
    capsys.readouterr()
    argv = ["--quiet", "calibrate", "--model", str(model), "--data", str(data), "--keep", "0.4", "--out",
            str(tmp_path / "p.json"), "--seq-len", "32", "--max-tokens", "256", "--threads", "1"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the same command with --resume continues it" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "model", "p.json.state.json"]
    monkeypatch.setattr(greedy, "run_search", original)
    assert cli.main(argv + ["--resume"]) == 0
    assert (tmp_path / "p.json").is_file() and not (tmp_path / "p.json.state.json").exists()


def _interrupt_at(monkeypatch, module, name):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, name, interrupted)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from dsa_models import save_micro_checkpoint, write_text

    root = tmp_path_factory.mktemp("micro")
    return save_micro_checkpoint(root / "model", layers=4, topk=8, seed=3), write_text(root / "cal.txt", n_docs=30)


SMALL = ["--seq-len", "32", "--max-tokens", "256", "--batch-size", "4", "--threads", "1"]


def _partial_cases():
    """verb -> (argv template, where the interruption strikes (module, attribute), outputs)."""
    from sglang_indexcache import checkpoint_writer, gpu_bundle
    from sglang_indexcache.calibration import plots
    from sglang_indexcache.training import distill_io

    return {
        "overlap": (["overlap", "--model", "{model}", "--data", "{data}", "--out", "{out}/o", *SMALL],
                    (plots, "plot_overlap"), ["o"]),
        "calibrate": (["calibrate", "--model", "{model}", "--data", "{data}", "--keep", "0.5",
                       "--out", "{out}/p.json", *SMALL], (plots, "plot_calibration"), ["p.json", "p.calibration.png"]),
        "distill": (["distill", "--model", "{model}", "--pattern", "FSFS", "--data", "{data}", "--out", "{out}/d",
                     "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "64", "--threads", "1"],
                    (distill_io, "plot_losses"), ["d/pattern.json", "d/README.md", "d/model.safetensors"]),
        "make-checkpoint": (["make-checkpoint", "{out}/m", "--layers", "2", "--hidden", "64", "--intermediate", "64"],
                            (checkpoint_writer, "write_weights"), ["m"]),
        "gpu-bundle": (["gpu-bundle", "--sglang", "0.5.17", "--python", "3.12", "--arch", "sm_90", "--out", "{out}/g",
                        "--cache", "{out}/cache"], (gpu_bundle, "resolve_wheels"), ["g"]),
    }


@pytest.mark.parametrize("verb", ["overlap", "calibrate", "distill", "make-checkpoint", "gpu-bundle"])
def test_interrupted_command_leaves_no_partial_output(verb, micro, tmp_path, monkeypatch, capsys):
    """Ctrl-C between a command's outputs: none of them appears, and the rerun is not refused."""
    from sglang_indexcache import gpu_bundle

    model, data = micro
    template, (module, name), outputs = _partial_cases()[verb]
    argv = ["--quiet"] + [a.format(model=model, data=data, out=tmp_path) for a in template]
    if verb == "gpu-bundle":  # the interruption strikes inside the writing, after the wheels are found
        monkeypatch.setattr(gpu_bundle, "resolve_wheels", lambda *a, **k: {})
        monkeypatch.setattr(gpu_bundle, "read_pins", lambda path: [])
        module, name = gpu_bundle, "pack"
    _interrupt_at(monkeypatch, module, name)
    assert cli.main(argv) == 130
    capsys.readouterr()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert not [out for out in outputs if (tmp_path / out).exists()], left
    assert not [p for p in left if ".partial-" in p or p.split("/")[-1].startswith(".")], left
    monkeypatch.undo()
    if verb in ("overlap", "make-checkpoint"):  # the rerun is accepted and writes everything
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert all((tmp_path / out).exists() for out in outputs)


def _sys_unwritable() -> bool:
    try:
        open("/sys/indexcache-write-test", "w").close()
    except OSError:
        return Path("/sys").is_dir()
    os.unlink("/sys/indexcache-write-test")
    return False


WRITE_CASES = {
    "calibrate": _cal(out="/sys/p.json"),
    "overlap": ["overlap", "--model", "{model}", "--data", "{data}", "--out", "/sys/o"],
    "distill": _distill("/sys/d"),
    "bench --save": ["bench", "prefill", "--save", "/sys/b.json"],
    "bench --plot": ["bench", "decode", "--plot", "/sys/b.png"],
    "train-tiny": ["train-tiny", "--out", "/sys/t", "--work-dir", "{tmp}/w"],
    "train-tiny --work-dir": ["train-tiny", "--out", "{tmp}/t", "--work-dir", "/sys/w"],
    "demo": ["demo", "--out", "/sys/demo"],
    "make-checkpoint": ["make-checkpoint", "/sys/m"],
    "gpu-bundle": ["gpu-bundle", "--sglang", "0.5.17", "--python", "3.12", "--arch", "sm_90", "--out", "/sys/g"],
}


@pytest.mark.skipif(not _sys_unwritable(), reason="needs Linux's /sys, where no file can be created")
@pytest.mark.parametrize("name", list(WRITE_CASES))
def test_unwritable_output_is_refused_before_the_work(name, files, tmp_path):
    """/sys passes the permission check for root, but no file can be created there: found by writing."""
    _refused(files, tmp_path, WRITE_CASES[name], "cannot write in /sys")


DIRECTORY_CASES = {
    "validate a folder": (["validate", "{beside}", "--model", "{model}"], "is a directory, not a pattern file"),
    "validate a folder by name": (["validate", "beside", "--model", "{model}"], "is a directory"),
    "eval --pattern a folder": (["eval", "--model", "{model}", "--data", "{data}", "--pattern", "{beside}"],
                                "is a directory"),
    "distill --pattern a folder": (_distill(pattern="{beside}"), "is a directory"),
    "serve --pattern-file a folder": (["serve", "--model", "{model}", "--pattern-file", "{beside}", "--dry-run"],
                                      "is a directory"),
    "bench --pattern-file a folder": (["bench", "prefill", "--pattern-file", "{beside}"], "is a directory"),
    "bench --config a folder": (["bench", "prefill", "--config", "{beside}"], "is a directory"),
    "calibrate --out a folder": (_cal(out="{beside}"), "is a folder; give a file name"),
    "bench --save a folder": (["bench", "prefill", "--save", "{beside}"], "is a folder; give a file name"),
    "--model a file": (["validate", "every-4", "--model", "{file}"], "must be a directory"),
    "overlap --out a file": (["overlap", "--model", "{model}", "--data", "{data}", "--out", "{file}"],
                             "is a file, not a folder"),
    "make-checkpoint OUT a file": (["make-checkpoint", "{file}"], "is a file, not a folder"),
    "demo --out a file": (["demo", "--out", "{file}"], "is a file, not a folder"),
    "gpu-bundle --wheelhouse a file": (["gpu-bundle", "--sglang", "0.5.17", "--python", "3.12", "--arch", "sm_90",
                                        "--out", "{tmp}/g", "--wheelhouse", "{file}"], "is a file, not a folder"),
}


@pytest.mark.parametrize("name", list(DIRECTORY_CASES))
def test_a_folder_where_a_file_is_expected_is_named(name, files, tmp_path):
    template, message = DIRECTORY_CASES[name]
    run_files = dict(files)
    (tmp_path / "beside").mkdir()  # the by-name case looks in the working directory
    err = _refused(run_files, tmp_path, template, message)
    if "pattern file" in err and "validate a folder" == name:
        assert "the pattern file inside it is" in err  # beside/ holds pattern.json


def _bad_data(root: Path) -> dict:
    empty = root / "empty.txt"
    empty.write_text("")
    latin = root / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    no_text = root / "no-text"
    no_text.mkdir()
    (no_text / "notes.md").write_text("# not a data file\n")
    mixed = root / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("text\n")
    (mixed / "b.jsonl").write_text('{"text": "x"}\n')
    return {"missing": (root / "nope.txt", "does not exist"), "empty": (empty, "is empty"),
            "not UTF-8": (latin, "is not UTF-8 text"), "no data files": (no_text, "holds no .txt/.jsonl/.parquet"),
            "mixed kinds": (mixed, "mixes file types")}


@pytest.mark.parametrize("verb", ["calibrate", "eval", "overlap", "distill", "distill --eval-data"])
@pytest.mark.parametrize("case", ["missing", "empty", "not UTF-8", "no data files", "mixed kinds"])
def test_data_errors_come_before_heavy_imports(verb, case, files, tmp_path):
    source, message = _bad_data(tmp_path)[case]
    argv = {"calibrate": _cal(str(source), "{tmp}/out/p.json"),
            "eval": ["eval", "--model", "{model}", "--data", str(source), "--pattern", "all-F"],
            "overlap": ["overlap", "--model", "{model}", "--data", str(source), "--out", "{tmp}/out/o"],
            "distill": _distill("{tmp}/out/d", data=str(source)),
            "distill --eval-data": _distill("{tmp}/out/d") + ["--eval-data", str(source)]}[verb]
    _refused(dict(files, tmp=tmp_path), tmp_path, argv, message)


def test_help_opens_with_a_sentence_for_users():
    proc = subprocess.run([sys.executable, "-m", "sglang_indexcache", "--help"], capture_output=True, text=True)
    description = proc.stdout.split("\n\n")[1]
    assert description.startswith("IndexCache for DeepSeek-Sparse-Attention models served with SGLang")
    assert "library" not in description and "``" not in description


@pytest.mark.slow  # about 40 s on 2 idle cores, 70 s at load 4: the demo's first search step
def test_demo_ctrl_c_prints_one_line_it_can_follow(tmp_path):
    """The real demo, interrupted once its search has saved a step: one line on stderr (besides
    progress lines), advice that `make demo` can follow (no --resume); the rerun reuses the state."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sglang_indexcache", "demo", "--out", "d"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "d" / "pattern.json.state.json"
    deadline = time.monotonic() + 240

    def steps_saved() -> bool:  # the state is also saved inside a step (scored candidates): wait for a step
        return state.is_file() and bool(json.loads(state.read_text())["steps"])

    while not steps_saved() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_saved(), "the demo saved no search step in time"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if "sglang_indexcache.progress" not in line]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert "the same command again resumes the search saved in d/pattern.json.state.json" in lines[0]
    assert "--resume" not in err and "Greedy calibration" in out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["pattern.json.state.json"]
    saved = json.loads(state.read_text())
    assert saved["steps"], "the state holds the step the next run continues from"
