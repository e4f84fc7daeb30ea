"""Install an indexcache GPU bundle on an air-gapped host (standard library only).

Written into every bundle as ``install.py`` by ``indexcache gpu-bundle``:

    python3 BUNDLE/install.py --target DIR [--smoke | --smoke-modules a,b]

Checks every part's size and SHA-256 against ``manifest.json``, joins and unpacks the ``tar.xz``,
checks every wheel's SHA-256, then ``python3 -m pip install --no-index --no-deps --no-compile
--upgrade --target DIR`` all of them. ``--smoke`` then imports the manifest's modules (sglang,
sgl_kernel, deep_gemm, flashinfer, transformers: a GPU host only) with ``PYTHONPATH=DIR`` and
checks each came from DIR; ``--smoke-modules`` names other modules (e.g. pure-Python ones on a CPU
machine). Use the result with ``PYTHONPATH=DIR``. A missing or corrupted part, a bad wheel or a
failed step: one line on stderr, exit 2.
"""

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

_SMOKE = """
import importlib, os, sys
target = os.path.realpath(sys.argv[1])
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    where = os.path.realpath(getattr(module, "__file__", None) or "")
    if not where.startswith(target + os.sep):
        sys.exit(f"{name} was imported from {where or 'nowhere'}, not from {target}")
print("smoke: imported " + ", ".join(sys.argv[2:]) + " from " + target)
"""


class BundleError(Exception):
    """Something wrong with the bundle or the install: one line, exit 2."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_parts(bundle, manifest):
    """Every part present with the size and SHA-256 the manifest gives; returns their paths."""
    paths = []
    for part in manifest["parts"]:
        path = os.path.join(bundle, part["name"])
        if not os.path.isfile(path):
            raise BundleError(f"part {part['name']} is missing from {bundle}")
        if os.path.getsize(path) != part["size"] or sha256_file(path) != part["sha256"]:
            raise BundleError(f"part {part['name']} is corrupted (size or SHA-256 differs from manifest.json)")
        paths.append(path)
    return paths


class _Joined:
    """The parts read back to back as one file."""

    def __init__(self, paths):
        self._paths, self._file = list(paths), None

    def read(self, size=-1):
        while True:
            if self._file is None:
                if not self._paths:
                    return b""
                self._file = open(self._paths.pop(0), "rb")
            data = self._file.read(size)
            if data or size == 0:
                return data
            self._file.close()
            self._file = None


def unpack(paths, manifest, dest):
    """Unpack the joined parts into ``dest``; check the wheels against the manifest; return them."""
    try:
        with lzma.open(_Joined(paths)) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or os.path.basename(member.name) != member.name:
                    raise BundleError(f"unexpected member in the archive: {member.name}")
                with open(os.path.join(dest, member.name), "wb") as f:
                    shutil.copyfileobj(tar.extractfile(member), f)
    except (lzma.LZMAError, tarfile.TarError, EOFError) as exc:
        raise BundleError(f"the archive does not unpack: {exc}")
    wheels = []
    for entry in manifest["wheels"]:
        path = os.path.join(dest, entry["wheel"])
        if not os.path.isfile(path):
            raise BundleError(f"wheel {entry['wheel']} is missing from the archive")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"wheel {entry['wheel']} has the wrong SHA-256")
        wheels.append(path)
    return wheels


def _run(cmd, what, env=None):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr + result.stdout).strip().splitlines() or ["(no output)"]
        raise BundleError(f"{what} failed: {lines[-1]}")
    return result.stdout


def install(bundle, target, smoke_modules=None):
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    paths = check_parts(bundle, manifest)
    print(f"{len(paths)} parts checked; unpacking {len(manifest['wheels'])} wheels", flush=True)
    with tempfile.TemporaryDirectory() as work:
        wheels = unpack(paths, manifest, work)
        print(f"installing into {target}", flush=True)
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
              "--no-compile", "--upgrade", "--target", target] + wheels, "pip install")
    if smoke_modules:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        print(_run([sys.executable, "-c", _SMOKE, target] + smoke_modules, "smoke import", env=env).strip())
    print(f"done: use it with PYTHONPATH={target}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="directory to install the wheels into")
    parser.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)),
                        help="bundle directory (default: this script's)")
    smoke = parser.add_mutually_exclusive_group()
    smoke.add_argument("--smoke", action="store_true", help="import the manifest's modules (GPU host)")
    smoke.add_argument("--smoke-modules", metavar="A,B", help="import these modules instead")
    args = parser.parse_args(argv)
    try:
        modules = None
        if args.smoke_modules:
            modules = [m for m in args.smoke_modules.split(",") if m]
        elif args.smoke:
            with open(os.path.join(args.bundle, "manifest.json")) as f:
                modules = json.load(f)["smoke_imports"]
        install(args.bundle, os.path.abspath(args.target), modules)
    except (BundleError, OSError, ValueError, KeyError) as exc:
        print(f"install.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
