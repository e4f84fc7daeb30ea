"""The patch series against the real SGLang wheels (every supported release): series checks,
apply/revert, both layouts, other releases refused.

Fast: no SGLang import. Trees that apply/revert are made of only the files the patches touch plus
the package's ``__init__.py`` and ``_version.py``, extracted from the cached wheel.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sglang_support import trees as sgl

from sglang_indexcache.sglang_overlay import patchset

pytestmark = pytest.mark.sglang
MAX_CHANGED_LINES = 150


def patched_files(release: str) -> set[str]:
    files = set()
    for patch in patchset.series(version=release):
        files |= set(re.findall(r"^diff --git a/python/(\S+) ", patch.read_text(), re.M))
    return files


@pytest.fixture
def small_tree(tmp_path, sglang_release):
    """An installed-layout tree holding just what the patches and the version check read."""
    members = patched_files(sglang_release) | {"sglang/__init__.py", "sglang/_version.py", "sglang/version.py"}
    return sgl.unpack(sgl.wheel(sglang_release), tmp_path / "site", members)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_supported_releases_are_listed_oldest_first():
    versions = patchset.supported_versions()
    assert versions == sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert {"0.5.17", "0.5.23"} <= set(versions)


@pytest.mark.parametrize("release", patchset.supported_versions())
def test_series_lists_every_patch_once_and_each_is_small(release):
    patches = patchset.series(version=release)
    assert [p.name[:4] for p in patches] == sorted(p.name[:4] for p in patches)
    for patch in patches:
        text = patch.read_text()
        first = text.splitlines()[0]
        assert first and not first.startswith(("diff", "---", "From ")), f"{patch.name} lacks a summary line"
        assert "What:" in text and "Why:" in text, f"{patch.name} lacks its what/why header"
        changed = [line for line in text.split("\ndiff --git", 1)[1].splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert len(changed) < MAX_CHANGED_LINES, f"{patch.name} changes {len(changed)} lines"
        assert "sglang_indexcache.sglang_overlay" in text, f"{patch.name} is not a thin hook into the overlay"


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),  # series names a patch file that is gone
    ("unused", "which series does not list"),  # a patch file series forgets
    ("duplicate", "more than once"),
])
def test_check_refuses_a_broken_series(tmp_path, damage, message):
    patches_dir = tmp_path / "patches"
    shutil.copytree(patchset.PATCHES_DIR, patches_dir)
    directory = patches_dir / f"sglang-{patchset.supported_versions(patches_dir)[0]}"  # any release's series
    series = directory / "series"
    first = patchset.series(patches_dir, directory.name.split("-", 1)[1])[0].name
    if damage == "missing":
        (directory / first).unlink()
    elif damage == "unused":
        (directory / "0099-stray.patch").write_text("stray\n")
    else:
        series.write_text(series.read_text() + first + "\n")
    with pytest.raises(patchset.PatchSetError, match=message):
        patchset.check(None, patches_dir)


def test_apply_is_idempotent_and_revert_restores_bytes(small_tree, sglang_release):
    before = digest(small_tree)
    assert f"(SGLang {sglang_release}): applies cleanly" in patchset.check(small_tree)
    assert patchset.apply(small_tree).startswith(f"applied {len(patchset.series(version=sglang_release))} patches")
    after = digest(small_tree)
    assert {name for name in before if before[name] != after[name]} == patched_files(sglang_release)
    assert patchset.apply(small_tree).startswith("already applied")
    assert digest(small_tree) == after
    assert patchset.revert(small_tree).startswith("reverted")
    assert digest(small_tree) == before
    assert patchset.revert(small_tree).startswith("not applied")


def test_checkout_layout(tmp_path, small_tree):
    checkout = tmp_path / "checkout"
    (checkout / "python").mkdir(parents=True)
    shutil.copytree(small_tree / "sglang", checkout / "python" / "sglang")
    before = digest(checkout)
    assert "checkout layout" in patchset.apply(checkout)
    assert patchset.apply(checkout).startswith("already applied")
    patchset.revert(checkout)
    assert digest(checkout) == before


OTHER_RELEASES = {"0.5.17": ["0.5.16", "0.5.18"], "0.5.23": ["0.5.22", "0.5.24"]}


@pytest.mark.parametrize("step", [0, 1])
def test_other_version_is_refused_with_nothing_changed(small_tree, sglang_release, step):
    other = OTHER_RELEASES[sglang_release][step]
    version_file = small_tree / "sglang" / "_version.py"
    version_file.write_text(version_file.read_text().replace(f"'{sglang_release}'", f"'{other}'"))
    before = digest(small_tree)
    supported = ", ".join(patchset.supported_versions())
    with pytest.raises(patchset.PatchSetError,
                       match=f"holds SGLang {re.escape(other)}, but patch series exist only for SGLang {supported}"):
        patchset.apply(small_tree)
    assert digest(small_tree) == before


def test_tree_that_does_not_match_is_refused_with_nothing_changed(small_tree):
    target = small_tree / "sglang" / "srt" / "managers" / "scheduler.py"
    target.write_text(target.read_text().replace("def handle_rpc_request(self, recv_req: RpcReqInput):",
                                                 "def handle_rpc_request_renamed(self, recv_req):"))
    before = digest(small_tree)
    with pytest.raises(patchset.PatchSetError, match="does not apply"):
        patchset.apply(small_tree)
    assert digest(small_tree) == before


def test_partly_patched_tree_is_refused(small_tree, sglang_release):
    first = patchset.series(version=sglang_release)[0]
    subprocess.run(["git", "apply", "-p2", str(first)], cwd=small_tree, check=True)
    with pytest.raises(patchset.PatchSetError, match="partly patched"):
        patchset.apply(small_tree)


@pytest.mark.parametrize("where, message", [
    ("nowhere", "does not exist"),
    ("empty", "neither an SGLang checkout"),
    ("unset", "no SGLang directory given"),  # make apply-patches without SGLANG_DIR
    ("package", "is the sglang package itself: give the folder that holds it, {parent}"),
])
def test_bad_directory_is_one_clear_error(tmp_path, where, message):
    directory = "" if where == "unset" else tmp_path / "d"
    if where == "empty":
        directory.mkdir()
    if where == "package":  # SGLANG_DIR=.../site-packages/sglang instead of .../site-packages
        directory = tmp_path / "site" / "sglang"
        directory.mkdir(parents=True)
        (directory / "__init__.py").write_text("")
        message = message.format(parent=directory.parent)
    proc = subprocess.run([sys.executable, "-m", "sglang_indexcache", "apply-patches", str(directory)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_cli_apply_then_already_applied(small_tree, sglang_release):
    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "sglang_indexcache", *argv], capture_output=True, text=True)
    before = digest(small_tree)
    assert cli("apply-patches", str(small_tree)).returncode == 0
    second = cli("apply-patches", str(small_tree))
    assert second.returncode == 0 and "already applied" in second.stdout
    checked = cli("check-patches", str(small_tree))
    assert checked.returncode == 0 and f"(SGLang {sglang_release}): applied" in checked.stdout
    assert cli("revert-patches", str(small_tree)).returncode == 0
    assert digest(small_tree) == before
    series_only = cli("check-patches", "")  # make check-patches without SGLANG_DIR
    assert series_only.returncode == 0 and series_only.stdout.startswith("series OK")


def test_module_entry_point_is_the_same_command(small_tree):
    """``python -m sglang_indexcache.sglang_overlay.patchset apply DIR`` (scripts use it) = apply-patches."""
    def alias(action):
        return subprocess.run([sys.executable, "-m", "sglang_indexcache.sglang_overlay.patchset", action,
                               str(small_tree)], capture_output=True, text=True)
    assert alias("apply").returncode == 0
    assert "already applied" in alias("apply").stdout
    assert alias("revert").returncode == 0
    assert alias("unknown").returncode == 2
