"""Packaging: kernels/ and calibration/ are reachable only as sglang_indexcache.* subpackages; the
wheel carries the patch series, the embedded model and the GPU pins and works without the checkout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SERIES_FILE = Path(__file__).resolve().parents[1] / "patches" / "sglang-0.5.23" / "series"
SERIES = [line for line in SERIES_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_no_top_level_kernels_or_calibration(tmp_path):
    code = (
        "import importlib.util, sglang_indexcache.kernels, sglang_indexcache.calibration\n"
        "print(importlib.util.find_spec('calibration'), "
        "getattr(importlib.util.find_spec('kernels'), 'origin', None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    calibration, kernels = out.stdout.split()
    assert calibration == "None"
    # SGLang's own dependency may provide a top-level `kernels`; ours must never be it.
    assert kernels == "None" or "sglang_indexcache" not in kernels and "/kernels/__init__.py" not in kernels


def test_console_script_installed():
    import shutil
    from pathlib import Path
    script = Path(sys.executable).parent / "indexcache"
    assert script.exists() or shutil.which("indexcache")


# ---------------------------------------------------------------- the installed wheel ------------------

REPO = Path(__file__).resolve().parents[1]


def _checkout_copy(dest):
    """The files git would commit (tracked, and new ones not ignored), copied: the wheel is built
    from them, not from build/ leftovers of the working tree."""
    import tarfile

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    dest.mkdir()
    with tarfile.open(dest / "src.tar", "w") as tar:
        for name in filter(None, listed):
            if (REPO / name.decode()).is_file():
                tar.add(REPO / name.decode(), arcname=name.decode())
    with tarfile.open(dest / "src.tar") as tar:
        tar.extractall(dest, filter="data")
    (dest / "src.tar").unlink()
    return dest


def _venv_with_wheel(tmp_path):
    """A fresh virtual environment with the wheel installed (not editable). It sees this
    environment's packages (torch, transformers, ...) through a .pth after its own site-packages, so
    nothing is downloaded; the checkout itself is on none of its paths."""
    import os
    import sysconfig

    src = _checkout_copy(tmp_path / "src")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sglang_indexcache-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.rstrip("/").endswith("site-packages") and os.path.isdir(p)]
    ours.append(sysconfig.get_paths()["purelib"])
    (venv.joinpath(site) / "zz_environment.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                              "--ignore-installed", "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv, wheel


@pytest.mark.sglang
def test_installed_wheel_runs_without_the_checkout(tmp_path):
    """Build the wheel, install it in a fresh venv and use it from another folder: pattern, validate on
    the embedded model, apply/check/revert on the real SGLang 0.5.23 wheel, serve --dry-run against
    the patched tree, a short eval. Under two minutes on 2 busy cores."""
    import hashlib
    import os
    import zipfile

    from sglang_support import trees as sgl

    venv, wheel = _venv_with_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("sglang_indexcache/data/patches/sglang-version",
                   "sglang_indexcache/data/patches/sglang-0.5.23/series",
                   "sglang_indexcache/data/models/tiny-glm-dsa/model.safetensors",
                   "sglang_indexcache/data/models/tiny-glm-dsa/data/evaluation.txt",
                   "sglang_indexcache/data/requirements/gpu-sglang-0.5.17.txt",
                   "sglang_indexcache/kernels/__init__.py", "sglang_indexcache/calibration/__init__.py"):
        assert needed in names, needed
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def indexcache(*args, extra_path=None):
        run_env = dict(env, PYTHONPATH=str(extra_path)) if extra_path else env
        proc = subprocess.run([str(venv / "bin" / "indexcache"), *map(str, args)], cwd=work, env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        return proc.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import sglang_indexcache as p; print(p.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where
    assert indexcache("pattern", "--every", "4", "--layers", "8") == "FSSSFSSS\n"
    assert "valid for GlmMoeDsaForCausalLM (12 DSA layers)" in indexcache("validate", "every-4", "--model", "tiny-glm-dsa")

    release = "0.5.23"
    members = {"sglang/__init__.py", "sglang/_version.py", "sglang/version.py"}
    members |= {f"sglang/{m}" for p in (REPO / "patches" / f"sglang-{release}").glob("*.patch")
                for m in re.findall(r"^diff --git a/python/sglang/(\S+) ", p.read_text(), re.M)}
    tree = sgl.unpack(sgl.wheel(release), tmp_path / "site", members)

    def digest():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tree.rglob("*.py"))}

    before = digest()
    assert "applies cleanly" in indexcache("check-patches", tree)
    assert indexcache("apply-patches", tree).startswith(f"applied {len(SERIES)} patches")
    assert f"(SGLang {release}): applied" in indexcache("check-patches", tree)
    pattern = work / "p.json"
    subprocess.run([str(venv / "bin" / "python"), "-c",
                    "import sys; from sglang_indexcache import model_info, pattern_file, resources as r;"
                    " pattern_file.write(sys.argv[1], pattern_file.make_document('FSSSFSSSFSSS',"
                    " model_info.load_model_info(r.embedded_model())))", str(pattern)],
                   cwd=work, env=env, check=True)
    launch = indexcache("serve", "--model", "tiny-glm-dsa", "--pattern-file", pattern, "--dry-run",
                        "--", "--port", "30001", extra_path=tree)
    assert "-m sglang.launch_server --model-path" in launch and "--index-cache-pattern-file" in launch
    assert str(venv) in launch and "--port 30001" in launch  # the embedded model's installed path
    assert indexcache("revert-patches", tree).startswith(f"reverted {len(SERIES)} patches")
    assert digest() == before

    text = (REPO / "models" / "tiny-glm-dsa" / "data" / "evaluation.txt").read_text()[:6000]
    (work / "eval.txt").write_text(text)
    result = json.loads(indexcache("eval", "--model", "tiny-glm-dsa", "--data", "eval.txt", "--pattern", "all-F",
                                   "--pattern", "every-4", "--seq-len", "128", "--max-tokens", "256",
                                   "--batch-size", "2", "--threads", "1", "--json", "--quiet"))
    assert [r["pattern"] for r in result["results"]] == ["F" * 12, "FSSSFSSSFSSS"]
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in result["results"])
    assert sorted(p.name for p in work.iterdir()) == ["eval.txt", "p.json"]  # nothing else written here
