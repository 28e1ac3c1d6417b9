"""The Quick start's `make train`: the shipped config.json reaches the promised mIoU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shipped_config_reaches_miou_080(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(ROOT / "config.json"), "--run-dir", str(run_dir),
                       "--set", "trainer.progress_bar=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_metrics"]["mIoU"] >= 0.80
    out = capsys.readouterr().out
    assert f"Validation mIoU: {summary['best_metrics']['mIoU']:.4f}" in out
    assert f"Run saved in {run_dir}" in out
