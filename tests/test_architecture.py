"""The package's layering holds: imports run cli → lab → monitor/surgery → core, with no cycles
and no module reaching into another module's private helpers."""

from __future__ import annotations

import ast
from pathlib import Path

import deadrelu

PACKAGE = Path(deadrelu.__file__).parent

# Layer of each top-level part; a module may import only from its own part or from lower layers.
# monitor and surgery share a layer and do not import each other.
LAYERS = {"errors": 0, "_imports": 0, "core": 1, "monitor": 2, "surgery": 2, "integrations": 3, "lab": 3, "cli": 4}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every runtime import in a module, lazy ones too."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("deadrelu"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("deadrelu")]
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_follow_the_layers() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if name in ("deadrelu", "deadrelu.__main__"):
            continue  # the public face and the entry point may reach everything
        mine = _part(name)
        for target, _ in _imports(name, path, modules):
            theirs = _part(target)
            if not theirs or theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{name} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        name: {t for t, _ in _imports(name, path, modules) if t in modules and t != name}
        for name, path in modules.items()
        if name != "deadrelu"
    }
    for deps in graph.values():
        deps.discard("deadrelu")
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_helpers_imported_across_modules() -> None:
    modules = _modules()
    bad = [
        f"{name} imports {target}.{imported}"
        for name, path in modules.items()
        for target, imported in _imports(name, path, modules)
        if imported is not None and imported.startswith("_") and imported != "__version__" and target != name
    ]
    bad += [
        f"{name} imports private module {target}"
        for name, path in modules.items()
        for target, imported in _imports(name, path, modules)
        if imported is None and target.rsplit(".", 1)[-1].startswith("_") and target != "deadrelu._imports"
    ]
    assert not bad, "private helpers imported across modules:\n" + "\n".join(bad)


def test_no_function_over_100_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)


def test_test_files_have_unique_basenames() -> None:
    # The test folders are not packages, so pytest imports each file by its basename: two files
    # with one name make the second fail to collect (CI once failed on exactly this).
    tests = Path(__file__).parent
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test files share a basename: " + "; ".join(clashes)
