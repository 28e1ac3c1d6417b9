"""Configs, checkpoints and run folders written before the file move stay usable.

``tests/fixtures/pre_layout_run/`` is a 1-epoch run (UNet, base_channels 4, depth 2, on
SyntheticShapes with 5 classes) written by the code *before* the layered layout; the
expected numbers below were measured with that old code.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import inference
import train
from builder import load_trained
from utils.config import load_config

OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "pre_layout_run"
RUN_FILES = ("checkpoint.pth", "best_model.pth", "config.json")


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the old run folder, so that the fixture itself is never written to."""
    copy = tmp_path / "old_run"
    copy.mkdir()
    for name in RUN_FILES:
        shutil.copy2(OLD_RUN / name, copy / name)
    return copy


def test_fixture_is_complete():
    missing = [name for name in RUN_FILES if not (OLD_RUN / name).is_file()]
    assert not missing, f"{OLD_RUN}: missing {missing} (note: *.pth files are git-ignored)"


def test_old_best_model_gives_the_same_output():
    model, meta, config, _ = load_trained(None, str(OLD_RUN / "best_model.pth"))
    assert config["arch"]["type"] == "UNet" and meta["num_classes"] == 5
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    assert out.shape == (1, 5, 32, 32)
    assert out.double().sum().item() == pytest.approx(1032.7430023737252, rel=1e-5)
    assert out.double().abs().sum().item() == pytest.approx(1301.1497392468154, rel=1e-5)


def test_old_checkpoint_resumes(old_run, capsys):
    code = train.main(["--resume", str(old_run / "checkpoint.pth"), "--set", "trainer.epochs=2",
                       "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with open(old_run / "metrics.csv", newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [1, 2]  # the old epoch from the checkpoint's history, then the new one
    assert torch.load(old_run / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_old_best_model_runs_inference(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "predictions"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "photo.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    code = inference.main(["-m", str(OLD_RUN / "best_model.pth"), "-i", str(images), "-o", str(out),
                           "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    prediction = out / "photo.png"
    assert prediction.is_file()
    image = cv2.imread(str(prediction), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.shape[:2] == (32, 32)


def test_old_config_loads():
    config = load_config(str(OLD_RUN / "config.json"))
    assert config["arch"]["type"] == "UNet"
    assert config["arch"]["args"]["base_channels"] == 4 and config["arch"]["args"]["depth"] == 2
    assert config["train_loader"]["type"] == "SyntheticShapes"
