"""The real SGLang wheels (downloaded once into ``.cache/sglang/``) unpacked as stock and patched trees.

Every supported release (``patches/sglang-version``: ``RELEASES``) is tested. ``trees(tmp_path_factory,
release)`` returns ``Trees(stock, patched, wheel)``: two directories that each hold an
installed-layout ``sglang/`` package (the patched one through our patchset), built once per test
session and release. ``env(tree, release)`` is the environment of a subprocess importing that tree:
the tree first on ``PYTHONPATH``, then the release's extra CPU packages where it needs some
(``requirements/sglang-<release>-cpu.txt``, installed once into ``.cache/sglang-<release>-deps``),
then this repository. ``run_driver(tree, cases, workdir, release)`` runs ``driver.py`` that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from sglang_indexcache.sglang_overlay import patchset

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "sglang"
DRIVER = Path(__file__).with_name("driver.py")
RELEASES = patchset.supported_versions()
_SESSION: dict = {}


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wheel(release: str = RELEASES[-1]) -> Path:
    """The cached ``sglang-<release>-*.whl``, downloaded with pip on first use."""
    found = sorted(CACHE.glob(f"sglang-{release}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--disable-pip-version-check", "-d", str(CACHE), f"sglang=={release}"],
        capture_output=True, text=True)
    found = sorted(CACHE.glob(f"sglang-{release}-*.whl"))
    if result.returncode != 0 or not found:
        _unavailable(f"cannot download sglang=={release}: {result.stderr.strip()[-300:]}")
    return found[0]


def deps(release: str) -> Path | None:
    """The folder of the release's extra CPU packages (None when it needs none), made once."""
    pins = REPO / "requirements" / f"sglang-{release}-cpu.txt"
    if not pins.is_file():
        return None
    target = REPO / ".cache" / f"sglang-{release}-deps"
    stamp = target / ".installed"
    if stamp.is_file() and stamp.read_text() == pins.read_text():
        return target
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "-q", "--upgrade",
         "--disable-pip-version-check", "--target", str(target), "-r", str(pins)],
        capture_output=True, text=True)
    if result.returncode != 0:
        _unavailable(f"cannot install {pins.name}: {result.stderr.strip()[-300:]}")
    stamp.write_text(pins.read_text())
    return target


def env(tree: Path, release: str, **extra) -> dict:
    """Environment of a subprocess that imports SGLang ``release`` from ``tree`` on the CPU."""
    extra_deps = deps(release)
    path = [str(tree)] + ([str(extra_deps)] if extra_deps else []) + [str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), SGLANG_USE_CPU_ENGINE="1",
                PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def unpack(wheel_path: Path, dest: Path, members=None) -> Path:
    """Extract the ``sglang/`` package (or only ``members``) of the wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as archive:
        names = [n for n in archive.namelist() if n.startswith("sglang/")]
        if members is not None:
            names = [n for n in names if n in members]
        archive.extractall(dest, names)
    return dest


@dataclass(frozen=True)
class Trees:
    stock: Path
    patched: Path
    wheel: Path


def trees(tmp_path_factory, release: str = RELEASES[-1]) -> Trees:
    if release not in _SESSION:
        whl = wheel(release)
        base = tmp_path_factory.mktemp(f"sglang-{release}-trees")
        stock, patched = unpack(whl, base / "stock"), unpack(whl, base / "patched")
        patchset.apply(patched)
        _SESSION[release] = Trees(stock, patched, whl)
    return _SESSION[release]


def run_driver(tree: Path, cases: list[dict], workdir: Path, release: str = RELEASES[-1],
               timeout: int = 600) -> list[dict]:
    """Run ``cases`` through driver.py in a fresh interpreter importing SGLang ``release`` from ``tree``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cases_path, results_path = workdir / "cases.json", workdir / "results.json"
    cases_path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(DRIVER), str(cases_path), str(results_path)],
                          env=env(tree, release), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not results_path.is_file():
        raise AssertionError(f"driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results_path.read_text())
