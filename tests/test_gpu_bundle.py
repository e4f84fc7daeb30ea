"""Offline GPU bundle: trimming with RECORD rewritten, parts round-trip, checksums, the installer.

Small fake wheels built here stand in for the real ones (no network); the trim table is the real one,
so the fakes carry the member paths of the real sglang-kernel and xgrammar wheels.
"""

import base64
import csv
import hashlib
import json
import ctypes
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from sglang_indexcache import gpu_bundle
from sglang_indexcache.errors import UsageError

KERNEL = "sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl"
KERNEL_FILES = {
    "sgl_kernel/__init__.py": b"KEPT = 'sm90'\n",
    "sgl_kernel/sm90/common_ops.abi3.so": os.urandom(3000),
    "sgl_kernel/flash_ops.abi3.so": os.urandom(5000),
    "sgl_kernel/sm100/common_ops.abi3.so": os.urandom(4000),
    "sgl_kernel/infllm_ops.cpython-310-x86_64-linux-gnu.so": os.urandom(2000),
}
XGRAMMAR = "xgrammar-0.2.1-py3-none-any.whl"
XGRAMMAR_FILES = {"xgrammar/__init__.py": b"", "xgrammar/lib/libxgrammar.a": os.urandom(3000)}
PLAIN = "plainpkg-1.0-py3-none-any.whl"
PLAIN_FILES = {"plainpkg/__init__.py": b"VALUE = 42\n", "plainpkg/data.bin": os.urandom(20000)}
PINS = [("plainpkg", "1.0"), ("sglang-kernel", "0.4.5"), ("xgrammar", "0.2.1")]


def _digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(folder, filename, files):
    """A minimal valid wheel: the files, METADATA, WHEEL and a RECORD hashing every member."""
    name, version = filename.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    tag = "-".join(filename[:-4].split("-")[2:])
    members = dict(files)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    record = "".join(f"{n},{_digest(d)},{len(d)}\n" for n, d in members.items()) + f"{info}/RECORD,,\n"
    members[f"{info}/RECORD"] = record.encode()
    with zipfile.ZipFile(folder / filename, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in members.items():
            z.writestr(member, data)
    return folder / filename


@pytest.fixture
def wheelhouse(tmp_path):
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    for filename, files in ((KERNEL, KERNEL_FILES), (XGRAMMAR, XGRAMMAR_FILES), (PLAIN, PLAIN_FILES)):
        write_wheel(folder, filename, files)
    return folder


def build(tmp_path, wheelhouse, part_size=1 << 20, out="bundle"):
    return gpu_bundle.build_bundle(tmp_path / out, "0.5.17", "3.12", "sm_90", part_size, wheelhouses=[wheelhouse],
                                   cache=tmp_path / "cache", pins=PINS, preset=1)


def install(bundle, target, *extra):
    return subprocess.run([sys.executable, str(bundle / "install.py"), "--target", str(target), *extra],
                          capture_output=True, text=True)


def assert_refused(result, match):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in lines[0], lines[0]


def test_trimmed_wheels_install_with_pip(tmp_path, wheelhouse):
    manifest = build(tmp_path, wheelhouse)
    kernel = next(w for w in manifest["wheels"] if w["package"] == "sglang-kernel")
    assert [t["prefix"] for t in kernel["trims"]] == [
        "sgl_kernel/flash_ops.abi3.so", "sgl_kernel/sm100/", "sgl_kernel/infllm_ops."]
    target = tmp_path / "site"
    result = install(tmp_path / "bundle", target, "--smoke-modules", "sgl_kernel,xgrammar,plainpkg")
    assert result.returncode == 0, result.stderr
    assert "smoke: imported sgl_kernel, xgrammar, plainpkg" in result.stdout
    assert (target / "sgl_kernel/sm90/common_ops.abi3.so").read_bytes() == KERNEL_FILES["sgl_kernel/sm90/common_ops.abi3.so"]
    assert not (target / "sgl_kernel/flash_ops.abi3.so").exists()
    assert not (target / "sgl_kernel/sm100").exists()
    assert not (target / "xgrammar/lib/libxgrammar.a").exists()
    assert (target / "plainpkg/data.bin").read_bytes() == PLAIN_FILES["plainpkg/data.bin"]
    # the installed RECORD names exactly the files on disk, each with its true hash
    for dist in ("sglang_kernel-0.4.5", "xgrammar-0.2.1", "plainpkg-1.0"):
        rows = list(csv.reader((target / f"{dist}.dist-info/RECORD").read_text().splitlines()))
        for path, digest, _ in rows:
            assert (target / path).is_file(), path
            if digest:
                assert digest == _digest((target / path).read_bytes()), path
    kernel_rows = (target / "sglang_kernel-0.4.5.dist-info/RECORD").read_text()
    assert "flash_ops" not in kernel_rows and "sm100" not in kernel_rows and "infllm" not in kernel_rows


def test_repacked_wheels_are_stored_and_record_filtered(tmp_path, wheelhouse):
    dst = tmp_path / "k.whl"
    dropped, stripped = gpu_bundle.repack(wheelhouse / KERNEL, dst, ("sgl_kernel/sm100/",), strip=True)
    assert stripped == []  # random bytes are not ELF
    assert dropped == ["sgl_kernel/sm100/common_ops.abi3.so"]
    with zipfile.ZipFile(dst) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        record = z.read("sglang_kernel-0.4.5.dist-info/RECORD").decode()
        assert "sm100" not in record and "flash_ops.abi3.so" in record


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("strip") is None, reason="needs a C compiler and strip")
def test_debug_info_stripped_and_library_still_loads(tmp_path, wheelhouse):
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    lib = tmp_path / "libanswer.so"
    subprocess.run(["cc", "-g3", "-O0", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    write_wheel(wheelhouse, PLAIN, dict(PLAIN_FILES, **{"plainpkg/libanswer.so": lib.read_bytes()}))
    manifest = build(tmp_path, wheelhouse)
    plain = next(w for w in manifest["wheels"] if w["package"] == "plainpkg")
    assert plain["debug_stripped"] == ["plainpkg/libanswer.so"]
    result = install(tmp_path / "bundle", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "site/plainpkg/libanswer.so"
    assert installed.stat().st_size < lib.stat().st_size
    assert ctypes.CDLL(str(installed)).answer() == 42
    rows = {r[0]: r for r in csv.reader((tmp_path / "site/plainpkg-1.0.dist-info/RECORD").read_text().splitlines())}
    assert rows["plainpkg/libanswer.so"][1:] == [_digest(installed.read_bytes()), str(installed.stat().st_size)]


def test_parts_split_and_join(tmp_path, wheelhouse):
    part_size = 4096  # the random payloads do not compress: several parts
    manifest = build(tmp_path, wheelhouse, part_size=part_size)
    sizes = [p["size"] for p in manifest["parts"]]
    assert len(sizes) > 3 and max(sizes) == part_size and all(s <= part_size for s in sizes)
    bundle = tmp_path / "bundle"
    assert sorted(f.name for f in bundle.iterdir()) == sorted(
        ["install.py", "manifest.json", "SHA256SUMS"] + [p["name"] for p in manifest["parts"]])
    assert sum(sizes) == sum((bundle / p["name"]).stat().st_size for p in manifest["parts"])
    sums = dict(line.split("  ")[::-1] for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert sums[manifest["parts"][0]["name"]] == hashlib.sha256((bundle / manifest["parts"][0]["name"]).read_bytes()).hexdigest()
    result = install(bundle, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site/plainpkg/data.bin").read_bytes() == PLAIN_FILES["plainpkg/data.bin"]


def test_bundle_is_reproducible(tmp_path, wheelhouse):
    first, second = build(tmp_path, wheelhouse, out="a"), build(tmp_path, wheelhouse, out="b")
    assert first["parts"] == second["parts"]


def test_corrupted_or_missing_part_refused(tmp_path, wheelhouse):
    manifest = build(tmp_path, wheelhouse, part_size=4096)
    bundle = tmp_path / "bundle"
    part = bundle / manifest["parts"][1]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    assert_refused(install(bundle, tmp_path / "site"), f"part {part.name} is corrupted")
    part.unlink()
    assert_refused(install(bundle, tmp_path / "site"), f"part {part.name} is missing")
    assert not (tmp_path / "site").exists()


def test_wheel_checksum_mismatch_refused(tmp_path, wheelhouse):
    build(tmp_path, wheelhouse)
    path = tmp_path / "bundle/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["wheels"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    assert_refused(install(tmp_path / "bundle", tmp_path / "site"), f"wheel {PLAIN} has the wrong SHA-256")


def test_smoke_import_from_elsewhere_refused(tmp_path, wheelhouse):
    build(tmp_path, wheelhouse)
    assert_refused(install(tmp_path / "bundle", tmp_path / "site", "--smoke-modules", "plainpkg,json"),
                   "json was imported from")


def test_trim_matching_nothing_refused(tmp_path, wheelhouse):
    files = {k: v for k, v in KERNEL_FILES.items() if "sm100" not in k}
    write_wheel(wheelhouse, KERNEL, files)
    with pytest.raises(UsageError, match="trim 'sgl_kernel/sm100/' matches no file"):
        build(tmp_path, wheelhouse)


def test_wheel_selection_by_tag(tmp_path):
    tags = gpu_bundle.accepted_tags("3.12", gpu_bundle.manylinux_platforms("2.39"))
    write_wheel(tmp_path, "fast-1.0-cp313-cp313-manylinux_2_17_x86_64.whl", {"fast/__init__.py": b""})
    write_wheel(tmp_path, "fast-1.0-cp312-cp312-manylinux_2_40_x86_64.whl", {"fast/__init__.py": b""})
    assert gpu_bundle.find_wheel([tmp_path], "fast", "1.0", tags) is None
    good = write_wheel(tmp_path, "fast-1.0-cp312-cp312-manylinux_2_39_x86_64.whl", {"fast/__init__.py": b""})
    assert gpu_bundle.find_wheel([tmp_path], "fast", "1.0", tags) == good
    assert gpu_bundle.find_wheel([tmp_path], "fast", "1.1", tags) is None


def test_pinned_list():
    pins = dict(gpu_bundle.read_pins(gpu_bundle.pins_file("0.5.17")))
    assert len(pins) == 47  # the 45 of SGLang's stack, and datasets + multiprocess for indexcache calibrate
    assert (pins["datasets"], pins["multiprocess"]) == ("5.2.0", "0.70.19")
    assert (pins["sglang"], pins["sglang-kernel"], pins["transformers"], pins["tokenizers"]) == (
        "0.5.17", "0.4.5", "5.12.1", "0.22.2")


@pytest.mark.parametrize("text, size", [("40MiB", 40 * 2**20), ("60MB", 60 * 10**6), ("4096", 4096)])
def test_parse_size(text, size):
    assert gpu_bundle.parse_size(text) == size


@pytest.mark.parametrize("args, match", [
    (["--part-size", "40 apples"], "not a size"),
    (["--sglang", "0.4.0"], "no pinned list for SGLang 0.4.0"),
    (["--python", "3"], "--python must be 3.N"),
])
def test_cli_errors(tmp_path, args, match):
    (tmp_path / "wheels").mkdir()
    base = {"--sglang": "0.5.17", "--python": "3.12", "--arch": "sm_90", "--out": str(tmp_path / "o"),
            "--wheelhouse": str(tmp_path / "wheels"), "--cache": str(tmp_path / "cache")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = [x for kv in base.items() for x in kv]
    result = subprocess.run([sys.executable, "-m", "sglang_indexcache", "gpu-bundle", *argv],
                            capture_output=True, text=True)
    assert_refused(result, match)
