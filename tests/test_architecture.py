"""docs/architecture.md stays true: every module is in its table, no top-level
import goes to a higher layer, and every lazy upward import is one it lists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "shortgpt_hf"
DOC = (ROOT / "docs" / "architecture.md").read_text()


def documented() -> tuple[dict[str, int], set[tuple[str, str]]]:
    layers = {m: int(n) for m, n in re.findall(r"^\| `([\w.]+)` \| (\d+) \|", DOC, re.M)}
    exceptions = set()
    for source, targets in re.findall(r"^- `([\w.]+)` → ((?:`[\w.]+`(?:, )?)+):", DOC, re.M):
        exceptions |= {(source, t) for t in re.findall(r"`([\w.]+)`", targets)}
    return layers, exceptions


def imports() -> dict[str, tuple[set[str], set[str]]]:
    """Per module: (package modules imported at the top of the file, those imported inside functions)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
        package = name.split(".")[:-1]
        top, inner = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names if not node.module else [None]:
                    module = (
                        f"{target}.{alias.name}"
                        if alias is not None and (PACKAGE / target.replace(".", "/") / f"{alias.name}.py").is_file()
                        else target
                    )
                    (top if node.col_offset == 0 else inner).add(module or "__init__")
        found[name] = (top - {name}, inner - top - {name})
    return found


def test_every_module_is_in_the_table():
    layers, _ = documented()
    assert set(imports()) == set(layers), "docs/architecture.md must list exactly the package's modules"


def test_imports_go_down_the_layers():
    layers, exceptions = documented()
    found = imports()
    wrong, undocumented = [], []
    for module, (top, inner) in found.items():
        wrong += [f"{module} -> {t}" for t in top if t in layers and layers[t] > layers[module]]
        undocumented += [
            f"{module} -> {t}"
            for t in inner
            if t in layers and layers[t] > layers[module] and (module, t) not in exceptions
        ]
    assert not wrong, f"top-level imports from a higher layer: {wrong}"
    assert not undocumented, f"lazy upward imports missing from docs/architecture.md: {undocumented}"
    stale = [f"{s} -> {t}" for s, t in exceptions if t not in found[s][1]]
    assert not stale, f"docs/architecture.md lists lazy imports that no longer exist: {stale}"
