"""The import graph of posttrain/, rewards/ and data_tools/ (installed as posttrain.rewards and
posttrain.data_tools), from the source alone: every `import` and `from ... import`, at module
level, inside functions and under TYPE_CHECKING. Prints modules, edges, import cycles (strongly
connected components of more than one module), the largest, and the imports from
posttrain.recipe up into modules outside it.

    python bench/import_graph.py [REPO] [--runtime]   # --runtime: leave TYPE_CHECKING imports out
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOTS = {"posttrain": "posttrain", "rewards": "posttrain.rewards", "data_tools": "posttrain.data_tools"}


def modules(repo: Path) -> dict[str, Path]:
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = list(path.relative_to(repo / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, known: set[str], runtime: bool) -> list[tuple[str, int, str]]:
    """(imported module, line, where) for each import of a known module; where is module | function | typing."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int, str]] = []

    def resolve(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, *([module] if module else [])])

    def target(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                here = "function" if where == "module" else where
            if isinstance(child, ast.If) and _type_checking(child):
                if runtime:
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]), where)
                    continue
                here = "typing"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    t = target(alias.name)
                    if t:
                        out.append((t, child.lineno, here))
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module, child.level)
                for alias in child.names:
                    t = target(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else target(base)
                    if t:
                        out.append((t, child.lineno, here))
            visit(child, here)

    visit(tree, "module")
    return [(t, line, where) for t, line, where in out if t != name]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    runtime = "--runtime" in sys.argv
    repo = Path(args[0] if args else ".").resolve()
    found = modules(repo)
    known = set(found)
    edges = {name: imports(name, path, known, runtime) for name, path in found.items()}
    graph = {name: {t for t, _, _ in found_edges} for name, found_edges in edges.items()}
    cycles = sorted((c for c in strongly_connected(graph) if len(c) > 1), key=len, reverse=True)
    n_edges = sum(len(v) for v in graph.values())
    local = sum(1 for v in edges.values() for _, _, w in v if w == "function")
    typing_ = sum(1 for v in edges.values() for _, _, w in v if w == "typing")
    print(f"repo: {repo}  ({'runtime imports only' if runtime else 'all imports, TYPE_CHECKING included'})")
    print(f"modules: {len(found)}")
    print(
        f"edges (module pairs): {n_edges}; import statements: function-local {local}, TYPE_CHECKING {typing_}"
    )
    print(f"cycles (SCCs > 1 module): {len(cycles)}; sizes {[len(c) for c in cycles]}")
    if cycles:
        print(f"largest cycle ({len(cycles[0])}): {', '.join(cycles[0])}")
        for c in cycles[1:]:
            print(f"other cycle ({len(c)}): {', '.join(c)}")
    up = [
        (name, t, line, where)
        for name, found_edges in edges.items()
        if name.startswith("posttrain.recipe")
        for t, line, where in found_edges
        if not t.startswith("posttrain.recipe") and t != "posttrain.errors"
    ]
    print(f"imports from posttrain.recipe up into code above it: {len(up)}")
    for name, t, line, where in sorted(up):
        print(f"  {name}:{line} -> {t} ({where})")


if __name__ == "__main__":
    main()
