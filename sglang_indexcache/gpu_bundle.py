"""Offline GPU bundle: the exact wheels one SGLang release needs on an air-gapped GPU host.

``build_bundle`` resolves every pin of ``requirements/gpu-sglang-<version>.txt`` to a wheel for the
host's Python and manylinux x86_64 (reusing wheels already on disk, ``pip download`` for the rest),
trims what the stated GPU architecture does not need (rewriting each trimmed wheel's RECORD),
repacks every wheel uncompressed (``ZIP_STORED``: xz then compresses the whole set far better
than deflate inside each wheel does), packs them into one ``tar.xz`` split into parts of at most
``part_size`` bytes, and writes ``manifest.json``, ``SHA256SUMS`` and the stdlib-only installer
(``gpu_bundle_install.py``, as ``install.py``) next to the parts.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from . import gpu_bundle_install, progress
from .atomic import atomic_write_json, atomic_write_text, staged_dir
from .errors import UsageError
from .gpu_bundle_install import sha256_file
from .resources import data_dir

log = logging.getLogger(__name__)

REQUIREMENTS_DIR = data_dir("requirements")
ARCHES = ("sm_90",)
ARCHIVE = "wheels.tar.xz"

# What a stated architecture does not need: {package: [(path prefix inside the wheel, why), ...]}.
# "*" applies to every architecture. sglang-kernel's FA3 (flash_ops, 1.1 GB unpacked) is dropped
# unless asked for: SGLang then needs the flashmla_sparse DSA backends (docs/gpu.md).
TRIMS = {
    "sglang-kernel": {
        "sm_90": [
            ("sgl_kernel/sm100/", "sm_100 op library"),
            ("sgl_kernel/infllm_ops.", "InfLLM extension"),
        ],
    },
    "xgrammar": {"*": [("xgrammar/lib/libxgrammar.a", "static library (link time only)")]},
    "sglang": {
        "*": [
            ("sglang/srt/grpc/_core.", "optional Rust gRPC server"),
            ("sglang/srt/server/_core.", "optional Rust HTTP server"),
            ("sglang/srt/multimodal/_core.", "optional Rust multimodal preprocessing"),
        ],
    },
}
FA3 = ("sgl_kernel/flash_ops.abi3.so", "FlashAttention-3 (sm_90 only; not used with flashmla_sparse)")
# Wheels packed next to each other: both vendor CUTLASS's headers (~20 MiB), and xz finds the second
# copy only within its 64 MiB window (worth 0.86 MiB on the SGLang 0.5.17 set).
NEIGHBOURS = {"sgl-deep-gemm": "flashinfer-python"}
SMOKE_IMPORTS = ["sglang", "sgl_kernel", "deep_gemm", "flashinfer", "transformers"]


def parse_size(text: str) -> int:
    """``40MiB``, ``60MB``, ``512KiB``, ``1048576`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise UsageError(f"not a size: {text!r} (e.g. 40MiB, 60MB, 1048576)")
    size = int(float(m.group(1)) * units[m.group(2).lower()])
    if size < 1:
        raise UsageError(f"size must be positive: {text!r}")
    return size


def read_pins(path) -> list[tuple[str, str]]:
    """``name==version`` lines (``#`` comments, blank lines ignored) -> [(canonical name, version)]."""
    pins = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise UsageError(f"{path}:{number}: expected name==version, got {line!r}")
        pins.append((str(canonicalize_name(m.group(1))), m.group(2)))
    return pins


def pins_file(sglang_version: str) -> Path:
    path = REQUIREMENTS_DIR / f"gpu-sglang-{sglang_version}.txt"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("gpu-sglang-") for p in REQUIREMENTS_DIR.glob("gpu-sglang-*.txt"))
        raise UsageError(f"no pinned list for SGLang {sglang_version} (known: {', '.join(known) or 'none'})")
    return path


def manylinux_platforms(glibc: str) -> list[str]:
    """Every manylinux x86_64 tag a host with this glibc accepts (pip matches each tag exactly)."""
    m = re.fullmatch(r"2\.(\d+)", glibc)
    if not m or int(m.group(1)) < 17:
        raise UsageError(f"--glibc must be 2.N with N >= 17, got {glibc!r}")
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(int(m.group(1)), 4, -1)]
    return platforms + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def accepted_tags(python: str, platforms: list[str]) -> set:
    m = re.fullmatch(r"3\.(\d+)", python)
    if not m:
        raise UsageError(f"--python must be 3.N, got {python!r}")
    version = (3, int(m.group(1)))
    from packaging.tags import compatible_tags, cpython_tags  # only the builder needs it

    tags = set(cpython_tags(version, platforms=platforms))
    tags |= set(compatible_tags(version, f"cp3{version[1]}", platforms=platforms))
    return tags


def find_wheel(dirs, name: str, version: str, tags: set) -> Path | None:
    """A wheel of exactly ``name==version`` with a tag in ``tags`` from one of ``dirs``."""
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.whl")):
            try:
                wname, wversion, _, wtags = parse_wheel_filename(path.name)
            except ValueError:
                continue
            if wname == name and str(wversion) == version and wtags & tags:
                return path
    return None


def download(pins, dest: Path, python: str, platforms: list[str]) -> None:
    """``pip download`` exactly these pins (no dependencies, wheels only) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--dest", str(dest)]
    for platform in platforms:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in pins]
    log.info("downloading %d wheels into %s", len(pins), dest)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"pip download failed: {last}")


def resolve_wheels(pins, wheelhouses, cache: Path, python: str, platforms: list[str]) -> dict[str, Path]:
    """{name: wheel path} for every pin: found in ``wheelhouses`` or ``cache``, else downloaded."""
    tags = accepted_tags(python, platforms)
    dirs = [Path(d) for d in wheelhouses] + [cache]
    found = {name: find_wheel(dirs, name, version, tags) for name, version in pins}
    missing = [(name, version) for name, version in pins if found[name] is None]
    log.info("%d of %d wheels on disk, %d to download", len(pins) - len(missing), len(pins), len(missing))
    if missing:
        download(missing, cache, python, platforms)
        for name, version in missing:
            found[name] = find_wheel([cache], name, version, tags)
            if found[name] is None:
                raise UsageError(f"pip download gave no usable wheel for {name}=={version}")
    return found


def trims_for(name: str, arch: str, keep_fa3: bool) -> list[tuple[str, str]]:
    table = TRIMS.get(name, {})
    trims = table.get("*", []) + table.get(arch, [])
    if name == "sglang-kernel" and not keep_fa3:
        trims = [FA3] + trims
    return trims


def repack(src: Path, dst: Path, drop: tuple[str, ...], strip: bool = False) -> tuple[list[str], list[str]]:
    """Copy a wheel uncompressed without the members under ``drop``, and with ``strip`` the debug
    information of its ELF libraries removed (``strip --strip-debug``: code and symbols stay).

    RECORD loses the rows of dropped members and gets new hashes and sizes for stripped ones.
    Returns (dropped, stripped) member names.
    """
    dropped, changed = [], {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        dropped = [i.filename for i in zin.infolist() if drop and i.filename.startswith(drop)]
        infos = [i for i in zin.infolist() if not (drop and i.filename.startswith(drop))]
        record = next(i for i in infos if i.filename.endswith(".dist-info/RECORD"))
        for info in infos:
            if info is record:
                continue
            data = zin.read(info)
            if strip and re.search(r"\.so(\.|$)", info.filename) and data[:4] == b"\x7fELF":
                stripped = _strip_debug(data)
                if len(stripped) < len(data):
                    data = changed[info.filename] = stripped
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
        data = zin.read(record)
        if dropped or changed:
            data = _rewrite_record(data, drop, changed)
        record.compress_type = zipfile.ZIP_STORED
        zout.writestr(record, data)
    return dropped, sorted(changed)


def _strip_debug(data: bytes) -> bytes:
    if shutil.which("strip") is None:
        raise UsageError("'strip' (GNU binutils) not found: install binutils or pass --no-strip")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.so"
        path.write_bytes(data)
        result = subprocess.run(["strip", "--strip-debug", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise UsageError(f"strip --strip-debug failed: {result.stderr.strip()}")
        return path.read_bytes()


def _rewrite_record(data: bytes, drop: tuple[str, ...], changed: dict[str, bytes]) -> bytes:
    rows = []
    for row in csv.reader(io.StringIO(data.decode())):
        if not row or (drop and row[0].startswith(drop)):
            continue
        if row[0] in changed:
            digest = base64.urlsafe_b64encode(hashlib.sha256(changed[row[0]]).digest()).rstrip(b"=").decode()
            row = [row[0], f"sha256={digest}", str(len(changed[row[0]]))]
        rows.append(row)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def pack(files: list[Path], out: Path, part_size: int, preset: int) -> list[dict]:
    """One ``tar.xz`` of ``files`` (flat, in this order, mtime 0) split into parts; [{name, size, sha256}]."""
    total = sum(path.stat().st_size for path in files)
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tar.xz") as tmp, \
            progress.bar(total=total, unit="B", unit_scale=True, desc="xz") as bar:
        with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
            for path in files:
                info = tar.gettarinfo(str(path), arcname=path.name)
                info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
                bar.update(info.size)
        tmp.flush()
        tmp.seek(0)
        parts, index = [], 0
        while block := tmp.read(part_size):
            part = out / f"{ARCHIVE}.{index:03d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    return parts


def build_bundle(out, sglang_version: str, python: str, arch: str, part_size: int, *,
                 wheelhouses=(), cache=None, glibc: str = "2.39", keep_fa3: bool = False, strip: bool = True,
                 preset: int = 9, pins=None) -> dict:
    """Write the bundle into ``out`` (new or empty); returns the manifest it wrote."""
    if arch not in ARCHES:
        raise UsageError(f"--arch {arch}: no trim table for it (known: {', '.join(ARCHES)})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty")
    if pins is None:
        pins = read_pins(pins_file(sglang_version))
    platforms = manylinux_platforms(glibc)
    cache = Path(cache) if cache else Path(".cache") / "gpu-wheels"  # under the working directory
    wheels = resolve_wheels(pins, wheelhouses, cache, python, platforms)
    with staged_dir(out) as target:  # Ctrl-C leaves no half-written bundle
        manifest = _write_bundle(target, pins, wheels, sglang_version, python, arch, part_size, keep_fa3, strip,
                                 preset, platforms)
    return manifest


def _write_bundle(out: Path, pins, wheels, sglang_version, python, arch, part_size, keep_fa3, strip, preset,
                  platforms) -> dict:
    entries = []
    with tempfile.TemporaryDirectory(dir=out) as staging:
        repacked = []
        for name, version in sorted(pins, key=lambda pin: (NEIGHBOURS.get(pin[0], pin[0]), pin[0])):
            src = wheels[name]
            trims = trims_for(name, arch, keep_fa3)
            dst = Path(staging) / src.name
            dropped, stripped = repack(src, dst, tuple(prefix for prefix, _ in trims), strip)
            _check_trims(src.name, trims, dropped)
            repacked.append(dst)
            entries.append({"package": name, "version": version, "wheel": src.name, "sha256": sha256_file(dst),
                            "size": dst.stat().st_size, "source_size": src.stat().st_size,
                            "trims": [{"prefix": p, "why": why} for p, why in trims], "debug_stripped": stripped})
            log.info("%s %s: %.1f MiB stored (%d files trimmed, %d stripped)", name, version,
                     dst.stat().st_size / 2**20, len(dropped), len(stripped))
        log.info("compressing %d wheels (xz preset %d)", len(repacked), preset)
        parts = pack(repacked, out, part_size, preset)
    manifest = {"format": "indexcache-gpu-bundle/v1", "sglang": sglang_version, "python": python,
                "arch": arch, "fa3": keep_fa3, "strip_debug": strip, "platforms": platforms, "archive": ARCHIVE,
                "part_size": part_size, "parts": parts, "wheels": entries, "smoke_imports": SMOKE_IMPORTS}
    atomic_write_json(out / "manifest.json", manifest)
    shutil.copyfile(gpu_bundle_install.__file__, out / "install.py")
    sums = [(p["sha256"], p["name"]) for p in parts]
    sums += [(sha256_file(out / n), n) for n in ("install.py", "manifest.json")]
    atomic_write_text(out / "SHA256SUMS", "".join(f"{h}  {n}\n" for h, n in sums))
    return manifest


def _check_trims(wheel: str, trims, dropped: list[str]) -> None:
    """A trim that matches nothing means the wheel's layout changed: say so rather than ship it."""
    for prefix, _ in trims:
        if not any(name.startswith(prefix) for name in dropped):
            raise UsageError(f"{wheel}: trim {prefix!r} matches no file (has the wheel's layout changed?)")
