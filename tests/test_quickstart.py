"""The Quick start's `make train`: the shipped config.json reaches the promised mIoU."""
from __future__ import annotations

import csv
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


@pytest.mark.slow
def test_torchrun_two_processes_on_the_cpu(tmp_path):
    """Rank-aware saving and the all-reduced confusion matrix under torchrun (gloo backend)."""
    import shutil
    import subprocess
    import sys

    config = json.loads((ROOT / "config.json").read_text())
    config["train_loader"]["args"].update(num_samples=64)
    config["val_loader"]["args"].update(num_samples=15, batch_size=4)  # odd: shards of 8 and 7
    config["trainer"].update(epochs=1, progress_bar=False, save_dir=str(tmp_path / "saved"))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = subprocess.run([torchrun, "--nproc_per_node=2", str(ROOT / "train.py"), "-c", str(config_path),
                             "--run-dir", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Run saved in") == 1  # only rank 0 reports
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_trained"] == 1
    # Each image was validated by exactly one rank; the all-reduced confusion matrix must equal the
    # one of a single process predicting all 15 with the saved weights.
    import torch

    from dataloader.synthetic import make_sample
    from inference import load_predictor
    from utils.metrics import ConfusionMatrix, segmentation_metrics

    predictor, _ = load_predictor(None, str(tmp_path / "run" / "checkpoint.pth"), torch.device("cpu"))
    confusion = ConfusionMatrix(5)
    for i in range(15):
        image, label = make_sample(0, "val", i, 64)
        confusion.update(torch.from_numpy(predictor.predict(image)), torch.from_numpy(label).long())
    expected = segmentation_metrics(confusion.matrix)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        row = list(csv.DictReader(handle))[0]
    assert float(row["mIoU"]) == pytest.approx(expected["mIoU"], abs=1e-5)
    assert float(row["pixel_acc"]) == pytest.approx(expected["pixel_acc"], abs=1e-5)
