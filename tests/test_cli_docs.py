"""Every `indexcache` command line of README.md ("Usage") and docs/cli.md (`$ indexcache ...`) runs.

The lines are read from the documents themselves (a new example is run without editing this test)
and run in order, in a scratch working directory, on the embedded model, with flags appended that
shrink the work (argparse keeps the last value of a repeated flag): a few hundred tokens, one
timed repeat, two distillation steps. Documented outputs of `pattern` lines are compared exactly.
`make ...` lines are covered by their own tests (patch set, packaging). `serve` has no SGLang
here, so its line is run with --dry-run and must stop at that check.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

from sglang_indexcache import cli
from sglang_indexcache.configs import TINY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").is_file(),
                                reason="embedded model not built")
DATA = ["--seq-len", "128", "--max-tokens", "512", "--batch-size", "2", "--threads", "1"]
BENCH = ["--layers", "2", "--contexts", "256", "--repeats", "1", "--warmup", "0", "--topk", "32", "--threads", "1"]
SHRINK = {
    "calibrate": DATA,
    "eval": DATA,
    "overlap": DATA,
    "distill": ["--steps", "2", "--seq-len", "128", "--batch-size", "2", "--eval-tokens", "256",
                "--train-tokens", "2048", "--threads", "1"],
    "bench": BENCH,
}


def readme_commands() -> list[tuple[list[str], str | None]]:
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        if line.startswith("$I "):
            command, _, comment = line.partition("#")
            expected = comment.split(":")[0].strip()
            out.append((shlex.split(command)[1:], expected if re.fullmatch(r"[FS]+", expected) else None))
    return out


def docs_commands() -> list[tuple[list[str], str | None]]:
    lines = (REPO_ROOT / "docs" / "cli.md").read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("$ indexcache "):
            command = lines[i]
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            argv = shlex.split(command.partition("#")[0])[2:]
            following = lines[i + 1] if i + 1 < len(lines) else ""
            expected = following.strip() if argv[0] == "pattern" and not following.startswith(("$", "`")) else None
            out.append((argv, expected))
        i += 1
    return out


def check(argv, expected, capsys):
    """Run one documented line in this process (torch loads once for all of them)."""
    model = str(TINY_MODEL_DIR)
    argv = [re.sub(r"^(\$M|models/tiny-glm-dsa)(?=/|$)", model, a) for a in argv]
    if argv[0] == "serve":
        argv = [model if a == "DIR" else a for a in argv] + ["--dry-run"]
    code = cli.main(["--quiet", *argv, *SHRINK.get(argv[0], [])])
    out, err = capsys.readouterr()
    if argv[0] == "serve" and importlib.util.find_spec("sglang") is None:
        assert code == 2 and "SGLang is not installed" in err, err
        return
    assert code == 0, (argv, err[-2000:])
    if expected is not None:
        assert out.strip() == expected, (argv, out)


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_readme_and_docs_commands_run(tmp_path, monkeypatch, capsys, restore_threads):
    monkeypatch.chdir(tmp_path)
    readme, docs = readme_commands(), docs_commands()
    assert {a[0] for a, _ in readme} >= {"pattern", "validate", "calibrate", "eval", "overlap", "distill",
                                         "bench", "serve"}
    assert any(expected for _, expected in docs), "docs/cli.md lost its pattern examples"
    for argv, expected in readme:
        check(argv, expected, capsys)
    demo = tmp_path / "out" / "demo"  # docs/cli.md's eval reads the demo's pattern; the README's search stands in
    demo.mkdir(parents=True)
    shutil.copy(tmp_path / "runs" / "p.json", demo / "pattern.json")
    for argv, expected in docs:
        check(argv, expected, capsys)
