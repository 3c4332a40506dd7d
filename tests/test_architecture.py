"""The layout's rules, checked on the source: imports point one way (no cycles between the
project's modules), model.py imports nothing of the project, and the CPU path imports no Triton."""
from __future__ import annotations

import ast
from pathlib import Path

from fixtures import ROOT

PACKAGES = ("teal_kernels", "teal")


def project_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def imports_of(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports; a package's modules count as the package."""
    mods = project_modules()
    unit = lambda name: name.split(".")[0]  # noqa: E731
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {unit(m) for m in imports_of(path) if unit(m) in {unit(n) for n in mods}}
        edges.setdefault(unit(name), set()).update(deps - {unit(name)})
    return edges


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert {"model", "linear", "checkpoint", "teal_kernels", "teal"} <= set(edges)


def test_model_imports_nothing_of_the_project_and_the_cpu_path_no_triton():
    mods = project_modules()
    assert not {m.split(".")[0] for m in imports_of(mods["model"])} & {n.split(".")[0] for n in mods}
    for name in ("teal_kernels.reference", "teal_kernels.ops", "teal_kernels", "linear"):
        assert not any(m.split(".")[0] == "triton" for m in imports_of(mods[name])), name
