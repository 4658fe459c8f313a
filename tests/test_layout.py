"""The package layout: no module imports itself back through others, every module imports, and the public names resolve."""

import ast
import importlib
import pkgutil
from pathlib import Path

import trl_sgpo


ROOT = Path(trl_sgpo.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package), for every module under ``trl_sgpo``."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ["trl_sgpo", *path.relative_to(ROOT).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports only type checkers follow)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time, at the top or inside functions."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found = {f"{target}.{a.name}" for a in node.names} | {target}
            elif isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            else:
                continue
            graph[name] |= {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a circle (strongly connected components of two or more)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_itself_back():
    graph = _import_graph()
    assert "trl_sgpo.cli_common" in graph["trl_sgpo.improve"]  # the graph sees function-level imports
    assert _cycles(graph) == []


def test_every_module_imports_and_every_public_name_resolves():
    for info in pkgutil.walk_packages(trl_sgpo.__path__, "trl_sgpo."):
        importlib.import_module(info.name)
    for package in ("trl_sgpo", "trl_sgpo.evaluation", "trl_sgpo.pipeline"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
