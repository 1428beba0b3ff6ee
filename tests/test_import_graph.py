"""The project's packages import each other without a cycle, and in the layers the design names.

The graph is read from the source (``ast``), so imports inside functions count too; only imports under
``if TYPE_CHECKING:`` are left out, because they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "datasets", "distill", "inference", "launch", "trainers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, each with the packages Python initialises on the way to it."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[: i + 1]) for i in range(len(parts)) if ".".join(parts[: i + 1]) in known)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    graph = {module_name(p): imported_modules(p, known) for p in files}
    for name in graph:
        graph[name].discard(name)
        if "." in name:  # importing a.b runs a/__init__.py first
            graph[name].discard(name.rsplit(".", 1)[0])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as a path of module names (empty if there is none)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("inference", {"trainers", "distill", "launch"}), ("datasets", {"trainers", "inference", "distill", "launch"})],
)
def test_layers(package, forbidden):
    graph = import_graph()
    bad = sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == package
        for dep in deps
        if dep.split(".")[0] in forbidden
    )
    assert not bad, f"{package} must not import {sorted(forbidden)}: {bad}"


MODULE_INTERNALS = {"_buffers", "_parameters", "_modules"}  # nn.Module's dicts: register_buffer / setattr instead


def private_torch_names(path: Path) -> list[str]:
    """``torch.x._y`` / ``nn.x._y`` attribute chains, ``from torch... import _x`` and nn.Module's internal dicts in
    ``path`` (dunders such as ``__version__`` are public;
    ``torch.ops.NS.name`` are operators registered under those names, not Python attributes)."""
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names = [*node.module.split(".")[1:], *(alias.name for alias in node.names)]
            if any(private(n) for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
            continue
        if isinstance(node, ast.Attribute) and node.attr in MODULE_INTERNALS:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr} (nn.Module's internal dict)")
            continue
        if not isinstance(node, ast.Attribute):
            continue
        chain = ast.unparse(node).split(".")
        if (
            chain[0] in ("torch", "nn")
            and chain[1] != "ops"
            and any(p.startswith("_") and not p.startswith("__") for p in chain[1:])
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {'.'.join(chain)}")
    return found


def test_no_private_torch_api():
    """A private torch name (``torch._C``, ``nn.modules.batchnorm._NormBase``) breaks on a release without notice."""
    found = sorted({hit for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") for hit in private_torch_names(p)})
    assert not found, found
