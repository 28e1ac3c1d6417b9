"""The model summary: hand-checked counts, the command line, and the README's models table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from base.base_model import BaseModel
from utils import summary
from utils.config import import_components

ROOT = Path(__file__).resolve().parents[1]
import_components()


def test_flops_of_a_convolution_are_two_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert summary.forward_flops(conv, (16, 16)) == 2 * 3 * 8 * 9 * 16 * 16


def test_saved_activations_count_each_storage_once_and_no_parameters():
    # The conv saves its input (for the weight's gradient) and its weight (a parameter: not
    # counted); the ReLU saves its output; the view's base is the same storage as the output.
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    batch_bytes = 2 * 4 * 4 * 4  # (2 images, 1 x 4 x 4 floats)
    assert summary.saved_activation_bytes(model, (4, 4), batch=2, in_channels=1) == batch_bytes + 2 * batch_bytes


def test_saved_activations_on_meta_equal_the_real_ones():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    real = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    assert summary.saved_activation_bytes(meta, (9, 9)) == summary.saved_activation_bytes(real, (9, 9)) > 0


def test_parameter_split_between_backbone_and_decoder():
    class Tiny(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 3)                   # 3 * 4 * 9 + 4 = 112
            self.head = nn.Conv2d(4, 2, 1)                       # 4 * 2 + 2 = 10
            self.frozen = nn.Parameter(torch.zeros(5), requires_grad=False)

    assert summary.count_parameters(Tiny()) == summary.ParameterCounts(total=127, trainable=122,
                                                                       backbone=112, decoder=15)
    assert summary.count_parameters(nn.Linear(2, 3)) == summary.ParameterCounts(9, 9, 0, 9)


def test_command_prints_the_summary(tmp_path, tiny_config, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config))
    assert summary.main(["-c", str(path), "--size", "32", "48", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    model = summary.MODELS.build(tiny_config["arch"], "arch", num_classes=5)
    assert f"parameters: {model.num_parameters():,} total" in out
    assert "input: 1x3x32x48" in out and "GFLOPs (forward, batch 1)" in out
    assert re.search(r"activation memory \(training step, batch 2, tensors saved for backward\): [\d.]+ MiB", out)
    assert re.search(r"forward latency \(eval, batch 1, median of 1\): [\d.]+ ms", out)


@pytest.mark.parametrize("argv, message", [
    (["-c", "missing.json"], "missing.json"),
    (["-c", "config.json", "--size", "0", "64"], "--size must be two positive integers, got 0 64"),
    (["-c", "config.json", "--batch", "0"], "--batch must be a positive integer, got 0"),
    ([], "give either -c CONFIG or --update-readme FILE"),
    (["--update-readme", "nowhere.md"], "cannot read nowhere.md"),
])
def test_errors_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        code = summary.main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


def test_update_readme_rewrites_only_the_block(tmp_path, monkeypatch):
    rows = [summary.TableRow("ENet", 360_298, 7_844_134_912, 3 * 2**20)]
    monkeypatch.setattr(summary, "table_rows", lambda: rows)
    path = tmp_path / "README.md"
    path.write_text(f"# Title\n\n{summary.BEGIN}\nold\n{summary.END}\n\nafter\n")
    summary.update_readme(path)
    text = path.read_text()
    assert text.startswith("# Title\n\n" + summary.BEGIN) and text.endswith(summary.END + "\n\nafter\n")
    assert "| `ENet` | 0.36 | 7.8 | 3 |" in text
    path.write_text("# no markers\n")
    with pytest.raises(summary.ConfigError, match="has no models table markers"):
        summary.update_readme(path)


def readme_table() -> dict[str, tuple[str, str]]:
    """``{model: (params, GFLOPs)}`` of README.md's models table; skips the test while there is none."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if summary.BEGIN not in text:
        pytest.skip("README.md has no models table yet")
    block = text[text.index(summary.BEGIN):text.index(summary.END)]
    return {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `(\w+)` \| ([\d.]+) \| ([\d.]+) \|", block, flags=re.M)}


def test_readme_models_table_lists_every_model_with_current_parameters():
    table = readme_table()
    assert sorted(table) == summary.MODELS.names(), "run `python -m utils.summary --update-readme README.md`"
    for name in table:
        model = summary._meta_model(lambda: summary.MODELS.build({"type": name, "args": {}}, "arch",
                                                                  num_classes=summary.TABLE_CLASSES))
        assert table[name][0] == summary.format_params(summary.count_parameters(model).total), \
            f"{name}: run `python -m utils.summary --update-readme README.md`"


@pytest.mark.slow  # a forward pass of every model at 512x1024 (on meta, but HRNet has ~2000 modules)
def test_readme_models_table_has_current_flops():
    table = readme_table()
    rows = summary.table_rows(sorted(table), with_memory=False)
    assert {r.name: summary.format_flops(r.flops) for r in rows} == {k: v[1] for k, v in table.items()}, \
        "run `python -m utils.summary --update-readme README.md`"
