"""Adding a component is one file: the component packages import all of their modules."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEW_FILES = {
    "models/my_net.py": '''
from torch import nn
from base.base_model import BaseModel
from utils.registry import MODELS

@MODELS.register
class MyNet(BaseModel):
    """A 1x1 convolution."""
    def __init__(self, num_classes: int, width: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return {"out": self.head(x)}
''',
    "models/losses/my_loss.py": '''
from torch import nn
from utils.registry import LOSSES

@LOSSES.register
class MyLoss(nn.Module):
    """Zero."""
    def forward(self, logits, target):
        return logits.sum() * 0
''',
    "optim/my_schedule.py": '''
from utils.registry import SCHEDULERS
from optim.schedules import Poly

@SCHEDULERS.register
class MyPoly(Poly):
    """Poly under another name."""
''',
}

CHECK = '''
import json
from utils.config import load_config
from utils.registry import LOSSES, MODELS, SCHEDULERS
config = load_config("config.json", ["arch.type=MyNet", "arch.args={}", "loss=MyLoss", "lr_scheduler.type=MyPoly"])
print(json.dumps([config["arch"]["type"], "MyNet" in MODELS, "MyLoss" in LOSSES, "MyPoly" in SCHEDULERS]))
'''


def _copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "saved", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore)


@pytest.mark.parametrize("with_new_files", [False, True])
def test_a_new_file_is_all_it_takes(tmp_path, with_new_files):
    project = tmp_path / "project"
    _copy_project(project)
    if with_new_files:
        for relative, text in NEW_FILES.items():
            (project / relative).write_text(text)
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=project, capture_output=True, text=True)
    if with_new_files:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == '["MyNet", true, true, true]'
    else:  # without the files the names are unknown: the test can fail
        assert result.returncode != 0
        assert "unknown model 'MyNet'" in result.stderr
