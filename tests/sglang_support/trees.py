"""The real SGLang wheel (downloaded once into ``.cache/sglang/``) unpacked as stock and patched trees.

``trees(tmp_path_factory)`` returns ``Trees(stock, patched, wheel)``: two directories that each hold
an installed-layout ``sglang/`` package (the patched one through our patchset), built once per test
session and shared by every SGLang test module. ``run_driver(tree, cases)`` runs
``driver.py`` in a fresh subprocess with that tree first on ``PYTHONPATH``.
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

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "sglang"
DRIVER = Path(__file__).with_name("driver.py")
_SESSION: dict = {}


def pinned_version() -> str:
    return (REPO / "patches" / "sglang-version").read_text().strip()


def wheel() -> Path:
    """The cached ``sglang-<pinned>-*.whl``, downloaded with pip on first use."""
    version = pinned_version()
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--disable-pip-version-check", "-d", str(CACHE), f"sglang=={version}"],
        capture_output=True, text=True)
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if result.returncode != 0 or not found:
        message = f"cannot download sglang=={version}: {result.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


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


def trees(tmp_path_factory) -> Trees:
    if "trees" not in _SESSION:
        from sglang_indexcache.sglang_overlay import patchset

        whl = wheel()
        base = tmp_path_factory.mktemp("sglang-trees")
        stock, patched = unpack(whl, base / "stock"), unpack(whl, base / "patched")
        patchset.apply(patched)
        _SESSION["trees"] = Trees(stock, patched, whl)
    return _SESSION["trees"]


def run_driver(tree: Path, cases: list[dict], workdir: Path, timeout: int = 600) -> list[dict]:
    """Run ``cases`` through driver.py in a fresh interpreter importing SGLang from ``tree``."""
    workdir.mkdir(parents=True, exist_ok=True)
    cases_path, results_path = workdir / "cases.json", workdir / "results.json"
    cases_path.write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO)]), SGLANG_USE_CPU_ENGINE="1",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(DRIVER), str(cases_path), str(results_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not results_path.is_file():
        raise AssertionError(f"driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results_path.read_text())
