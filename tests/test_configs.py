"""Every shipped model example (config.json and configs/camvid_*.json) loads, and its model builds and runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builder import build_model, dataset_class
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "config.json", *sorted((ROOT / "configs").glob("camvid_*.json"))]
#: Every shipped config, including those whose data sets are not on this machine.
ALL_CONFIGS = [ROOT / "config.json", *sorted((ROOT / "configs").glob("*.json"))]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.name for p in ALL_CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config["arch"]["type"] and config["train_loader"]["type"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_builds_its_model(path):
    config = load_config(path)
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 80))
    assert set(out) == {"out"}
    assert out["out"].shape == (1, dataset_class(config).num_classes(), 64, 80)


def test_every_model_has_a_shipped_example():
    from utils.registry import MODELS

    shipped = {load_config(path)["arch"]["type"] for path in CONFIGS}
    mine = {"FCN", "FCN8s", "DeepLabV3", "DeepLabV3Plus", "PSPNet", "UPerNet", "UNet", "FPN", "GCN", "DUCHDC"}
    assert mine <= shipped <= set(MODELS.names())
