"""The layered layout, checked by parsing every import of the project with ``ast``.

Floors, from the ground up (a floor imports only the floors below it and itself):

* ``utils/``: the standard library, third-party packages and ``utils/``. A registry
  names the package that fills it as a string; only ``utils/registry.py`` imports
  by name (``importlib.import_module``), and never with a literal project name.
* ``base/``: ``utils/`` and ``base/``.
* ``models/`` (with ``models/losses/``), ``dataloader/``, ``optim/``: ``base/``,
  ``utils/`` and their own package, never each other.
* ``trainer.py``, ``predictor.py``: ``base/`` and ``utils/`` only (no component, no builder).
* ``builder.py``: any of the above, but no command.
* Commands (``train.py``, ``inference.py``, ``tools/``): anything. Nothing outside
  ``tests/`` imports a command, except ``tools/`` importing ``tools/``.

Every import counts: ``import x`` and ``from x import y``, at module level or inside
a function, relative imports resolved, and ``import_module("x")`` / ``__import__("x")``
calls with a literal name. No project file outside ``tests/`` touches ``sys.path``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Project top-level names -> the floor they belong to. Any other name is stdlib/third-party.
TOP_LEVEL = {
    "utils": "utils", "base": "base", "models": "models", "dataloader": "dataloader", "optim": "optim",
    "trainer": "trainer", "predictor": "predictor", "builder": "builder",
    "train": "command", "inference": "command", "tools": "command",
}
MODULES = ("builder", "trainer", "predictor", "train", "inference")  # the rest are packages

RULES = {
    "utils": "utils/ (ground floor) imports only the standard library, third-party packages and utils/",
    "base": "base/ imports only utils/ and base/ (besides the standard library and third-party packages)",
    "models": "models/ imports only base/, utils/ and models/ (never dataloader/, optim/ or above)",
    "dataloader": "dataloader/ imports only base/, utils/ and dataloader/ (never models/, optim/ or above)",
    "optim": "optim/ imports only base/, utils/ and optim/ (never models/, dataloader/ or above)",
    "trainer": "trainer.py imports only base/ and utils/ (no component: models, dataloader, optim, builder)",
    "predictor": "predictor.py imports only base/ and utils/ (no component: models, dataloader, optim, builder)",
    "command": "nothing outside tests/ imports a command (train, inference, tools.*), "
               "except tools/ importing tools/",
    "dynamic": "in utils/ only registry.py imports by name (import_module/__import__), "
               "and only names a registry is given, never a literal project name",
    "sys.path": "no project file outside tests/ manipulates sys.path (run from the repository root "
                "or with python -m instead)",
}

#: Floor -> the project floors it may import (``command`` is checked separately).
ALLOWED = {
    "utils": {"utils"},
    "base": {"utils", "base"},
    "models": {"utils", "base", "models"},
    "dataloader": {"utils", "base", "dataloader"},
    "optim": {"utils", "base", "optim"},
    "trainer": {"utils", "base"},
    "predictor": {"utils", "base"},
    "builder": {"utils", "base", "models", "dataloader", "optim", "trainer", "predictor", "builder"},
    "command": set(TOP_LEVEL.values()),
    None: set(TOP_LEVEL.values()) - {"command"},  # a project file outside the layout: no command
}

#: The folders that are packages of the layout.
PACKAGES = ("utils", "models", "dataloader", "optim", "tools", "tools/bench", "base", "models/losses")

SKIPPED_DIRS = {"tests", "__pycache__", "saved", "runs", "node_modules", "build", "dist"}


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the checked root, with forward slashes
    line: int
    what: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} -- breaks the rule: {self.rule}"


def project_files(root: Path) -> list[Path]:
    """Every ``.py`` file of the project outside ``tests/`` (and hidden or generated folders)."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS or "venv" in p for p in parts[:-1]):
            continue
        files.append(path)
    return files


def floor_of(rel: tuple[str, ...]) -> str | None:
    """The floor of a file (by its path parts relative to the root); None outside the layout."""
    if len(rel) == 1:  # a top-level module: trainer.py, builder.py, train.py...
        return TOP_LEVEL.get(Path(rel[0]).stem) if Path(rel[0]).stem in MODULES else None
    return TOP_LEVEL.get(rel[0]) if rel[0] not in MODULES else None


def resolve_from(node: ast.ImportFrom, rel: tuple[str, ...]) -> list[str]:
    """The absolute module names a ``from ... import ...`` statement imports (relative ones resolved)."""
    if node.level == 0:
        return [node.module or ""]
    package = list(rel[:-1])  # models/losses/dice.py and models/losses/__init__.py: models.losses
    anchor = package[:len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
    if node.module:
        return [".".join(anchor + node.module.split("."))]
    return [".".join(anchor + [alias.name]) for alias in node.names]  # from . import a, b


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    if isinstance(func, ast.Attribute):
        if func.attr in ("import_module", "__import__"):
            return True
        # runpy.run_module("train") runs a module by name
        return func.attr == "run_module" and isinstance(func.value, ast.Name) and func.value.id == "runpy"
    return False


def _literal(call: ast.Call) -> str | None:
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    for kw in call.keywords:
        if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
            return kw.value.value
    return None


class _SysPath(ast.NodeVisitor):
    """Finds changes to ``sys.path`` (calls on it, assignments to it or to an item or slice of it)."""

    def __init__(self, tree: ast.AST) -> None:
        self.sys_names = {"sys"}
        self.path_names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self.sys_names |= {a.asname or a.name for a in node.names if a.name == "sys"}
            elif isinstance(node, ast.ImportFrom) and node.module == "sys" and node.level == 0:
                self.path_names |= {a.asname or a.name for a in node.names if a.name == "path"}
        self.found: list[tuple[int, str]] = []

    def is_sys_path(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "path":
            return isinstance(node.value, ast.Name) and node.value.id in self.sys_names
        return isinstance(node, ast.Name) and node.id in self.path_names

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and self.is_sys_path(func.value) and func.attr in (
                "insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"):
            self.found.append((node.lineno, f"sys.path.{func.attr}(...)"))
        if isinstance(func, ast.Attribute) and func.attr == "addsitedir":
            self.found.append((node.lineno, "site.addsitedir(...)"))
        self.generic_visit(node)

    def _targets(self, targets, lineno: int) -> None:
        for target in targets:
            for sub in ast.walk(target):
                if self.is_sys_path(sub):
                    self.found.append((lineno, "assignment to sys.path"))
                    break
                if isinstance(sub, ast.Subscript) and self.is_sys_path(sub.value):
                    self.found.append((lineno, "assignment to sys.path[...]"))
                    break

    def visit_Assign(self, node: ast.Assign) -> None:
        self._targets(node.targets, node.lineno)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._targets([node.target], node.lineno)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        self._targets(node.targets, node.lineno)
        self.generic_visit(node)


def check_file(path: Path, root: Path) -> list[Violation]:
    """The layer-rule violations of one project file."""
    rel = path.relative_to(root).parts
    name = "/".join(rel)
    floor = floor_of(rel)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    violations: list[Violation] = []

    def check_import(module: str, line: int, how: str) -> None:
        top = module.split(".")[0]
        target = TOP_LEVEL.get(top)
        if target is None:
            return  # standard library or third-party
        if target == "command":
            if not (rel[0] == "tools" and len(rel) > 1 and top == "tools"):
                violations.append(Violation(name, line, f"{how} command {module}", RULES["command"]))
            return
        if target not in ALLOWED[floor]:
            violations.append(Violation(name, line, f"{how} {module} ({target})", RULES[floor]))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check_import(alias.name, node.lineno, "imports")
        elif isinstance(node, ast.ImportFrom):
            for module in resolve_from(node, rel):
                check_import(module, node.lineno, "imports")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            literal = _literal(node)
            if floor == "utils":
                if name != "utils/registry.py":
                    violations.append(Violation(name, node.lineno, "imports by name (import_module/__import__)",
                                                RULES["dynamic"]))
                elif literal is not None and literal.split(".")[0] in TOP_LEVEL:
                    violations.append(Violation(name, node.lineno, f"imports {literal!r} by a literal name",
                                                RULES["dynamic"]))
            if literal is not None and not literal.startswith("."):
                check_import(literal, node.lineno, "imports by name")

    finder = _SysPath(tree)
    finder.visit(tree)
    violations += [Violation(name, line, what, RULES["sys.path"]) for line, what in finder.found]
    return violations


def check_layout(root: Path) -> list[Violation]:
    """Every violation of the layer rule below ``root``, sorted by file and line."""
    violations = [v for path in project_files(root) for v in check_file(path, root)]
    return sorted(violations, key=lambda v: (v.path, v.line, v.what))


def check_package(root: Path, folder: str) -> list[str]:
    """What is wrong with a package folder: no ``__init__.py`` though 2+ files, or a single module."""
    directory = root / folder
    if not directory.is_dir():
        return [f"{folder}/: the folder does not exist"]
    modules = sorted(p.name for p in directory.glob("*.py") if p.name != "__init__.py")
    subpackages = sorted(p.name for p in directory.iterdir()
                         if p.is_dir() and not p.name.startswith((".", "__")) and any(p.rglob("*.py")))
    problems = []
    has_init = (directory / "__init__.py").is_file()
    if len(modules) + len(subpackages) + has_init >= 2 and not has_init:
        problems.append(f"{folder}/: a package of {len(modules)} modules ({', '.join(modules)}) "
                        "has no __init__.py -- rule: every package of 2+ .py files has an __init__.py")
    if len(modules) + len(subpackages) == 1:
        only = (modules + subpackages)[0]
        problems.append(f"{folder}/: the package holds just one module ({only}) besides __init__.py "
                        "-- rule: a one-file package should be a module")
    return problems


def package_folders(root: Path) -> list[str]:
    """The layout's packages, and any other folder of the project holding Python files."""
    found = {"/".join(p.relative_to(root).parts[:-1]) for p in project_files(root)} - {""}
    return sorted(set(PACKAGES) | found)


# ----------------------------------------------------------------------------- the real tree


def test_imports_follow_the_layer_rule():
    violations = check_layout(ROOT)
    assert not violations, f"{len(violations)} layer-rule violation(s):\n" + "\n".join(map(str, violations))


@pytest.mark.parametrize("folder", package_folders(ROOT))
def test_package_folders(folder):
    problems = check_package(ROOT, folder)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_the_project():
    """Guards against a checker that passes because it reads nothing."""
    names = {"/".join(p.relative_to(ROOT).parts) for p in project_files(ROOT)}
    assert {"utils/registry.py", "builder.py", "trainer.py", "predictor.py", "train.py", "inference.py",
            "models/unet.py", "models/losses/dice.py", "optim/schedules.py"} <= names
    assert not any(n.startswith(("tests/", ".venv/")) for n in names)


# ----------------------------------------------------------------------------- the checker itself


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_names_file_line_and_rule(tmp_path):
    write(tmp_path, {"utils/__init__.py": "", "utils/x.py": "import os\n\nfrom models import y\n",
                     "models/__init__.py": "", "models/y.py": ""})
    violations = check_layout(tmp_path)
    assert len(violations) == 1
    message = str(violations[0])
    assert message.startswith("utils/x.py:3: ")
    assert "models" in message and RULES["utils"] in message


def test_checker_catches_every_kind_of_import(tmp_path):
    write(tmp_path, {
        "utils/__init__.py": "",
        "utils/registry.py": "import importlib\n"
                             "def populate(names):\n"
                             "    for n in names:\n"
                             "        importlib.import_module(n)\n"  # allowed: not a literal
                             "def bad():\n"
                             "    importlib.import_module('dataloader')\n",  # line 6
        "utils/helper.py": "def f():\n    return __import__('json')\n",  # line 2: utils outside registry
        "models/__init__.py": "",
        "models/losses/__init__.py": "",
        "models/losses/dice.py": "from ...optim import sgd\n"  # line 1: relative, resolves to optim
                                 "from .. import unet\n"  # models.unet: fine
                                 "from ..losses import common\n",  # fine
        "models/losses/common.py": "",
        "models/unet.py": "def build():\n    import dataloader.synthetic\n",  # line 2: inside a function
        "base/m.py": "import models\n",
        "trainer.py": "import builder\nfrom base import x\nfrom predictor import p\n",
        "predictor.py": "import importlib\nm = importlib.import_module('models.unet')\n",
        "builder.py": "import models, dataloader, optim, trainer\nfrom train import main\n",
        "train.py": "import tools.doctor\nimport sys\nsys.path.insert(0, '.')\n",
        "tools/__init__.py": "",
        "tools/bench/__init__.py": "",
        "tools/bench/amp.py": "from tools.bench import train_step\nfrom . import data\nimport inference\n",
        "tools/bench/train_step.py": "import sys as system\nsystem.path[:0] = ['x']\n",
        "tools/bench/data.py": "from sys import path\npath.append('y')\n",
        "tests/test_x.py": "import sys\nsys.path.append('.')\nimport train\n",  # tests are not checked
    })
    found = {(v.path, v.line, v.rule) for v in check_layout(tmp_path)}
    assert found == {
        ("utils/registry.py", 6, RULES["dynamic"]),
        ("utils/registry.py", 6, RULES["utils"]),
        ("utils/helper.py", 2, RULES["dynamic"]),
        ("models/losses/dice.py", 1, RULES["models"]),
        ("models/unet.py", 2, RULES["models"]),
        ("base/m.py", 1, RULES["base"]),
        ("trainer.py", 1, RULES["trainer"]),
        ("trainer.py", 3, RULES["trainer"]),
        ("predictor.py", 2, RULES["predictor"]),
        ("builder.py", 2, RULES["command"]),
        ("train.py", 1, RULES["command"]),
        ("train.py", 3, RULES["sys.path"]),
        ("tools/bench/amp.py", 3, RULES["command"]),
        ("tools/bench/train_step.py", 2, RULES["sys.path"]),
        ("tools/bench/data.py", 2, RULES["sys.path"]),
    }


def test_package_check(tmp_path):
    write(tmp_path, {"base/a.py": "", "base/b.py": "", "optim/__init__.py": "", "optim/only.py": "",
                     "models/__init__.py": "", "models/a.py": "", "models/losses/__init__.py": "",
                     "models/losses/x.py": "", "models/losses/y.py": ""})
    assert "base/: a package of 2 modules (a.py, b.py) has no __init__.py" in check_package(tmp_path, "base")[0]
    assert "optim/: the package holds just one module (only.py)" in check_package(tmp_path, "optim")[0]
    assert check_package(tmp_path, "models") == [] and check_package(tmp_path, "models/losses") == []
