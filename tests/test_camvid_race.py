"""tools.bench.camvid_race: the one scoring function (a hand-made confusion, the upsampling to the
label's full size), the peer's folder of symlinks, and the CPU time of a process tree."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.bench import camvid_race
from tools.bench.camvid_race import (
    build_peer_data,
    predict_full,
    score,
    split_pairs,
    tree_cpu_seconds,
)

CAMVID_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def write_pair(folder: Path, split: str, name: str, value: int, label: np.ndarray) -> None:
    (folder / split).mkdir(parents=True, exist_ok=True)
    (folder / f"{split}annot").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*label.shape, 3), value, dtype=np.uint8)).save(folder / split / f"{name}.png")
    Image.fromarray(label.astype(np.uint8)).save(folder / f"{split}annot" / f"{name}.png")


def constant_forward(x: torch.Tensor) -> torch.Tensor:
    """Class 0 everywhere for a black image, class 1 for a white one; a huge void (12th) channel."""
    logits = torch.zeros(x.shape[0], 12, *x.shape[-2:])
    logits[:, 0 if x.mean() < 128 else 1] = 1.0
    logits[:, 11] = 100.0  # the peer's void output: never predicted
    return logits


def test_score_one_confusion_over_the_split(tmp_path):
    # image a (black -> class 0): 12 px of class 0, 6 of class 1, 6 void (11)
    a = np.array([[0] * 6, [0] * 6, [1] * 6, [11] * 6])
    # image b (white -> class 1): 12 px of class 1, 12 of class 2
    b = np.array([[1] * 6, [1] * 6, [2] * 6, [2] * 6])
    write_pair(tmp_path, "val", "a", 0, a)
    write_pair(tmp_path, "val", "b", 255, b)
    pairs = split_pairs(tmp_path, "val")
    assert [p[0].name for p in pairs] == ["a.png", "b.png"]
    result = score(constant_forward, pairs, (2, 3))
    # confusion rows (truth) 0: [12, 0, 0], 1: [6, 12, 0], 2: [0, 12, 0]; void counted nowhere
    assert result["class_iou"][:3] == pytest.approx([12 / 18, 12 / 30, 0.0])
    assert all(v is None for v in result["class_iou"][3:])  # absent classes leave the mean
    assert result["mIoU"] == pytest.approx((12 / 18 + 12 / 30 + 0.0) / 3)
    assert result["pixel_acc"] == pytest.approx(24 / 42)


def test_logits_upsampled_to_the_full_label_size():
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        logits = torch.zeros(1, 12, *x.shape[-2:])
        logits[:, 3, :, : x.shape[-1] // 2] = 1.0
        logits[:, 5, :, x.shape[-1] // 2:] = 1.0
        logits[:, 11] = 100.0
        return logits

    image = torch.rand(1, 3, 360, 480) * 255
    prediction = predict_full(forward, image, (180, 240), (360, 480))
    assert seen == [(180, 240)]
    assert prediction.shape == (1, 360, 480)
    assert (prediction[..., :239] == 3).all() and (prediction[..., 241:] == 5).all()


def test_peer_data_links(tmp_path):
    data = tmp_path / "camvid"
    for name in ("train", "trainannot", "val", "valannot"):
        (data / name).mkdir(parents=True)
    (data / "train.txt").write_text("")
    dest = build_peer_data(data, tmp_path / "links")
    assert (dest / "test").resolve() == (data / "val").resolve()
    assert (dest / "testannot").resolve() == (data / "valannot").resolve()
    assert (dest / "train").is_symlink() and (dest / "train.txt").is_symlink()
    assert not (dest / "val.txt").exists()  # absent in the data: left out
    build_peer_data(data, dest)  # again over the same folder
    (data / "valannot").rmdir()
    with pytest.raises(FileNotFoundError, match="valannot"):
        build_peer_data(data, tmp_path / "other")


BURN = ("import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.6: pass\\ntime.sleep(60)'])\n"
        "time.sleep(60)\n")


def test_cpu_time_of_a_process_tree():
    """The grandchild's CPU time counts in the tree of the process that started it."""
    process = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        deadline = time.monotonic() + 60
        while tree_cpu_seconds(process.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tree_cpu_seconds(process.pid) >= 0.6
        children = camvid_race._children(process.pid)
        assert len(children) == 1
        assert tree_cpu_seconds(children[0]) >= 0.55
    finally:
        for pid in camvid_race._children(process.pid):
            subprocess.run(["kill", str(pid)], check=False)
        process.kill()
        process.wait()
    assert tree_cpu_seconds(process.pid) == 0.0  # gone


@pytest.mark.skipif(not (CAMVID_DIR / "val").is_dir() or not (camvid_race.PEER_DIR / "models" / "enet.py").is_file(),
                    reason="needs CamVid and the peer's folder")
def test_peer_checkpoint_scored_on_camvid(tmp_path):
    """A checkpoint in the peer's format, loaded with its own class, scores on two real images."""
    model = camvid_race.load_peer_class()(12)
    torch.save({"epoch": 10, "miou": 0.1, "state_dict": model.state_dict(), "optimizer": {}}, tmp_path / "ENet")
    result = score(camvid_race.peer_forward(tmp_path / "ENet"), split_pairs(CAMVID_DIR, "val")[:2], (90, 120))
    assert 0.0 <= result["mIoU"] <= 1.0
