"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer of a result, state or pattern file in the project goes through here. A command with
several outputs stages them (:func:`staged_files`, :func:`staged_dir`) and renames them into place
together with Ctrl-C held off (:func:`held_interrupts`): an interrupted command leaves all of its
outputs or none (never ``overlap.json`` without ``overlap.png``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_savefig", "held_interrupts",
           "staged_files", "staged_dir"]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    For writers that want a path (``torch.save``, safetensors). The new file gets the usual mode of
    a new file (``0666 & ~umask``), not ``mkstemp``'s 0600; on an error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path, document, indent: int = 1) -> None:
    """``atomic_write_text`` of ``document`` as JSON (a newline at the end)."""
    atomic_write_text(path, json.dumps(document, indent=indent) + "\n")


def atomic_savefig(fig, path, **kwargs) -> Path:
    """Save the matplotlib figure ``fig`` to ``path`` atomically, in the format of ``path``'s suffix
    (PNG without one), then close it. ``kwargs`` go to ``savefig`` (``dpi``)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    plt.close(fig)
    return path


@contextlib.contextmanager
def held_interrupts():
    """Ctrl-C and SIGTERM wait until the block has run (then they act as usual): for the few
    renames that commit a command's outputs. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _publish(tmp: Path) -> None:
    os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def staged_files(*paths, remove=()):
    """Yield a temporary path beside each of ``paths`` (same suffix, so writers that pick a format
    from it work); when the block succeeds, rename them all onto ``paths`` and delete ``remove``
    (e.g. a resume state the outputs supersede) with interrupts held. On an error or Ctrl-C the
    temporary files are removed and ``paths`` are untouched."""
    paths = [Path(p) for p in paths]
    tmps = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield tmps
        with held_interrupts():
            for tmp, path in zip(tmps, paths):
                _publish(tmp)
                os.replace(tmp, path)
            for path in remove:
                Path(path).unlink(missing_ok=True)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def _merge(src: Path, dst: Path) -> None:
    """Move every entry of ``src`` into ``dst``: folders merge, anything else replaces its namesake."""
    dst.mkdir(exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge(entry, target)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    src.rmdir()


@contextlib.contextmanager
def staged_dir(out):
    """Yield a new temporary folder beside ``out`` to fill; when the block succeeds its contents
    move into ``out`` (one rename when ``out`` does not exist yet, else merged entry by entry) with
    interrupts held. On an error or Ctrl-C the temporary folder is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        with held_interrupts():
            os.chmod(tmp, 0o777 & ~_umask())
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            if out.exists():
                _merge(tmp, out)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
