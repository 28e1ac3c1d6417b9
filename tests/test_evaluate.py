"""Scoring a trained model on the config's validation set without training (python -m tools.evaluate)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import pytest
import torch
from PIL import Image

import inference
import train
from dataloader.synthetic import make_sample
from tests.conftest import TINY_CONFIG
from tools import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, Path]:
    """A tiny trained run (whole-image validation of 8 synthetic 32x32 images): (config path, run folder)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(config_path), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    return str(config_path), run_dir


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_evaluate_scores_the_validation_set_as_training_and_inference_do(trained, tmp_path, capsys):
    config_path, run_dir = trained
    best = run_dir / "best_model.pth"
    out = tmp_path / "evaluation"
    assert evaluate.main(["-m", str(best), "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    scores = results(out)
    assert scores["num_images"] == TINY_CONFIG["val_loader"]["args"]["num_samples"]
    assert {"results.json", "results.txt", "confusion_matrix.png", "worst"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "worst").glob("*.png"))) == 5
    assert f"mIoU           {scores['mIoU']:.4f}" in printed and f"Wrote {out}" in printed

    # The validation of the same weights while training (whole images, no transforms) scored the same.
    saved = torch.load(best, weights_only=True)
    history = torch.load(run_dir / "checkpoint.pth", weights_only=True)["history"]
    recorded = next(row for row in history if row["epoch"] == saved["epoch"])
    assert scores["mIoU"] == pytest.approx(recorded["mIoU"], abs=1e-9)
    assert scores["mIoU"] == pytest.approx(saved["metrics"]["mIoU"], abs=1e-9)
    assert scores["pixel_acc"] == pytest.approx(recorded["pixel_acc"], abs=1e-9)

    # inference.py --labels on the same images (written as files) reports the same scores.
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(scores["num_images"]):
        image, label = make_sample(0, "val", i, 32)
        cv2.imwrite(str(images / f"{i}.png"), image[..., ::-1])
        Image.fromarray(label).save(labels / f"{i}.png")
    folder = tmp_path / "inference"
    assert inference.main(["-m", str(best), "-i", str(images), "--labels", str(labels), "-o", str(folder),
                           "--device", "cpu"]) == 0
    by_inference = results(folder)
    assert by_inference["num_images"] == scores["num_images"]
    assert by_inference["mIoU"] == pytest.approx(scores["mIoU"], abs=1e-12)
    assert by_inference["class_iou"] == scores["class_iou"]
    assert (folder / "results.txt").read_text().split("worst images")[0] == \
        (out / "results.txt").read_text().split("worst images")[0]


def test_evaluate_in_other_modes_with_the_default_folder(trained, capsys):
    config_path, run_dir = trained
    assert evaluate.main(["-c", config_path, "-m", str(run_dir / "checkpoint.pth"), "--device", "cpu",
                          "--mode", "sliding", "--tile", "16", "16", "--flip", "--worst", "0"]) == 0
    out = run_dir / "evaluation"
    assert results(out)["num_images"] == 8 and not (out / "worst").exists()
    assert evaluate.main(["-m", str(run_dir / "checkpoint.pth"), "--device", "cpu", "--mode", "multiscale",
                          "--scales", "0.75,1.0", "-o", str(out / "ms")]) == 0
    assert 0 <= results(out / "ms")["mIoU"] <= 1


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    config_path, run_dir = trained
    config = json.loads(Path(config_path).read_text())
    config["val_loader"] = None
    no_val = tmp_path / "no_val.json"
    no_val.write_text(json.dumps(config))
    assert evaluate.main(["-c", str(no_val), "-m", str(run_dir / "best_model.pth"), "--device", "cpu",
                          "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: val_loader: the config has no validation set to score (val_loader is null)"
    assert not (tmp_path / "o").exists()
