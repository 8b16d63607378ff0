"""The layering rule (ARCHITECTURE.md): imports go only downward, and no modules import each other in a cycle.

Layers, lowest first: ``files``/``device``/``safe_load`` (and ``console``) <- ``data`` <- ``model`` <- ``infer`` <-
``eval`` <- ``train`` <- ``convert``/``tools``. Command modules (``cli.py`` at the top and in any package) are the top layer; the package root
(``minigpt/__init__.py``: the version and lazily imported public names) may be imported from anywhere. Every import counts (module level or inside a function), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minigpt"
LAYERS = {
    "files": 0,
    "console": 0,
    "device": 0,
    "safe_load": 0,
    "data": 1,
    "model": 2,
    "infer": 3,
    "eval": 4,
    "train": 5,
    "convert": 6,
    "tools": 6,
}
TOP = 7


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str, importer: bool = False) -> int:
    """The layer of ``module``; the package root (``__version__``, lazy names) is the top layer as an importer and the
    bottom one as an import."""
    parts = module.split(".")
    if module == "minigpt":
        return TOP if importer else 0
    return TOP if parts[-1] == "cli" else LAYERS[parts[1]]


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, imported minigpt module) for every runtime import in ``path``."""
    tree = ast.parse(source if source is not None else path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "minigpt":
                    names = [f"{target}.{a.name}" for a in child.names]
                    found.extend((child.lineno, _existing(n) or target) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == "minigpt")
            visit(child)

    visit(tree)
    return found


def _existing(name: str) -> str | None:
    """``name`` when it is a module of the package (``from .x import y`` may name module y), else None."""
    path = SRC.parent.joinpath(*name.split("."))
    return name if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else None


def upward_imports(files: dict[Path, str | None]) -> list[str]:
    bad = []
    for path, source in files.items():
        here = module_name(path)
        for line, target in imports_of(path, source):
            if layer(target) > layer(here, importer=True):
                bad.append(
                    f"{path.relative_to(SRC.parent)}:{line}: {here} (layer {layer(here, importer=True)}) "
                    f"imports {target} (layer {layer(target)})"
                )
    return bad


def import_cycles(files: dict[Path, str | None]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = {module_name(p): {t for _, t in imports_of(p, s)} for p, s in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph or nxt == node:
                continue
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in graph:
        if node not in index:
            connect(node)
    return cycles


def package_files() -> dict[Path, str | None]:
    return {path: None for path in sorted(SRC.rglob("*.py"))}


def test_every_package_has_a_layer():
    for path in package_files():
        layer(module_name(path))  # a KeyError names a package missing from LAYERS


def test_no_import_goes_up_a_layer():
    assert upward_imports(package_files()) == []


def test_no_import_cycles():
    assert import_cycles(package_files()) == []


@pytest.mark.parametrize("planted", ["from ..infer.engine import Engine", "from minigpt.train.loop import train"])
def test_a_planted_upward_import_fails(planted):
    files = package_files()
    target = SRC / "model" / "minigpt.py"
    files[target] = target.read_text() + f"\n\ndef planted() -> None:\n    {planted}\n"
    bad = upward_imports(files)
    assert len(bad) == 1 and bad[0].startswith("minigpt/model/minigpt.py:") and "imports minigpt." in bad[0]


def test_a_planted_cycle_is_found():
    files = package_files()
    target = SRC / "data" / "conversation.py"
    files[target] = target.read_text() + "\n\nfrom .tokenize import collate  # noqa\n"
    assert any({"minigpt.data.conversation", "minigpt.data.tokenize"} <= set(group) for group in import_cycles(files))
