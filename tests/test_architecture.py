"""ARCHITECTURE.md names real code: every module, class, function and file it names in its owners, call traces and
recipes resolves, so a rename that leaves the document behind fails here."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "minigpt"
CHECKED_SECTIONS = ("The three owners", "Call traces", "Recipes")
#: Backticked text in those sections that is not a name of ours: values, expressions, commands, other libraries'
#: attributes. A new name of ours must resolve; only prose goes here.
NOT_NAMES = {
    "deepspeed_pipeline",  # a run.strategy value
    "final/",
    "llm_adapter/",  # a folder of final/
    "outside_root",  # a skip reason as counted in reports (the function of that name is named with its module)
    "step_N",
    "model(batch)",
    "model:",
    "llm.generate(inputs_embeds=...)",
    "model.layers",  # transformers' LLaMA-style attribute
    "max_new_tokens",
    "image_embeds",
    "usage",
}
#: Names that stand for a section of the training config (``run.eval_task``: ``RunSection.eval_task``).
CONFIG_PREFIXES = {"run": "RunSection", "model": "ModelSection"}
_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0].strip(): part for part in parts[1:]}


def _paragraphs(section: str) -> list[str]:
    """Bullets and paragraphs: the context in which a bare method or field name is read."""
    return [p for p in re.split(r"\n(?=- )|\n\s*\n", section) if p.strip()]


def _index() -> dict[str, list[str]]:
    """Top-level names (classes, functions, constants) -> the modules that define them."""
    names: dict[str, list[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        module = ".".join(("minigpt", *file.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                found = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                found = []
            for name in found:
                names.setdefault(name, []).append(module)
    return names


INDEX = _index()
MODULES = {m.rsplit(".", 1)[-1]: m for ms in INDEX.values() for m in ms}


def _has(obj: Any, name: str) -> bool:
    if hasattr(obj, name):
        return True
    if inspect.isclass(obj):
        if is_dataclass(obj) and name in {f.name for f in fields(obj)}:
            return True
        model_fields = getattr(obj, "model_fields", None)  # pydantic sections
        return bool(model_fields) and name in model_fields
    return False


def _walk(obj: Any, rest: list[str]) -> bool:
    for part in rest:
        if not _has(obj, part):
            return False
        obj = getattr(obj, part, None)
    return True


def resolve(name: str, context: list[str] = ()) -> bool:
    """Whether ``name`` (``module.path.attr``, ``Class.attr``, ``function``, a module's short name, or a bare
    attribute of a class in ``context``) names real code."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # a module path, relative to the package or absolute
        for prefix in ("minigpt.", ""):
            try:
                module = importlib.import_module(prefix + ".".join(parts[:cut]))
            except ImportError:
                continue
            if module.__name__.startswith("minigpt") and _walk(module, parts[cut:]):
                return True
    for module in INDEX.get(parts[0], []):
        if _walk(getattr(importlib.import_module(module), parts[0]), parts[1:]):
            return True
    if parts[0] in CONFIG_PREFIXES:
        return resolve(".".join([CONFIG_PREFIXES[parts[0]], *parts[1:]]))
    if len(parts) == 1 and parts[0] in MODULES:
        return True
    for owner in context:  # a method or field of a class the paragraph names
        for module in INDEX.get(owner, []):
            obj = getattr(importlib.import_module(module), owner)
            if inspect.isclass(obj) and _walk(obj, parts):
                return True
    for library in ("torch", "transformers"):
        if _walk(importlib.import_module(library), parts):
            return True
    return False


def _path_exists(token: str) -> bool | None:
    """Whether a file or folder of ours that ``token`` names exists (None: not one of ours)."""
    if re.fullmatch(r"\w+\.py", token):
        return (PACKAGE / token).is_file()
    first = token.split("/", 1)[0]
    if not first or "/" not in token or not re.fullmatch(r"[\w./*-]+", token):
        return None
    if first in ("tests", "scripts"):
        return any(ROOT.glob(token))
    if first == "minigpt":
        return any((ROOT / "src").glob(token))
    if (PACKAGE / first).is_dir():
        return any(PACKAGE.glob(token.rstrip("/"))) or (PACKAGE / token).exists()
    return None


def architecture_names(text: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """(names, paths): each checked name or path of ``text`` and whether it resolves."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # code blocks: their fences are backticks too
    names, paths = [], []
    for token in re.findall(r"`([^`]+)`", text):
        exists = _path_exists(" ".join(token.split()))
        if exists is not None:
            paths.append((token, exists))
    sections = _sections(text)
    for title in CHECKED_SECTIONS:
        for paragraph in _paragraphs(sections[title]):
            tokens = [" ".join(t.split()) for t in re.findall(r"`([^`]+)`", paragraph)]
            context = [m.group(0).split(".")[0] for t in tokens if (m := _NAME.match(t))]
            context = [c for c in context if c[0].isupper()]
            for token in tokens:
                if token in NOT_NAMES or _path_exists(token) is not None:
                    continue
                head = _NAME.match(token)
                if head is None or token.startswith(("minigpt ", "POST ", "--")):
                    continue  # a command line or a request, not a name
                names.append((head.group(0), resolve(head.group(0), context)))
    return names, paths


def test_every_name_and_path_in_architecture_md_resolves():
    names, paths = architecture_names((ROOT / "ARCHITECTURE.md").read_text())
    assert len(names) > 100 and len(paths) > 15  # the owners, traces and recipes were read
    assert [n for n, ok in names if not ok] == []
    assert [p for p, ok in paths if not ok] == []
    print(f"ARCHITECTURE.md: {len(names)} names and {len(paths)} paths resolved")


@pytest.mark.parametrize(
    "renamed",
    [
        "`Engine.generate_text`",
        "`train.loop.train`",
        "`decoding_for`",
        "`SlotScheduler.generate`",
        "`infer/engines.py`",
        "`no_such_function(batch)`",
    ],
)
def test_a_stale_name_is_caught(renamed):
    text = (ROOT / "ARCHITECTURE.md").read_text().replace("## Call traces\n", f"## Call traces\n\n{renamed}\n\n")
    names, paths = architecture_names(text)
    assert [n for n, ok in names + paths if not ok] == [renamed.strip("`").split("(")[0]]


# ---------------------------------------------------------------------------------------------- parameter lists

MAX_PARAMETERS = 8


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Every parameter but a leading ``self``/``cls``: positional, keyword-only, ``*args`` and ``**kwargs`` one each."""
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    own = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
    return own + (a.vararg is not None) + (a.kwarg is not None)


def long_parameter_lists(package: Path = PACKAGE, limit: int = MAX_PARAMETERS) -> list[tuple[str, int]]:
    """``("module.py:function", count)`` for each function or method outside the CLI layer (``cli.py`` modules:
    argparse registration and ``run(args)``) that takes more than ``limit`` parameters."""
    found = []
    for file in sorted(package.rglob("*.py")):
        if file.name == "cli.py":
            continue
        where = file.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > limit:
                found.append((f"{where}:{node.name}", parameter_count(node)))
    return found


def test_no_function_outside_the_cli_takes_more_than_eight_parameters():
    assert [f"{name} ({n} parameters)" for name, n in long_parameter_lists()] == []


def test_parameters_are_counted_as_the_limit_means(tmp_path):
    (tmp_path / "cli.py").write_text("def register(a, b, c, d, e, f, g, h, i): ...\n")
    (tmp_path / "lib.py").write_text(
        "def eight(a, b, c, d, e, f, g, h): ...\n"
        "def nine(a, b, c, d, e, f, g, *h, i): ...\n"
        "def star(a, b, c, d, e, f, g, **h): ...\n"
        "class C:\n"
        "    def method(self, a, b, c, d, e, f, g, h): ...\n"
        "    def plus(self, a, b, c, d, e, f, g, h, *, i=1): ...\n"
    )
    assert long_parameter_lists(tmp_path) == [("lib.py:nine", 9), ("lib.py:plus", 9)]


if __name__ == "__main__":  # the list itself: python tests/test_architecture.py
    for name, count in long_parameter_lists():
        print(f"{count:3d}  {name}")
