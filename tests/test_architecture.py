"""The layering ARCHITECTURE.md describes, checked on the code: each stage imports only from
the stages below it (function-level imports included), and the document names every folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "bnctl"

#: stage -> the stages it may import from (itself included); the top-level modules are stages of their own
ALLOWED = {
    "errors": {"errors"},
    "_atomic": {"_atomic", "errors"},
    "_quiet": {"_quiet"},
    "_bulk": {"_bulk"},
    "models": {"models"},
    "core": {"core", "errors"},
    "io": {"_quiet", "io", "core", "errors", "_atomic"},
    "ops": {"_quiet", "_bulk", "ops", "io", "core", "errors"},
    "render": {"_quiet", "render", "ops", "core", "errors", "_atomic"},
    "audit": {"_quiet", "_bulk", "audit", "render", "ops", "io", "core", "errors"},
    "jobs": {"_quiet", "jobs", "audit", "ops", "io", "core", "errors", "_atomic"},
    "cli": {"_quiet", "cli", "jobs", "audit", "render", "ops", "io", "core", "errors", "_atomic", "__init__"},
    "__init__": {"__init__", "ops", "io", "core", "errors"},
    "__main__": {"cli"},
}


def _stage(module: str) -> str:
    """``bnctl.io.checkpoint`` -> ``io``; ``bnctl`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every bnctl module ``path`` imports, as absolute names (``from . import x`` gives ``pkg.x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bnctl":
                continue
            if node.module is None or target.count(".") == 0:
                found.update(f"{target}.{a.name}" for a in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "bnctl")
    return found


def test_each_stage_imports_only_from_the_stages_below_it():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = _stage(_module_name(path)) if _module_name(path) != "bnctl" else "__init__"
        if path.parent == PACKAGE and path.stem not in ("__init__", "__main__"):
            stage = path.stem
        for target in _imports(path):
            if target == "bnctl.__version__" or target == "bnctl":
                continue
            used = _stage(target)
            if used not in ALLOWED[stage]:
                broken.append(f"{path.relative_to(ROOT)} ({stage}) imports {target} ({used})")
    assert not broken, "\n".join(broken)


def test_architecture_md_names_every_folder_and_module_folder():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    folders = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__")
    missing = [f for f in folders if not re.search(rf"`{re.escape(f)}/`", text)]
    assert not missing, f"ARCHITECTURE.md does not describe: {missing}"
    for stage in ALLOWED:
        if (PACKAGE / stage).is_dir():
            assert f"`{stage}/`" in text


def test_no_module_is_over_400_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_no_import_circle_between_files():
    """No file imports, directly or through others, a file that imports it back (function-level
    imports included): each module can be read with only what is below it in mind."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {name: sorted(t for t in _imports(path) if t in modules and t not in (name, "bnctl")) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(edges[start])]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(step) == 1:
                circles.append(" -> ".join(path[path.index(step) :] + [step]))
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                stack.append(iter(edges[step]))
    assert not circles, "\n".join(circles)


def test_jobs_write_models_through_one_path():
    """Every job that writes a model hands an artifact to ``jobs/artifact.deliver``, which checks
    it and calls ``io/writers.save``: no job calls a saver itself."""
    savers = re.compile(r"_atomic\.write_bytes|torch\.save\(|jit\.save\(|export\.save\(|SerializeToString\(|writers\.save\(|save_file\(")
    calls = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((PACKAGE / "jobs").glob("*.py")) if p.name != "artifact.py" for i, line in enumerate(p.read_text().splitlines(), 1) if savers.search(line)]
    assert not calls, "\n".join(calls)
    assert "writers.save(" in (PACKAGE / "jobs" / "artifact.py").read_text()
