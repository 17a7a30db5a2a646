"""The package's structure: an import graph without cycles, and the toy world plugged in only by name."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "gigavideo"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every gigavideo module a file imports, at the top or inside a function."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules} - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and not cycles_of(graph), cycles_of(graph)


CONCERNS = ("rundir", "models", "prompts", "judges", "train", "eval", "tiny", "toy")


def concern(module: str) -> str:
    """gigavideo.judges.inputs -> judges; a module of the spine (gigavideo.config) is its own concern."""
    return module.split(".")[1] if module.count(".") else module


def test_the_concerns_are_subpackages_that_depend_on_each_other_without_a_cycle():
    graph = import_graph()
    by_concern: dict[str, set[str]] = {}
    for module, deps in graph.items():
        by_concern.setdefault(concern(module), set()).update(concern(d) for d in deps if concern(d) != concern(module))
    assert set(CONCERNS) <= {concern(m) for m in graph if m.count(".") >= 2}, "a concern is not a subpackage"
    spine = sorted(c for c in by_concern if c not in CONCERNS and c != "gigavideo")
    assert len(spine) <= 10, f"the spine keeps growing: {spine}"
    assert not cycles_of(by_concern), cycles_of(by_concern)


def test_no_module_outside_the_toy_package_imports_it():
    graph = import_graph()
    outside = {m: deps for m, deps in graph.items() if not m.startswith("gigavideo.toy")}
    scripts = [*REPO.glob("stage*/*.py"), *REPO.glob("eval/*.py"), *REPO.glob("scripts/*.py")]
    importers = [m for m, deps in outside.items() if any(d.startswith("gigavideo.toy") for d in deps)]
    importers += [str(p) for p in scripts if any(d.startswith("gigavideo.toy") for d in imports_of(p))]
    assert any(m.startswith("gigavideo.toy") for m in graph) and not importers, importers


def test_stage_scripts_are_thin_and_no_function_is_long():
    """A script is its CLI and the paper's steps as calls (under 150 lines); no function over 60 lines anywhere."""
    scripts = [*REPO.glob("stage*/*.py"), *REPO.glob("eval/*.py"), *REPO.glob("scripts/*.py")]
    long_scripts = {str(p.relative_to(REPO)): n for p in scripts if (n := len(p.read_text().splitlines())) >= 150}
    long_functions = {
        f"{path.relative_to(REPO)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in [*PACKAGE.rglob("*.py"), *scripts]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    }
    assert len(scripts) >= 9 and not long_scripts and not long_functions, (long_scripts, long_functions)
