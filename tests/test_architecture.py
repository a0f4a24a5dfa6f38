"""docs/architecture.md stays true to the code, and the package's imports have no cycle.

The import graph is read from the source with `ast`. Every import of a package
module counts, wherever it is: at the top of a file, inside a function, or
under ``if TYPE_CHECKING:``. The tests check that:

- the graph has no cycle (a failure names one, ``a -> b -> a``);
- the doc's module table lists exactly the package's modules;
- every import goes from a higher layer of that table to a strictly lower one;
- the doc's import listing is the real graph, edge for edge.

``python tests/test_architecture.py`` prints the layers and the import listing
computed from the code, ready to paste into the doc.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "shortgpt_hf"
DOC = ROOT / "docs" / "architecture.md"
LISTING_HEADING = "## Who imports whom"

Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    """``config``, ``recovery.linear``; a package's init as ``__init__`` or ``recovery.__init__``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def module_for(parts: list[str]) -> str | None:
    """The package module that dotted ``parts`` (relative to the package root) name, or None."""
    where = PACKAGE.joinpath(*parts)
    if parts and where.with_suffix(".py").is_file():
        return ".".join(parts)
    if (where / "__init__.py").is_file():
        return ".".join([*parts, "__init__"])
    return None


def imported(node: ast.Import | ast.ImportFrom, package: list[str]) -> list[str | list[str]]:
    """What one import statement names inside the package: a module name, or (when it names
    nothing that exists) the dotted parts it tried, for the caller to report."""
    found: list[str | list[str]] = []

    def add(parts: list[str]) -> None:
        found.append(module_for(parts) or parts)

    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE.name:
                add(parts[1:])
        return found
    if node.level:
        if node.level - 1 > len(package):
            return [["." * node.level + (node.module or "")]]
        base = package[: len(package) - (node.level - 1)]
    elif node.module and node.module.split(".")[0] == PACKAGE.name:
        base = []
    else:
        return found
    target = base + [p for p in (node.module or "").split(".") if p]
    if not node.level:
        target = target[1:]  # drop the package's own name
    for alias in node.names:
        # ``from .pkg import submodule`` imports the submodule; ``from .x import name`` imports x
        sub = module_for([*target, alias.name]) if alias.name != "*" else None
        if sub is not None:
            found.append(sub)
        else:
            add(target)
    return found


def imports_its_package(node: ast.AST) -> bool:
    """``pkgutil.iter_modules(__path__)``: a package's init that imports every module beside it
    by name (as ``recovery`` does, so that a new method's file needs no import line)."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, (ast.Attribute, ast.Name))
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "iter_modules"
        and any(isinstance(a, ast.Name) and a.id == "__path__" for a in node.args)
    )


def import_graph() -> Graph:
    """Per package module, the package modules it imports anywhere in its file."""
    graph: Graph = {}
    unresolved = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, package):
                    if isinstance(target, str):
                        edges.add(target)
                    else:
                        unresolved.append(f"{name}:{node.lineno} {'.'.join(target)}")
            elif imports_its_package(node):
                beside = [*path.parent.glob("*.py"), *path.parent.glob("*/__init__.py")]
                edges |= {module_name(p) for p in beside} - {name}
        graph[name] = edges
    assert not unresolved, f"imports of package modules that do not exist: {unresolved}"
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts (``[a, b, a]``), or None.

    Depth-first search with three colours: a node is white before it is reached,
    grey while its descendants are searched, black after. An edge to a grey node
    closes a cycle, made of the grey path from that node to here."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for start in sorted(graph):
        if colour[start] != white:
            continue
        colour[start] = grey
        path = [start]
        stack = [iter(sorted(graph[start]))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                colour[path.pop()] = black
                stack.pop()
            elif colour.get(target, black) == grey:
                return path[path.index(target) :] + [target]
            elif colour.get(target) == white:
                colour[target] = grey
                path.append(target)
                stack.append(iter(sorted(graph[target])))
    return None


def layers_of(graph: Graph) -> dict[str, int]:
    """Each module's layer: the longest import path from it down to a module that imports
    nothing (0). Every import then goes strictly down. ``graph`` must have no cycle."""
    layer: dict[str, int] = {}

    def visit(module: str) -> int:
        if module not in layer:
            layer[module] = 1 + max((visit(t) for t in graph[module]), default=-1)
        return layer[module]

    for module in graph:
        visit(module)
    return layer


def documented_layers(doc: str) -> dict[str, int]:
    """The module table: ``| `module` | layer | owns |``."""
    rows = re.findall(r"^\| `([\w.]+)` \| (\d+) \|", doc, re.M)
    names = [m for m, _ in rows]
    assert len(names) == len(set(names)), "a module appears twice in the table of docs/architecture.md"
    return {m: int(n) for m, n in rows}


def documented_graph(doc: str) -> Graph:
    """The import listing: one item per module, ``- `a` → `b`, `c``` or ``- `a` → nothing``."""
    assert LISTING_HEADING in doc, f"docs/architecture.md has no {LISTING_HEADING!r} section"
    section = doc.split(LISTING_HEADING, 1)[1].split("\n## ", 1)[0]
    graph: Graph = {}
    for item in re.split(r"^- ", section, flags=re.M)[1:]:
        text = " ".join(item.split())  # an item may wrap onto indented lines
        match = re.match(r"`([\w.]+)` → (.*)$", text)
        assert match, f"not an import line in {LISTING_HEADING!r}: {text!r}"
        module, targets = match.groups()
        assert module not in graph, f"{module} is listed twice in {LISTING_HEADING!r}"
        graph[module] = set(re.findall(r"`([\w.]+)`", targets))
    return graph


def listing(graph: Graph, layer: dict[str, int]) -> str:
    """The import listing for the doc, in table order."""
    lines = []
    for module in sorted(graph, key=lambda m: (layer[m], m)):
        targets = ", ".join(f"`{t}`" for t in sorted(graph[module], key=lambda m: (layer[m], m)))
        lines.append(textwrap.fill(f"- `{module}` → {targets or 'nothing'}", 80, subsequent_indent="  "))
    return "\n".join(lines)


def describe(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# -- the cycle finder itself ------------------------------------------------------------------------------


def test_find_cycle_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    assert all(b in graph[a] for a, b in pairwise(cycle)), "the path must follow the graph's edges"
    assert describe(cycle) == "a -> b -> c -> a"


def test_find_cycle_finds_a_cycle_reached_late_and_a_self_import():
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"e"}, "e": {"d"}}) == ["d", "e", "d"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_find_cycle_accepts_a_graph_without_one():
    # a diamond: two paths to the same module are not a cycle
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert find_cycle(graph) is None
    assert layers_of(graph) == {"a": 2, "b": 1, "c": 1, "d": 0}


def test_imports_are_read_in_every_form(tmp_path, monkeypatch):
    package = tmp_path / "shortgpt_hf"
    (package / "sub" / "deeper").mkdir(parents=True)
    files = {
        "__init__.py": "from . import a, sub\nfrom .sub import b\n",
        "a.py": (
            "from typing import TYPE_CHECKING\nimport shortgpt_hf.c\n"
            "if TYPE_CHECKING:\n    from .sub.b import X\n"
            "def f():\n    from shortgpt_hf.sub import thing\n"
        ),
        "c.py": "import os\nfrom shortgpt_hf import a\n",
        "sub/__init__.py": "import pkgutil\nfrom ..a import f\nfor m in pkgutil.iter_modules(__path__):\n    pass\n",
        "sub/b.py": "from .. import c\n",
        "sub/deeper/__init__.py": "",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert import_graph() == {
        "__init__": {"a", "sub.__init__", "sub.b"},
        "a": {"c", "sub.b", "sub.__init__"},
        "c": {"a"},
        "sub.__init__": {"a", "sub.b", "sub.deeper.__init__"},
        "sub.b": {"c"},
        "sub.deeper.__init__": set(),
    }
    assert describe(find_cycle(import_graph())) == "a -> c -> a"


def test_an_import_of_a_missing_module_is_reported(tmp_path, monkeypatch):
    package = tmp_path / "shortgpt_hf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .gone import thing\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(AssertionError, match="a:2 gone"):
        import_graph()


# -- the package and its doc ---------------------------------------------------------------------------------


def test_the_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"the package's imports have a cycle: {describe(cycle)}"


def test_the_table_lists_exactly_the_modules():
    listed, actual = set(documented_layers(DOC.read_text())), set(import_graph())
    assert listed == actual, (
        f"docs/architecture.md must list exactly the package's modules; "
        f"missing: {sorted(actual - listed)}, gone: {sorted(listed - actual)}"
    )


def test_every_import_goes_down_the_layers():
    graph = import_graph()
    layer = documented_layers(DOC.read_text())
    wrong = [
        f"{m} ({layer[m]}) -> {t} ({layer[t]})"
        for m in sorted(graph)
        for t in sorted(graph[m])
        if m in layer and t in layer and layer[t] >= layer[m]
    ]
    hint = "" if find_cycle(graph) else f"; layers that work (longest path to a leaf): {layers_of(graph)}"
    assert not wrong, f"imports that do not go to a strictly lower layer in docs/architecture.md: {wrong}{hint}"


def test_the_import_listing_is_the_real_graph():
    graph = import_graph()
    listed = documented_graph(DOC.read_text())
    differences = [
        f"{m}: the code imports {sorted(graph.get(m, set()))}, the doc lists {sorted(listed.get(m, set()))}"
        for m in sorted(set(graph) | set(listed))
        if graph.get(m) != listed.get(m)
    ]
    assert not differences, f"{LISTING_HEADING!r} in docs/architecture.md is out of date: {differences}"


def test_the_layers_are_the_longest_import_chains():
    """The doc defines a module's layer as its longest chain of imports down to a leaf; the table says so."""
    graph = import_graph()
    if find_cycle(graph) is None:
        assert documented_layers(DOC.read_text()) == layers_of(graph), "run: python tests/test_architecture.py --write"


def rewrite_doc(graph: Graph) -> None:
    """Renumber the doc's table and rewrite its import listing from the code (each row keeps its text)."""
    layer = layers_of(graph)
    doc = DOC.read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| \d+ \| (.*) \|$", doc, re.M))
    missing, gone = set(graph) - set(rows), set(rows) - set(graph)
    if missing or gone:
        raise SystemExit(f"describe the new modules in the table first; missing {sorted(missing)}, gone {sorted(gone)}")
    table = "\n".join(f"| `{m}` | {layer[m]} | {rows[m]} |" for m in sorted(graph, key=lambda m: (layer[m], m)))
    doc = re.sub(r"(\|---\|---\|---\|\n)(?:\| `.*\n)+", lambda found: found.group(1) + table + "\n", doc)
    head, rest = doc.split(LISTING_HEADING, 1)
    section, tail = rest.split("\n## ", 1)
    intro = section.split("\n- `", 1)[0].rstrip("\n")
    DOC.write_text(head + LISTING_HEADING + intro + "\n\n" + listing(graph, layer) + "\n\n## " + tail)


if __name__ == "__main__":
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        raise SystemExit(f"import cycle: {describe(cycle)}")
    if "--write" in sys.argv:
        rewrite_doc(graph)
    else:
        layer = layers_of(graph)
        for module in sorted(graph, key=lambda m: (layer[m], m)):
            print(f"{layer[module]:2d}  {module}")
        print()
        print(listing(graph, layer))
