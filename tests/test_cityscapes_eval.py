"""Our Cityscapes IoU / iIoU against the official cityscapesscripts evaluation on the same files."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataloader.cityscapes import AVERAGE_INSTANCE_SIZE, TRAIN_TO_LABEL_ID, Cityscapes

official = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")

H, W = 24, 32


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label ids, instance ids and a noisy train-id prediction for one synthetic street image."""
    rng = np.random.default_rng(seed)
    label = np.full((H, W), 7, np.uint8)  # road
    label[:8] = 23                        # sky
    label[8:12, :10] = 11                 # building
    label[8:12, 10:14] = 4                # static (void)
    label[0, :] = 0                       # unlabeled (void)
    instances = label.astype(np.uint16)
    for k, (label_id, top, left, h, w) in enumerate([(26, 14, 2, 5, 8), (26, 15, 14, 4, 4), (24, 12, 24, 9, 3),
                                                     (33, 18, 20, 3, 3), (29, 12, 28, 3, 3)]):
        label[top:top + h, left:left + w] = label_id
        instances[top:top + h, left:left + w] = label_id * 1000 + k + seed
    label[20:23, 0:2] = 26                # a car group without instance id
    instances[20:23, 0:2] = 26
    train = Cityscapes.label_lut(255)[label]
    pred = np.where(train == 255, 0, train).astype(np.int64)
    noise = rng.random((H, W)) < 0.2
    pred[noise] = rng.integers(0, 19, size=int(noise.sum()))
    return label, instances, pred


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    """The target a Cityscapes loader gives for these label ids."""
    return Cityscapes.label_lut(255)[label_ids]


def run_official(tmp_path: Path, scenes) -> dict:
    preds, gts = [], []
    for i, (label, instances, pred) in enumerate(scenes):
        gt = tmp_path / "gtFine" / "val" / "city" / f"city_000000_{i:06d}_gtFine_labelIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(gt), label)
        cv2.imwrite(str(gt).replace("labelIds", "instanceIds"), instances)
        out = tmp_path / "pred" / f"city_000000_{i:06d}.png"
        out.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(out), Cityscapes.to_label_ids(pred))
        preds.append(str(out))
        gts.append(str(gt))
    official.args.quiet = True
    official.args.JSONOutput = False
    official.args.evalInstLevelScore = True
    return official.evaluateImgLists(preds, gts, official.args)


def test_iou_and_iiou_equal_the_official_script(tmp_path, monkeypatch):
    # The script calls np.in1d, which NumPy 2.4 removed; np.isin is its documented replacement.
    if not hasattr(np, "in1d"):
        monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(),
                            raising=False)
    scenes = [scene(seed) for seed in range(3)]
    expected = run_official(tmp_path, scenes)
    evaluator = Cityscapes.benchmark_evaluator(255)
    for label, instances, pred in scenes:
        evaluator.update(torch.from_numpy(pred), torch.from_numpy(train_ids(label)), instances)
    result = evaluator.result()
    for name in Cityscapes.class_names:
        ours, theirs = result["class_iou"][name], expected["classScores"][name]
        assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) < 1e-6, name
    for name in AVERAGE_INSTANCE_SIZE:
        ours, theirs = result["class_iiou"][name], expected["classInstScores"][name]
        assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) < 1e-6, name
    assert abs(result["mIoU"] - expected["averageScoreClasses"]) < 1e-6
    assert abs(result["iIoU"] - expected["averageScoreInstClasses"]) < 1e-6
    # The fixture exercises what matters: classes without any pixel, and real instance scores.
    assert math.isnan(result["class_iou"]["train"]) or result["class_iou"]["train"] == 0.0
    assert 0 < result["class_iiou"]["car"] < 1 and 0 < result["iIoU"] < 1


def test_perfect_prediction_scores_one_and_void_never_counts():
    label, instances, _ = scene(0)
    pred = Cityscapes.label_lut(255)[label].astype(np.int64)
    pred[pred == 255] = 2  # void pixels predicted as building: not a false positive
    evaluator = Cityscapes.benchmark_evaluator(255)
    evaluator.update(pred, train_ids(label), instances)
    result = evaluator.result()
    present = {"road", "sky", "building", "car", "person", "bicycle"}
    assert {k for k, v in result["class_iou"].items() if not math.isnan(v)} == present
    assert all(result["class_iou"][k] == 1.0 for k in present) and result["mIoU"] == 1.0
    assert result["class_iiou"]["car"] == 1.0 and result["iIoU"] == 1.0


def test_iiou_weights_instances_by_average_size_over_their_size():
    label = np.full((4, 10), 7, np.uint8)
    instances = label.astype(np.uint16)
    label[0, :2] = 26      # car A: 2 px
    instances[0, :2] = 26001
    label[1:4, :4] = 26    # car B: 12 px
    instances[1:4, :4] = 26002
    pred = np.zeros((4, 10), np.int64)  # all road
    pred[0, 0] = 13                     # 1 of A's 2 px found
    pred[1:4, :2] = 13                  # 6 of B's 12 px found
    pred[3, 9] = 13                     # one road pixel called car: FP 1
    evaluator = Cityscapes.benchmark_evaluator(255)
    evaluator.update(pred, train_ids(label), instances)
    size = AVERAGE_INSTANCE_SIZE["car"]
    tp = 1 * size / 2 + 6 * size / 12
    fn = 1 * size / 2 + 6 * size / 12
    assert evaluator.result()["class_iiou"]["car"] == pytest.approx(tp / (tp + 1 + fn), abs=1e-12)
    assert evaluator.result()["class_iou"]["car"] == pytest.approx(7 / (7 + 1 + 7))


def test_without_instance_maps_iiou_is_nan_and_bad_inputs_are_refused():
    evaluator = Cityscapes.benchmark_evaluator(255)
    label, _, pred = scene(1)
    evaluator.update(pred, train_ids(label))
    assert math.isnan(evaluator.result()["iIoU"]) and not math.isnan(evaluator.result()["mIoU"])
    with pytest.raises(ValueError, match="full resolution"):
        evaluator.update(pred[:-1], train_ids(label))
    with pytest.raises(ValueError, match="train ids 0-18"):
        evaluator.update(np.full_like(pred, 19), train_ids(label))
    with pytest.raises(ValueError, match="or 255"):
        evaluator.update(pred, label)  # label ids are not train ids
    assert len(TRAIN_TO_LABEL_ID) == 19


def test_validation_reports_the_benchmarks_iiou(tmp_path, tiny_config):
    """A validation split with instance maps adds iIoU (mean and per class) to the epoch's row."""
    import torch

    from test_datasets import write_city
    from test_trainer import make_trainer

    root = tmp_path / "cityscapes"
    for stem, city in (("aachen_000000_000019", "aachen"), ("bochum_000000_000313", "bochum")):
        write_city(root, "train", stem, city=city)
    write_city(root, "val", "frankfurt_000000_000294", city="frankfurt")
    tiny_config["train_loader"] = {"type": "Cityscapes", "args": {"data_dir": str(root), "split": "train",
                                                                  "batch_size": 2}}
    tiny_config["val_loader"] = {"type": "Cityscapes", "args": {"data_dir": str(root), "split": "val",
                                                                "batch_size": 1, "instance_maps": True}}
    tiny_config["trainer"].update(epochs=1, monitor="max iIoU")
    trainer = make_trainer(tiny_config, tmp_path / "run")
    row = trainer.train()["last_metrics"]

    model = trainer.unwrapped_model.eval()
    image, label, instances = trainer.val_loader.dataset[0]
    with torch.no_grad():
        pred = model(trainer._to_device(image[None], label[None])[0])["out"].argmax(1)[0]
    expected = Cityscapes.benchmark_evaluator(255)
    expected.update(pred, label, instances)
    scores = expected.result()
    assert row["iIoU"] == pytest.approx(scores["iIoU"], abs=1e-12)
    assert row["iiou/car"] == pytest.approx(scores["class_iiou"]["car"], abs=1e-12)
    assert set(k for k in row if k.startswith("iiou/")) == {f"iiou/{n}" for n in scores["class_iiou"]}
