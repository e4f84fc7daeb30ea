"""Packaging: kernels/ and calibration/ are reachable only as sglang_indexcache.* subpackages."""

import subprocess
import sys


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
