"""The layering rules of docs/index.md ("Layering"), checked on the package's import graph.

Every module of the package (``sglang_indexcache/``, ``kernels/`` as ``sglang_indexcache.kernels``,
``calibration/`` as ``sglang_indexcache.calibration``) is parsed with ``ast``; no module is imported.
Each import statement is resolved to the module it names (``from X import y`` names ``X.y`` when that
is a module of ours, else ``X``; relative imports are resolved against the file's package). An
import counts wherever it stands (module level or inside a function), except inside an
``if __name__ == "__main__":`` block: that is a command-line entry point, not library code. The
cycle rule looks at module-level imports only (those that run when the module is imported);
an import inside a function runs when the function is called, after every module has loaded.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sglang_indexcache"
SOURCES = {PACKAGE: ROOT / "sglang_indexcache", f"{PACKAGE}.kernels": ROOT / "kernels",
           f"{PACKAGE}.calibration": ROOT / "calibration"}

# The rules, word for word as docs/index.md states them (test_docs_state_the_same_rules).
RULES = {
    "pattern": "`sglang_indexcache.pattern` imports no torch and nothing of ours but `sglang_indexcache.errors`.",
    "kernels": "`sglang_indexcache.kernels` imports nothing of ours outside `sglang_indexcache.kernels`.",
    "overlay": ("`sglang_indexcache.sglang_overlay` imports neither `calibration`, `training` nor `bench`;"
                " of the kernels only what runs in the server (never `kernels.testing`)."),
    "cli": ("No library module imports the command line (`sglang_indexcache.commands`, `sglang_indexcache.cli`);"
            " only `cli.py`, `__main__.py` and `commands/` may."),
    "cycles": "No cycle between modules through module-level imports.",
}


def _module_name(path: Path) -> str:
    for prefix, folder in SOURCES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == PACKAGE and parts[0] in ("kernels", "calibration"):  # not a source of the package
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((prefix, *parts))
    raise ValueError(path)


def _files() -> dict[str, Path]:
    files = {}
    for folder in SOURCES.values():
        for path in sorted(folder.rglob("*.py")):
            if "data" not in path.relative_to(folder).parts[:1]:
                files[_module_name(path)] = path
    return files


FILES = _files()


def _is_main_block(node) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _imports(module: str, path: Path):
    """``(target, line, module_level)`` of every import of ``path`` outside ``__main__`` blocks;
    ``target`` is a dotted module name (ours resolved to the module, others as written)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, module_level: bool):
        for child in ast.iter_child_nodes(node):
            if _is_main_block(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, module_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module != "__future__":
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in FILES else base, child.lineno, module_level))
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


GRAPH = {module: _imports(module, path) for module, path in FILES.items()}


def _ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _where(module: str, line: int) -> str:
    return f"{FILES[module].relative_to(ROOT)}:{line}"


def test_the_graph_covers_the_package():
    assert {"sglang_indexcache.pattern", "sglang_indexcache.kernels.topk", "sglang_indexcache.calibration.run",
            "sglang_indexcache.sglang_overlay.settings", "sglang_indexcache.commands.bench"} <= set(FILES)
    targets = {t for imports in GRAPH.values() for t, _, _ in imports if _ours(t)}
    unknown = sorted(t for t in targets if t not in FILES)
    assert not unknown, f"imports of modules that do not exist: {unknown}"


def test_pattern_imports_no_torch_and_only_errors():
    module = "sglang_indexcache.pattern"
    bad = [f"{_where(module, line)}: {target}" for target, line, _ in GRAPH[module]
           if _under(target, "torch") or (_ours(target) and target != "sglang_indexcache.errors")]
    assert not bad, RULES["pattern"] + "\n" + "\n".join(bad)


def test_kernels_import_nothing_of_ours_outside_kernels():
    bad = [f"{_where(m, line)}: {target}" for m, imports in GRAPH.items() if _under(m, "sglang_indexcache.kernels")
           for target, line, _ in imports if _ours(target) and not _under(target, "sglang_indexcache.kernels")]
    assert not bad, RULES["kernels"] + "\n" + "\n".join(bad)


def test_overlay_imports_no_calibration_training_bench_or_test_helpers():
    banned = [f"sglang_indexcache.{name}" for name in ("calibration", "training", "bench", "kernels.testing")]
    bad = [f"{_where(m, line)}: {target}" for m, imports in GRAPH.items()
           if _under(m, "sglang_indexcache.sglang_overlay") for target, line, _ in imports
           if any(_under(target, b) for b in banned)]
    assert not bad, RULES["overlay"] + "\n" + "\n".join(bad)


def test_library_never_imports_the_command_line():
    cli = ("sglang_indexcache.commands", "sglang_indexcache.cli")
    entry = ("sglang_indexcache.cli", "sglang_indexcache.__main__", "sglang_indexcache.commands")
    bad = [f"{_where(m, line)}: {target}" for m, imports in GRAPH.items() if not any(_under(m, e) for e in entry)
           for target, line, _ in imports if any(_under(target, c) for c in cli)]
    assert not bad, RULES["cli"] + "\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or of one importing itself (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_no_cycle_through_module_level_imports():
    edges = {m: {t for t, _, level in imports if level and t in FILES and t != m} for m, imports in GRAPH.items()}
    cycles = _cycles(edges)
    assert not cycles, RULES["cycles"] + "\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("rule", list(RULES))
def test_docs_state_the_same_rules(rule):
    text = (ROOT / "docs" / "index.md").read_text()
    section = re.search(r"^## Layering\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/index.md has no '## Layering' section"
    assert RULES[rule] in " ".join(section.group(1).split()), f"docs/index.md's Layering does not state: {RULES[rule]}"
