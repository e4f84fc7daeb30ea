"""Apply, revert and check the SGLang patch series (``patches/sglang-<version>/`` + ``series``).

``indexcache {apply,revert,check}-patches DIR`` (``commands/patches.py``; ``python -m
sglang_indexcache.sglang_overlay.patchset {apply,revert,check} DIR`` is the same). The series are
package data (:func:`sglang_indexcache.resources.data_dir`), so this works from an installed wheel.

DIR is a git checkout of SGLang (it has ``python/sglang/``) or the parent of an installed package
(it has ``sglang/__init__.py``, e.g. ``site-packages``). The patches are git-format with paths
``python/sglang/...``; for an installed package they are applied with ``-p2``.

- The SGLang version in DIR picks the series: it must be one of the supported releases listed in
  ``patches/sglang-version`` (one per line); any other version is refused with nothing changed.
- ``apply`` first applies the whole series, patch after patch, to a scratch copy of the files it
  touches (a later patch may change lines an earlier one added, which one ``git apply`` of all
  patches cannot take: it matches every patch against the original file), and only when all apply
  there applies them to the tree, in order (all or nothing); when the series reverse-applies (last
  patch first) it says "already applied" and changes nothing.
- ``revert`` is the exact inverse (``git apply -R``, last patch first): the files come back byte for byte.
- ``check`` fails on a missing, unused or duplicate patch in any release's ``series``; with DIR it
  also says whether that release's series is applied, applies cleanly, or neither.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..resources import data_dir

logger = logging.getLogger(__name__)

PATCHES_DIR = data_dir("patches")
VERSION_RE = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


class PatchSetError(UsageError):
    """The patch set cannot be applied, reverted or checked as asked (nothing was changed)."""


def supported_versions(patches_dir: Path = PATCHES_DIR) -> list[str]:
    """The SGLang releases with a patch series, in the order ``patches/sglang-version`` lists them."""
    path = patches_dir / "sglang-version"
    if not path.is_file():
        raise PatchSetError(f"{path} is missing: it lists the SGLang releases the patches target")
    versions = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    versions = [v for v in versions if v]
    if not versions:
        raise PatchSetError(f"{path} lists no SGLang release")
    return versions


def series(patches_dir: Path = PATCHES_DIR, version: str | None = None) -> list[Path]:
    """The patches of ``version`` (default: the newest listed) in ``series`` order; refuses missing,
    unused or duplicate entries."""
    version = version or supported_versions(patches_dir)[-1]
    directory = patches_dir / f"sglang-{version}"
    series_path = directory / "series"
    if not series_path.is_file():
        raise PatchSetError(f"{series_path} is missing")
    names = [line.split("#", 1)[0].strip() for line in series_path.read_text().splitlines()]
    names = [n for n in names if n]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PatchSetError(f"{series_path} lists {', '.join(duplicates)} more than once")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise PatchSetError(f"{series_path} lists {', '.join(missing)}, which does not exist")
    unused = sorted(p.name for p in directory.glob("*.patch") if p.name not in names)
    if unused:
        raise PatchSetError(f"{directory} has {', '.join(unused)}, which series does not list")
    if not names:
        raise PatchSetError(f"{series_path} lists no patch")
    return [directory / n for n in names]


@dataclass
class Target:
    root: Path  # where git apply runs
    strip: int  # -p value: 1 for a checkout (python/sglang/...), 2 for an installed package
    layout: str  # "checkout" or "installed"

    @property
    def package(self) -> Path:
        return self.root / "python" / "sglang" if self.layout == "checkout" else self.root / "sglang"


def locate(directory) -> Target:
    if not directory:
        raise PatchSetError("no SGLang directory given: indexcache apply-patches DIR (make apply-patches SGLANG_DIR=DIR)")
    root = Path(directory).resolve()
    if not root.is_dir():
        raise PatchSetError(f"SGLang directory {directory} does not exist")
    if (root / "python" / "sglang" / "__init__.py").is_file():
        return Target(root, 1, "checkout")
    if (root / "sglang" / "__init__.py").is_file():
        return Target(root, 2, "installed")
    if root.name == "sglang" and (root / "__init__.py").is_file():
        raise PatchSetError(f"{directory} is the sglang package itself: give the folder that holds it,"
                            f" {root.parent}")
    raise PatchSetError(
        f"{directory} is neither an SGLang checkout (python/sglang/) nor an installed package's"
        " parent directory (sglang/__init__.py)"
    )


def installed_version(target: Target) -> str:
    """The version of the SGLang tree: ``_version.py`` (wheel), ``version.py``, or ``git describe``."""
    for name in ("_version.py", "version.py"):
        path = target.package / name
        if path.is_file():
            match = VERSION_RE.search(path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return match.group(1)
    if target.layout == "checkout":
        described = _git(target, "describe", "--tags", "--abbrev=0", check=False)
        if described.returncode == 0 and described.stdout.strip():
            return described.stdout.strip().lstrip("v")
    raise PatchSetError(f"cannot tell the SGLang version of {target.root} (no _version.py, version.py or tag)")


def _git(target: Target, *args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Never let git find an enclosing repository: paths must be relative to target.root.
    env["GIT_CEILING_DIRECTORIES"] = str(target.root.parent)
    result = subprocess.run(["git", *args], cwd=target.root, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise PatchSetError(f"git {' '.join(args[:2])} failed in {target.root}: {result.stderr.strip()}")
    return result


def _apply_args(target: Target, patches, reverse=False, check_only=False) -> list[str]:
    args = ["apply", f"-p{target.strip}", "--whitespace=nowarn"]
    if reverse:
        args.append("-R")
    if check_only:
        args.append("--check")
    return args + [str(p) for p in (reversed(patches) if reverse else patches)]


def _touched(target: Target, patches) -> list[str]:
    """The files the patches change, relative to ``target.root``."""
    found = []
    for patch in patches:
        for old in re.findall(r"^diff --git a/(\S+) ", patch.read_text(), re.M):
            rel = "/".join(old.split("/")[target.strip - 1:])
            if rel not in found:
                found.append(rel)
    return found


def _in_sequence(target: Target, patches, reverse: bool = False) -> subprocess.CompletedProcess | None:
    """Apply ``patches`` one after the other (``reverse``: ``-R``, last first) to a scratch copy of
    the files they touch; None when all apply, else the failing ``git apply``'s result."""
    with tempfile.TemporaryDirectory(prefix="indexcache-patches-") as scratch:
        copy = Target(Path(scratch), target.strip, target.layout)
        for rel in _touched(target, patches):
            if (target.root / rel).is_file():
                (copy.root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target.root / rel, copy.root / rel)
        for patch in (reversed(patches) if reverse else patches):
            result = _git(copy, *_apply_args(copy, [patch], reverse=reverse), check=False)
            if result.returncode != 0:
                return result
    return None


def status(target: Target, patches) -> str:
    """``"applied"``, ``"clean"`` (applies cleanly) or raises naming the first patch that does neither."""
    if _in_sequence(target, patches, reverse=True) is None:
        return "applied"
    forward = _in_sequence(target, patches)
    if forward is None:
        return "clean"
    applied = next((patches[:j] for j in range(len(patches) - 1, 0, -1)
                    if _in_sequence(target, patches[:j], reverse=True) is None), [])
    if applied:
        raise PatchSetError(
            f"{target.root} is partly patched ({', '.join(p.name for p in applied)} applied, the rest not): revert"
            " by hand or reinstall SGLang, then apply again"
        )
    first_error = forward.stderr.strip().splitlines()[0] if forward.stderr.strip() else "does not apply"
    raise PatchSetError(f"the patch set does not apply to {target.root}: {first_error}")


def _apply_in_order(target: Target, patches, reverse: bool = False) -> None:
    """Apply (or revert) the series on the tree, one patch after the other; the scratch run said it
    fits, so a failure here is unexpected: the patches already done are undone before raising."""
    done = []
    for patch in (list(reversed(patches)) if reverse else patches):
        result = _git(target, *_apply_args(target, [patch], reverse=reverse), check=False)
        if result.returncode != 0:
            for undo in reversed(done):
                _git(target, *_apply_args(target, [undo], reverse=not reverse), check=False)
            raise PatchSetError(f"git apply {patch.name} failed in {target.root}: {result.stderr.strip()}")
        done.append(patch)


def prepare(directory, patches_dir: Path = PATCHES_DIR):
    """The target tree and the series of its release; refuses an unsupported release."""
    supported = supported_versions(patches_dir)
    target = locate(directory)
    version = installed_version(target)
    if version not in supported:
        raise PatchSetError(
            f"{target.root} holds SGLang {version}, but patch series exist only for SGLang"
            f" {', '.join(supported)} (patches/sglang-version); nothing was changed"
        )
    return target, series(patches_dir, version)


def apply(directory, patches_dir: Path = PATCHES_DIR) -> str:
    target, patches = prepare(directory, patches_dir)
    if status(target, patches) == "applied":
        return f"already applied: {len(patches)} patches in {target.package}"
    _apply_in_order(target, patches)
    return f"applied {len(patches)} patches to {target.package} ({target.layout} layout)"


def revert(directory, patches_dir: Path = PATCHES_DIR) -> str:
    target, patches = prepare(directory, patches_dir)
    if status(target, patches) == "clean":
        return f"not applied: nothing to revert in {target.package}"
    _apply_in_order(target, patches, reverse=True)
    return f"reverted {len(patches)} patches in {target.package}"


def check(directory=None, patches_dir: Path = PATCHES_DIR) -> str:
    counts = [f"{len(series(patches_dir, v))} patches for SGLang {v}" for v in supported_versions(patches_dir)]
    message = "series OK: " + ", ".join(counts)
    if directory:
        target, patches = prepare(directory, patches_dir)
        state = status(target, patches)
        message += (f"; {target.package} (SGLang {installed_version(target)}): "
                    + ("applied" if state == "applied" else "applies cleanly"))
    return message


if __name__ == "__main__":  # the older entry point: the same as `indexcache {apply,revert,check}-patches DIR`
    from sglang_indexcache.cli import main

    action, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    sys.exit(main([f"{action}-patches" if action in ("apply", "revert", "check") else action, *rest]))
