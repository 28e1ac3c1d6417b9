"""Validation's metric selection, saving before validation, plain-text progress logs, the image grid."""
from __future__ import annotations

import csv
import re
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import train
from test_trainer import make_trainer
from trainer import Trainer
from utils.checkpoint import load_checkpoint

CLASSES = ("background", "disk", "square", "triangle", "ring")


def read_rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# --- A: the config's metrics section decides validation's means -----------------------------------
def test_validation_means_leave_out_the_excluded_classes(tiny_config, tmp_path):
    tiny_config["metrics"] = {"exclude": ["background"]}
    tiny_config["trainer"]["monitor"] = "max mean_f1"
    run_dir = tmp_path / "run"
    summary = make_trainer(tiny_config, run_dir).train()
    rows = read_rows(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        others = [float(row[f"iou/{name}"]) for name in CLASSES[1:] if row[f"iou/{name}"] != ""]
        assert others
        assert float(row["mIoU"]) == pytest.approx(sum(others) / len(others), rel=1e-6)
        everyone = others + [float(row["iou/background"])]
        assert float(row["mIoU"]) != pytest.approx(sum(everyone) / len(everyone), rel=1e-6)
        for key in ("mean_f1", "mean_precision", "mean_recall"):
            assert 0.0 <= float(row[key]) <= 1.0
    # The monitor may name the new means; the best epoch is that of the highest mean F1.
    best = max(rows, key=lambda row: float(row["mean_f1"]))
    assert summary["best_epoch"] == int(best["epoch"])


def test_validation_means_of_every_class_by_default(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    make_trainer(tiny_config, run_dir).train()
    row = read_rows(run_dir / "metrics.csv")[-1]
    scores = [float(row[f"iou/{name}"]) for name in CLASSES if row[f"iou/{name}"] != ""]
    assert float(row["mIoU"]) == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    assert math.isfinite(float(row["mean_f1"]))


# --- B: an error in validation keeps the epoch's training --------------------------------------------
def folder_data(root: Path, train: int = 12, val: int = 4) -> Path:
    """A Folder data set of 32x32 random images and 3-class index masks, with train and val splits."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(train + val):
        cv2.imwrite(str(root / "images" / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "masks" / f"{i}.png"), rng.integers(0, 3, (32, 32)).astype(np.uint8))
    (root / "train.txt").write_text("".join(f"{i}\n" for i in range(train)))
    (root / "val.txt").write_text("".join(f"{i}\n" for i in range(train, train + val)))
    return root


def test_a_failed_validation_resumes_from_that_validation(tiny_config, tmp_path, monkeypatch, capsys):
    data = folder_data(tmp_path / "data")
    args = {"data_dir": str(data), "classes": ["bg", "red", "green"], "batch_size": 4}
    tiny_config["train_loader"] = {"type": "Folder", "args": {**args, "split": "train", "shuffle": True}}
    tiny_config["val_loader"] = {"type": "Folder", "args": {**args, "split": "val"}}
    tiny_config["trainer"].update(epochs=3, save_period=5)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config))
    bad_mask = data / "masks" / "13.png"
    good_mask = bad_mask.read_bytes()

    validate = Trainer._valid_epoch

    def corrupting(self, epoch):
        if epoch == 2:  # the label turns bad after the first validation: a class 7 of 3
            cv2.imwrite(str(bad_mask), np.full((32, 32), 7, dtype=np.uint8))
        return validate(self, epoch)

    monkeypatch.setattr(Trainer, "_valid_epoch", corrupting)
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(bad_mask) in err, err
    state = load_checkpoint(run_dir / "checkpoint.pth")
    assert (state["epoch"], state["iteration"], state["epoch_iters"], state["epoch_done"]) == (2, 3, 3, False)
    assert [row["epoch"] for row in state["history"]] == [1]
    assert state["partial"]["count"] == 3  # the epoch's training loss is kept

    monkeypatch.undo()
    bad_mask.write_bytes(good_mask)
    validations = []

    def counting(self, epoch):
        validations.append(epoch)
        return validate(self, epoch)

    monkeypatch.setattr(Trainer, "_valid_epoch", counting)
    assert train.main(["--resume", str(run_dir / "checkpoint.pth")]) == 0
    assert "Resumed from" in (run_dir / "train.log").read_text()
    assert validations == [2, 3]
    state = load_checkpoint(run_dir / "checkpoint.pth")
    assert state["epoch"] == 3 and state["epoch_done"] and state["finished"] == "last epoch"
    assert [row["epoch"] for row in state["history"] if "mIoU" in row] == [1, 2, 3]
    assert all(math.isfinite(row["train_loss"]) for row in state["history"])
    assert [row["epoch"] for row in read_rows(run_dir / "metrics.csv")] == ["1", "2", "3"]


# --- C: progress lines when there is no progress bar to see ------------------------------------------
LINE = re.compile(r"epoch (\d+)/(\d+) \| iter (\d+)/(\d+) \| loss ([\d.]+) \| lr ([\d.e+-]+) \| ([\d.]+) img/s \| "
                  r"eta (\d+):(\d\d):(\d\d) \| rss (\d+) MiB$")


@pytest.mark.parametrize("progress_bar", [False, True])  # True: pytest's captured stderr is no terminal
def test_progress_lines_off_a_terminal(tiny_config, tmp_path, progress_bar):
    tiny_config["trainer"].update(log_per_iter=2, progress_bar=progress_bar)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_config, run_dir)
    losses, lrs, loss = [], [], trainer.loss

    def recording(logits, target):
        value = loss(logits, target)
        if torch.is_grad_enabled():
            losses.append(value.item())
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return value

    trainer.loss = recording
    trainer.train()
    lines = [LINE.search(line) for line in (run_dir / "train.log").read_text().splitlines() if "| iter " in line]
    assert all(lines) and len(lines) == 4  # 4 iterations per epoch, a line every 2, 2 epochs
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in lines] == \
        [(1, 2, 2, 4), (1, 2, 4, 4), (2, 2, 2, 4), (2, 2, 4, 4)]
    for n, match in enumerate(lines):
        pair = losses[2 * n:2 * n + 2]  # the mean since the previous line
        assert float(match[5]) == pytest.approx(sum(pair) / 2, abs=1e-4)
        assert float(match[6]) == pytest.approx(lrs[2 * n + 1], rel=1e-3)  # that of the last iteration
        assert float(match[7]) > 0  # 2 iterations x 6 images
        assert 10 < int(match[11]) < 100_000  # the process's resident memory, MiB
    eta = [int(m[8]) * 3600 + int(m[9]) * 60 + int(m[10]) for m in lines]
    assert eta[1] == eta[3] == 0 and eta[0] >= 0


# --- D: the TensorBoard grid shows images from across the validation set ----------------------------
def test_grid_indices_spread_over_the_set():
    from trainer import grid_indices

    assert grid_indices(list(range(8))) == [0, 2, 4, 7]
    assert grid_indices(list(range(101))) == [0, 33, 66, 100]
    assert grid_indices(list(range(4))) == [0, 1, 2, 3]
    assert grid_indices(list(range(2))) == [0, 1]
    assert grid_indices([]) == []
    assert grid_indices([3, 9, 12, 20, 31, 40]) == [3, 9, 20, 40]  # a process's shard


def test_the_grid_shows_the_same_spread_samples_at_every_validation(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_config["trainer"].update(tensorboard=True, epochs=2)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_config, run_dir)
    chosen, validate = [], trainer._valid_epoch

    def recording(epoch):
        row = validate(epoch)
        chosen.append(list(trainer.val_sample_indices))
        return row

    trainer._valid_epoch = recording
    trainer.train()
    assert chosen == [[0, 2, 4, 7], [0, 2, 4, 7]]  # 8 validation images
    dataset = trainer.val_loader.dataset
    expected = [dataset[(2, i)][0].numpy() for i in (0, 2, 4, 7)]  # uint8 (H, W, 3)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("val/image_groundtruth_prediction")
    assert len(grids) == 2
    for grid in grids:
        decoded = cv2.imdecode(np.frombuffer(grid.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert decoded.shape == (4 * 32, 3 * 32, 3)
        for row, image in enumerate(expected):
            assert np.array_equal(decoded[row * 32:(row + 1) * 32, :32], image)
