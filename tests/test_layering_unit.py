"""Package layering: no nfctl package imports one that imports it back, directly or through
others. A package is nfctl.<first component> (nfctl/validate.py is the package "validate").
Read from the source with ast, so imports inside functions and under TYPE_CHECKING count.

Run as a script (python -m tests.test_layering_unit) to print the package import graph."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

NFCTL = Path(__file__).resolve().parent.parent / "nfctl"
GENERATED = {"api"}  # protoc output: imports only itself and grpc

Graph = dict[str, dict[str, set[str]]]  # package -> imported package -> importing modules


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # "from nfctl import progress" imports the module nfctl.progress
            yield from (f"{target}.{alias.name}" for alias in node.names)


def package_of(module: str) -> str | None:
    """nfctl.x.y -> x; None for modules outside nfctl and for nfctl itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "nfctl" and len(parts) > 1 else None


def import_graph(root: Path) -> Graph:
    graph: Graph = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        source = package_of(module)
        if source is None or source in GENERATED:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = graph.setdefault(source, {})
        for target in _imported_modules(tree, module, path.name == "__init__.py"):
            imported = package_of(target)
            if imported is None or imported == source:
                continue
            if imported not in {p.stem for p in root.iterdir()}:
                continue  # "from nfctl.x import name" also yields nfctl.x.name: not a package
            edges.setdefault(imported, set()).add(module)
    return graph


def cycles(graph: Graph) -> list[frozenset[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(graph: Graph, component: frozenset[str]) -> str:
    lines = [" <-> ".join(sorted(component))]
    for source in sorted(component):
        for target in sorted(component & set(graph.get(source, {}))):
            modules = ", ".join(sorted(graph[source][target]))
            lines.append(f"  {source} -> {target} (in {modules})")
    return "\n".join(lines)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_no_package_imports_one_that_imports_it_back() -> None:
    graph = import_graph(NFCTL)
    found = cycles(graph)
    assert not found, "package cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_datapath_and_bpf_import_no_compiler() -> None:
    graph = import_graph(NFCTL)
    assert "compiler" not in graph["datapath"], graph["datapath"].get("compiler")
    assert "builder" not in graph["datapath"], graph["datapath"].get("builder")
    above = {"compiler", "datapath", "builder", "nftest", "agent", "controller", "cli"}
    assert not above & set(graph["bpf"]), {p: graph["bpf"][p] for p in above & set(graph["bpf"])}


def test_the_graph_sees_direct_relative_lazy_and_longer_cycles(tmp_path: Path) -> None:
    root = tmp_path / "nfctl"
    _write(
        root,
        {
            "__init__.py": "",
            "a/__init__.py": "from nfctl.b import thing\n",
            "b/__init__.py": "",
            "b/thing.py": "def f() -> None:\n    from ..a import x\n",  # lazy and relative
            "c/__init__.py": "from nfctl import d\n",
            "d.py": "import nfctl.e.deep\n",
            "e/__init__.py": "",
            "e/deep.py": "from nfctl.c import y\n",  # c -> d -> e -> c
            "f.py": "from nfctl.a import z\n",  # f only imports: no cycle
        },
    )
    graph = import_graph(root)
    assert graph["b"]["a"] == {"nfctl.b.thing"}
    assert set(cycles(graph)) == {frozenset({"a", "b"}), frozenset({"c", "d", "e"})}


if __name__ == "__main__":
    found = import_graph(NFCTL)
    for package in sorted(found):
        print(f"{package} -> {', '.join(sorted(found[package])) or '-'}")
    for component in cycles(found):
        print("CYCLE " + describe(found, component))
