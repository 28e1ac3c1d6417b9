"""The README's config reference is the generated one, and its examples are real."""
from __future__ import annotations

import json
import re
from pathlib import Path

from utils.config import load_config
from utils.reference import BEGIN, END, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference_markdown(), "run `python -m utils.reference` and paste it in README.md"


def test_shipped_configs_validate():
    for path in [ROOT / "config.json", *sorted((ROOT / "configs").glob("*.json"))]:
        load_config(path)


def test_quick_start_has_exactly_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make train", "make test"]


def test_run_folder_table_lists_what_a_run_writes():
    table = README.split("### What a run folder holds", 1)[1].split("###", 1)[0]
    for name in ("config.json", "checkpoint.pth", "best_model.pth", "metrics.csv", "summary.json",
                 "learning_curves.png", "train.log", "tensorboard/"):
        assert f"`{name}`" in table
    assert json.loads((ROOT / "config.json").read_text())["trainer"]["save_dir"] == "saved/"
