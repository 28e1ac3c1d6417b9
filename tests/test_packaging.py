"""The project installs (`pip install -e .`): its wheel holds every module and the console commands."""
from __future__ import annotations

import configparser
import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_layout import project_files

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"seg-train": "train:main", "seg-infer": "inference:main", "seg-export": "tools.export:main",
           "seg-doctor": "tools.doctor:main", "seg-evaluate": "tools.evaluate:main"}


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel of a copy of the project (the build writes build/ and *.egg-info beside its sources)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(ROOT / name, source / name)
    for path in project_files(ROOT):
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--quiet", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_every_module_of_the_project(wheel):
    names = set(wheel.namelist())
    expected = {"/".join(p.relative_to(ROOT).parts) for p in project_files(ROOT)}
    assert {"train.py", "inference.py", "trainer.py", "builder.py", "predictor.py", "tools/evaluate.py",
            "tools/bench/amp.py", "models/losses/dice.py", "utils/registry.py"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"modules left out of the wheel (add them to [tool.setuptools] in pyproject.toml): {missing}"


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if re.fullmatch(rf"[^/]+\.dist-info/{name}", n)]
    return wheel.read(path).decode()


def test_the_wheel_declares_the_commands_and_requirements(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(dist_info(wheel, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    metadata = dist_info(wheel, "METADATA")
    assert "Requires-Python: >=3.10" in metadata
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.M)
    assert [r for r in requires if "extra ==" not in r] == requirement_lines(ROOT / "requirements.txt")
    # The `test` extra is requirements-dev.txt's test-only packages.
    assert [r.split(";")[0].strip() for r in requires if 'extra == "test"' in r] == \
        requirement_lines(ROOT / "requirements-dev.txt")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_command_is_a_main_function(script):
    module, function = SCRIPTS[script].split(":")
    assert callable(getattr(importlib.import_module(module), function))
