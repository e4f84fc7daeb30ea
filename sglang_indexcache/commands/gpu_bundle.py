"""Build an offline bundle of the wheels one SGLang release needs on an air-gapped GPU host.

Downloads (or reuses from --wheelhouse) the exact wheels of requirements/gpu-sglang-VERSION.txt for
the host's Python and manylinux x86_64, trims what --arch does not need, and writes to --out: the
wheels uncompressed in one tar.xz split into parts of at most --part-size, manifest.json (package,
version, SHA-256 and trims of each wheel; part sizes and SHA-256), SHA256SUMS and install.py, the
installer the host runs: ``python3 OUT/install.py --target DIR [--smoke]`` (docs/gpu.md).
"""

from __future__ import annotations

from .. import gpu_bundle


def add_arguments(parser):
    parser.add_argument("--sglang", required=True, metavar="VERSION", help="SGLang release (a pinned list must exist)")
    parser.add_argument("--python", required=True, metavar="3.N", help="the GPU host's Python version")
    parser.add_argument("--arch", required=True, choices=gpu_bundle.ARCHES, help="the GPU host's architecture")
    parser.add_argument("--part-size", default="40MiB", help="largest part (default 40MiB)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty directory for the bundle")
    parser.add_argument("--wheelhouse", action="append", default=[], metavar="DIR",
                        help="directory of already-downloaded wheels to reuse (repeatable; only read)")
    parser.add_argument("--cache", metavar="DIR", help="where missing wheels are downloaded (default .cache/gpu-wheels under the working directory)")
    parser.add_argument("--glibc", default="2.39", help="the host's glibc: manylinux tags up to it are accepted")
    parser.add_argument("--keep-fa3", action="store_true", help="keep sglang-kernel's FA3 library (+1.1 GB unpacked)")
    parser.add_argument("--no-strip", action="store_true",
                        help="keep the debug information of ELF libraries (default: strip --strip-debug)")
    parser.add_argument("--xz-preset", type=int, default=9, choices=range(10), metavar="0-9", help="default 9")


def run(args) -> int:
    from pathlib import Path

    from .options import check_output

    from ..errors import UsageError

    for folder in args.wheelhouse:
        if not Path(folder).is_dir():
            raise UsageError(f"--wheelhouse {folder} " + ("is a file, not a folder of wheels" if Path(folder).exists()
                                                          else "does not exist"))
    check_output("--out", args.out, "dir", inputs=args.wheelhouse)
    check_output("--cache", args.cache or Path(".cache") / "gpu-wheels", "dir", resume=True, inputs=args.wheelhouse)
    manifest = gpu_bundle.build_bundle(
        args.out, args.sglang, args.python, args.arch, gpu_bundle.parse_size(args.part_size),
        wheelhouses=args.wheelhouse, cache=args.cache, glibc=args.glibc, keep_fa3=args.keep_fa3, strip=not args.no_strip,
        preset=args.xz_preset)
    total = sum(part["size"] for part in manifest["parts"])
    print(f"{args.out}: {len(manifest['wheels'])} wheels in {len(manifest['parts'])} parts, "
          f"{total / 2**20:.1f} MiB ({total} bytes); install with python3 {args.out}/install.py --target DIR")
    return 0
