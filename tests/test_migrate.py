"""Converting configs of the pytorch-segmentation template (python -m tools.migrate)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from tools import migrate
from utils.checkpoint import load_checkpoint
from utils.config import import_components, validate_config
from utils.registry import DATASETS, MODELS

# The template's shipped PSPNet config, on Cityscapes (written from the template's layout, not fetched).
TEMPLATE_PSPNET = {
    "name": "PSPNet",
    "n_gpu": 1,
    "use_synch_bn": False,
    "arch": {"type": "PSPNet", "args": {"backbone": "resnet50", "freeze_bn": False, "freeze_backbone": False}},
    "train_loader": {"type": "CityScapes", "args": {
        "data_dir": "data/cityscapes", "batch_size": 8, "base_size": 1024, "crop_size": 512, "augment": True,
        "shuffle": True, "scale": True, "flip": True, "rotate": True, "blur": False, "split": "train",
        "num_workers": 8}},
    "val_loader": {"type": "CityScapes", "args": {
        "data_dir": "data/cityscapes", "batch_size": 8, "crop_size": 512, "val": True, "split": "val",
        "num_workers": 4}},
    "optimizer": {"type": "SGD", "differential_lr": True, "args": {"lr": 0.01, "weight_decay": 1e-4,
                                                                   "momentum": 0.9}},
    "loss": "CrossEntropyLoss2d",
    "ignore_index": 255,
    "lr_scheduler": {"type": "Poly", "args": {}},
    "trainer": {"epochs": 80, "save_dir": "saved/", "save_period": 10, "monitor": "max Mean_IoU", "early_stop": 10,
                "tensorboard": True, "log_dir": "saved/runs", "log_per_iter": 20, "val": True, "val_per_epochs": 5},
}

CONVERTED_TRAIN_TRANSFORMS = [
    {"type": "Resize", "args": {"size": 512}},  # the longer side to 1024 = the shorter to 512 on 2:1 images
    {"type": "RandomScale", "args": {"min_scale": 0.5, "max_scale": 2.0}},
    {"type": "RandomRotate", "args": {"degrees": 10.0}},
    {"type": "RandomCrop", "args": {"size": 512}},
    {"type": "RandomHorizontalFlip", "args": {"p": 0.5}},
]


def write(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def test_the_template_pspnet_config_converts_to_ours():
    new, changes, unmapped = migrate.migrate(TEMPLATE_PSPNET)
    assert unmapped == []
    assert new["arch"] == {"type": "PSPNet", "args": {"backbone": "resnet50", "freeze_bn": False,
                                                      "freeze_backbone": False, "pretrained": True}}
    assert new["train_loader"] == {"type": "Cityscapes", "args": {
        "data_dir": "data/cityscapes", "batch_size": 8, "shuffle": True, "split": "train", "num_workers": 8,
        "transforms": CONVERTED_TRAIN_TRANSFORMS}}
    assert new["val_loader"] == {"type": "Cityscapes", "args": {
        "data_dir": "data/cityscapes", "batch_size": 8, "split": "val", "num_workers": 4,
        "transforms": [{"type": "Resize", "args": {"size": 512}}]}}
    assert new["loss"] == "CrossEntropyLoss"
    assert new["trainer"] == {**TEMPLATE_PSPNET["trainer"], "monitor": "max mIoU"}
    for key in ("name", "n_gpu", "use_synch_bn", "optimizer", "ignore_index", "lr_scheduler"):
        assert new[key] == TEMPLATE_PSPNET[key]
    assert "loss: 'CrossEntropyLoss2d' -> 'CrossEntropyLoss'" in changes
    assert "trainer.monitor: 'max Mean_IoU' -> 'max mIoU'" in changes
    assert "train_loader.type: 'CityScapes' -> 'Cityscapes'" in changes
    assert migrate.looks_like_template(TEMPLATE_PSPNET) and not migrate.looks_like_template(new)
    assert TEMPLATE_PSPNET["loss"] == "CrossEntropyLoss2d"  # the input is left alone
    validate_config(new)


@pytest.mark.parametrize("dataset, args, expected_type, expected_args", [
    ("VOC", {"data_dir": "data", "split": "train_aug"}, "PascalVOC",
     {"data_dir": str(Path("data/VOCdevkit/VOC2012")), "split": "train_aug"}),
    ("ADE20K", {"data_dir": "data/ade", "split": "training"}, "ADE20K", {"data_dir": "data/ade", "split": "train"}),
    ("COCO", {"data_dir": "data/coco", "split": "train", "partition": "CocoStuff10k"}, "COCOStuff10k",
     {"data_dir": "data/coco", "split": "train"}),
    ("COCO", {"data_dir": "data/coco", "split": "val2017"}, "COCOStuff164k", {"data_dir": "data/coco", "split": "val"}),
], ids=["VOC", "ADE20K", "COCO10k", "COCO164k"])
def test_each_template_data_set_maps_to_ours(dataset, args, expected_type, expected_args):
    old = copy.deepcopy(TEMPLATE_PSPNET)
    old["train_loader"] = {"type": dataset, "args": {**args, "base_size": 400, "crop_size": 380, "augment": True,
                                                     "scale": False, "flip": True, "blur": True}}
    old["val_loader"] = None
    new, changes, unmapped = migrate.migrate(old)
    assert unmapped == []
    assert new["train_loader"] == {"type": expected_type, "args": {**expected_args, "transforms": [
        {"type": "Resize", "args": {"size": 400}},  # no 2:1 rule outside Cityscapes
        {"type": "RandomCrop", "args": {"size": 380}},
        {"type": "RandomHorizontalFlip", "args": {"p": 0.5}},
        {"type": "GaussianBlur", "args": {"p": 1.0, "max_sigma": 1.0}}]}}
    assert any("Resize sets the shorter side" in line for line in changes)


def test_names_are_mapped_and_the_rest_reported(tmp_path, capsys):
    old = copy.deepcopy(TEMPLATE_PSPNET)
    old["arch"] = {"type": "DeepLab", "args": {"backbone": "resnet50", "output_stride": 16, "my_flag": True}}
    old["train_loader"]["args"]["augment"] = False
    old["loss"] = "MyOwnLoss"
    old["trainer"]["monitor"] = "max Pixel_Accuracy"
    new_path = tmp_path / "new.json"
    assert migrate.main([write(tmp_path / "old.json", old), "-o", str(new_path)]) == 1
    out = capsys.readouterr().out
    new = json.loads(new_path.read_text())
    assert new["arch"]["type"] == "DeepLabV3Plus" and new["arch"]["args"]["my_flag"] is True
    assert new["train_loader"]["args"]["transforms"] == []  # augment false: the template did nothing
    assert new["trainer"]["monitor"] == "max pixel_acc"
    assert "  arch.type: 'DeepLab' -> 'DeepLabV3Plus'" in out
    assert "  NOT MAPPED loss: 'MyOwnLoss' is not a loss of the template (left as it was)" in out
    assert "  NOT MAPPED arch.args.my_flag: DeepLabV3Plus has no such argument (left as it was)" in out
    assert f"{new_path} does not validate yet:" in out
    assert "loss.type: unknown loss 'MyOwnLoss'" in out


def test_the_template_aux_flag_is_our_aux_head():
    old = copy.deepcopy(TEMPLATE_PSPNET)
    old["arch"]["args"]["use_aux"] = False
    new, changes, unmapped = migrate.migrate(old)
    assert new["arch"]["args"]["aux_head"] is False and "use_aux" not in new["arch"]["args"]
    assert "arch.args.use_aux: 'use_aux' -> 'aux_head' (renamed)" in changes and unmapped == []


def test_train_py_recognises_a_template_config(tmp_path, capsys):
    path = write(tmp_path / "old.json", TEMPLATE_PSPNET)
    assert train.main(["-c", path]) == 2
    err = capsys.readouterr().err
    assert (f"error: {path} looks like a config of the pytorch-segmentation template; convert it with: "
            f"python -m tools.migrate {path} -o NEW.json") in err
    assert "loss.type: unknown loss 'CrossEntropyLoss2d'. Did you mean 'CrossEntropyLoss'?" in err


def write_cityscapes(root: Path, split: str, count: int) -> None:
    """A tiny Cityscapes tree: 32x64 images whose labels use road (7), car (26) and unlabelled (0)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        stem = f"aachen_000000_{i:06d}"
        label = np.full((32, 64), 7, dtype=np.uint8)
        label[8:24, 20 + i:40 + i] = 26
        label[:2] = 0
        image = rng.integers(0, 80, (32, 64, 3), dtype=np.uint8)
        image[label == 26] = (200, 30, 30)
        for folder, name, array in (("leftImg8bit", "leftImg8bit", image), ("gtFine", "gtFine_labelIds", label)):
            path = root / folder / split / "aachen" / f"{stem}_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


@pytest.mark.slow  # about 10 s: PSPNet on 4 images
def test_the_converted_pspnet_config_trains_on_cityscapes(tmp_path, capsys):
    import_components()
    if "PSPNet" not in MODELS or "Cityscapes" not in DATASETS:
        pytest.skip("needs the PSPNet model and the Cityscapes data set registered")
    data = tmp_path / "cityscapes"
    write_cityscapes(data, "train", 4)
    write_cityscapes(data, "val", 2)
    new_path = tmp_path / "new.json"
    assert migrate.main([write(tmp_path / "old.json", TEMPLATE_PSPNET), "-o", str(new_path)]) == 0
    transforms = "train_loader.args.transforms"
    overrides = [  # the converted file, shrunk to the fixture: no ImageNet download, small sizes
        "arch.args.pretrained=false", "arch.args.backbone=resnet18",
        f"train_loader.args.data_dir={data}", f"val_loader.args.data_dir={data}",
        "train_loader.args.batch_size=2", "val_loader.args.batch_size=2",
        "train_loader.args.num_workers=0", "val_loader.args.num_workers=0",
        f"{transforms}[0].args.size=32", f"{transforms}[3].args.size=32", "val_loader.args.transforms[0].args.size=32",
        "trainer.epochs=1", "trainer.tensorboard=false", "trainer.progress_bar=false", f"trainer.save_dir={tmp_path}"]
    args = ["-c", str(new_path), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert train.main(args + [item for o in overrides for item in ("--set", o)]) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert state["arch"] == "PSPNet" and state["num_classes"] == 19
    assert state["lr_scheduler"]["last_epoch"] == 2  # 4 images in batches of 2
    assert 0 <= state["history"][0]["mIoU"] <= 1


# The template's default config.json: PSPNet on VOC, validating every 5 epochs on whole VOC images
# (variable sizes) resized by their shorter side, 8 a batch.
TEMPLATE_VOC = {
    **copy.deepcopy(TEMPLATE_PSPNET),
    "train_loader": {"type": "VOC", "args": {
        "data_dir": "data/", "batch_size": 8, "base_size": 400, "crop_size": 380, "augment": True, "shuffle": True,
        "scale": True, "flip": True, "rotate": True, "blur": False, "split": "train_aug", "num_workers": 8}},
    "val_loader": {"type": "VOC", "args": {
        "data_dir": "data/", "batch_size": 8, "crop_size": 480, "val": True, "split": "val", "num_workers": 4}},
    "trainer": {**TEMPLATE_PSPNET["trainer"], "val_per_epochs": 5},
}


def test_the_template_voc_config_validates_one_image_a_batch(tmp_path, capsys):
    new_path = tmp_path / "new.json"
    assert migrate.main([write(tmp_path / "old.json", TEMPLATE_VOC), "-o", str(new_path)]) == 0
    out = capsys.readouterr().out
    new = json.loads(new_path.read_text())
    validate_config(new)
    assert f"{new_path} is a valid config" in out
    assert new["val_loader"]["args"]["batch_size"] == 1
    assert new["val_loader"]["args"]["transforms"] == [{"type": "Resize", "args": {"size": 480}}]
    assert new["train_loader"]["args"]["batch_size"] == 8  # random crops: one size
    assert "  val_loader.args.batch_size: 8 -> 1 (validation images are scored whole and PascalVOC's may " \
           "differ in size: a batch of several could not be stacked)" in out
    # Cityscapes images all have one size, and so do they resized by their shorter side: the batch stays.
    assert migrate.migrate(TEMPLATE_PSPNET)[0]["val_loader"]["args"]["batch_size"] == 8


def write_voc(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    """A VOC2012 tree of JPEG images (and index labels) of the given (height, width) per split."""
    rng = np.random.default_rng(0)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, shapes in sizes.items():
        names = [f"{split}_{i}" for i in range(len(shapes))]
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name, (height, width) in zip(names, shapes):
            for folder, array in (("JPEGImages", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                                  ("SegmentationClass", rng.integers(0, 21, (height, width), dtype=np.uint8)),
                                  ("SegmentationClassAug", rng.integers(0, 21, (height, width), dtype=np.uint8))):
                (root / folder).mkdir(exist_ok=True)
                Image.fromarray(array).save(root / folder / f"{name}.{'jpg' if folder == 'JPEGImages' else 'png'}")
    return root


def test_train_refuses_a_val_batch_over_images_of_several_sizes_before_anything_is_created(tmp_path, capsys):
    data = write_voc(tmp_path / "VOC2012", {"train_aug": [(40, 48)] * 2, "val": [(40, 48), (48, 40), (40, 48)]})
    new_path = tmp_path / "new.json"
    assert migrate.main([write(tmp_path / "old.json", TEMPLATE_VOC), "-o", str(new_path)]) == 0
    saved = tmp_path / "saved"
    overrides = ["arch.args.pretrained=false", "arch.args.backbone=resnet18", f"train_loader.args.data_dir={data}",
                 f"val_loader.args.data_dir={data}", "train_loader.args.batch_size=2", "val_loader.args.batch_size=4",
                 "train_loader.args.num_workers=0", "val_loader.args.num_workers=0", f"trainer.save_dir={saved}"]
    capsys.readouterr()
    assert train.main(["-c", str(new_path), "--device", "cpu", *[x for o in overrides for x in ("--set", o)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: val_loader.args.batch_size: 4 images a batch, but the images differ in size "
                          f"(40x48 {data / 'JPEGImages' / 'val_0.jpg'}, 48x40 {data / 'JPEGImages' / 'val_1.jpg'}; "
                          "height x width) and val_loader.args.transforms do not bring them to one; "
                          "set val_loader.args.batch_size to 1")
    assert len(err.splitlines()) == 1
    assert not saved.exists()  # no run folder


@pytest.mark.parametrize("transforms, batch_size, refused", [
    ([{"type": "Resize", "args": {"size": 32}}], 1, None),  # one image a batch: any sizes
    ([{"type": "Resize", "args": {"size": [32, 32]}}], 4, None),  # one size
    ([{"type": "Resize", "args": {"size": 32}}], 4, "the images differ in size"),  # shorter side: still several
    ([{"type": "RandomScale"}, {"type": "RandomCrop", "args": {"size": 24}}], 4, None),
    ([{"type": "RandomCrop", "args": {"size": 24}}, {"type": "RandomScale"}], 4, "vary by chance (RandomScale)"),
])
def test_val_batches_are_checked_when_the_loader_is_built(tmp_path, tiny_config, transforms, batch_size, refused):
    from builder import build_loader
    from utils.config import load_config
    from utils.errors import ConfigError

    data = write_voc(tmp_path / "VOC2012", {"val": [(40, 48), (48, 40)]})
    tiny_config["val_loader"] = {"type": "PascalVOC", "args": {"data_dir": str(data), "split": "val",
                                                              "batch_size": batch_size, "transforms": transforms}}
    tiny_config["train_loader"] = {**tiny_config["val_loader"], "args": {
        **tiny_config["val_loader"]["args"], "transforms": [{"type": "RandomCrop", "args": {"size": 24}}]}}
    config = load_config(None, base=tiny_config)
    if refused is None:
        assert len(build_loader(config, "val_loader").dataset) == 2
    else:
        with pytest.raises(ConfigError, match=f"^val_loader.args.batch_size: {batch_size} images a batch, .*"
                                              f"{re.escape(refused)}.*set val_loader.args.batch_size to 1"):
            build_loader(config, "val_loader")
