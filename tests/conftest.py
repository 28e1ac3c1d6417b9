"""Shared fixtures: a tiny but complete training configuration."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

CAMVID_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"

TINY_CONFIG = {
    "name": "tiny",
    "seed": 7,
    "arch": {"type": "UNet", "args": {"base_channels": 4, "depth": 2}},
    "train_loader": {"type": "SyntheticShapes", "args": {
        "split": "train", "num_samples": 24, "image_size": 32, "batch_size": 6, "shuffle": True,
        "transforms": [{"type": "RandomScale", "args": {"min_scale": 0.8, "max_scale": 1.25}},
                       {"type": "RandomCrop", "args": {"size": 32}},
                       {"type": "RandomHorizontalFlip"}]}},
    "val_loader": {"type": "SyntheticShapes", "args": {
        "split": "val", "num_samples": 8, "image_size": 32, "batch_size": 4}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9}},
    "loss": "CrossEntropyLoss",
    "lr_scheduler": {"type": "Poly", "args": {"power": 0.9}},
    "trainer": {"epochs": 2, "save_dir": "saved", "monitor": "max mIoU", "tensorboard": False,
                "progress_bar": False, "log_per_iter": 1},
}


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of a config that trains a 4-channel UNet on 24 synthetic images."""
    return copy.deepcopy(TINY_CONFIG)
