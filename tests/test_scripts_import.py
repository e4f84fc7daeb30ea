"""Every module of scripts/ imports on a CPU machine, and every import statement in them (also those
inside functions, which run only on a GPU) names a module and attribute that exist (issue 24: the
comparison died on the GPU on an import of a module that had moved, which nothing on the CPU ran).

Modules of SGLang's GPU stack (DeepGEMM, sgl-kernel, FlashMLA) exist only on the GPU host and are
listed in ``GPU_ONLY``; a statement importing them is checked on the GPU side by the scripts' own
smoke tests (their stand-ins), not here."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
GPU_ONLY = {"deep_gemm", "sgl_kernel", "flash_mla"}


def script_modules() -> list[str]:
    """Dotted names, relative to scripts/, of every Python module there (packages included)."""
    names = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(SCRIPTS).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_statements() -> list[tuple[str, int, str, list[str]]]:
    """``(file, line, module, names)`` of every import statement in scripts/, nested ones included
    (relative imports resolved against the file's package)."""
    found = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        package = ".".join(path.relative_to(SCRIPTS).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            rel = str(path.relative_to(ROOT))
            if isinstance(node, ast.Import):
                found += [(rel, node.lineno, alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                    base = ".".join([p for p in up if p] + ([base] if base else []))
                found.append((rel, node.lineno, base, [a.name for a in node.names]))
    return found


_CHECK = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
bad = []
for mod in json.loads(sys.argv[2]):
    try:
        importlib.import_module(mod)
    except Exception as exc:
        bad.append(f"import {mod}: {type(exc).__name__}: {exc}")
for where, line, mod, names in json.loads(sys.argv[3]):
    try:
        m = importlib.import_module(mod)
        for name in names:
            if name != "*" and not hasattr(m, name):
                importlib.import_module(f"{mod}.{name}")
    except Exception as exc:
        bad.append(f"{where}:{line}: from {mod} import {', '.join(names)}: {type(exc).__name__}: {exc}")
print(json.dumps(bad))
"""


def test_every_script_module_and_import_statement_resolves():
    statements = [s for s in import_statements() if s[2].split(".")[0] not in GPU_ONLY]
    assert len(statements) > 50 and any(s[2] == "sglang_indexcache.bench.timing" for s in statements)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _CHECK, str(SCRIPTS), json.dumps(script_modules()),
                             json.dumps(statements)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    bad = json.loads(result.stdout.strip().splitlines()[-1])
    assert not bad, "\n".join(bad)


def test_a_moved_module_is_caught(tmp_path):
    """The check sees an import inside a function (what broke the comparison on the GPU)."""
    statements = [("x.py", 3, "sglang_indexcache.bench", ["indexer_variants"])]
    result = subprocess.run([sys.executable, "-c", _CHECK, str(SCRIPTS), "[]", json.dumps(statements)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    bad = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(bad) == 1 and "indexer_variants" in bad[0]
