"""The first hour with your own data: Folder's classes and mask formats, config paths, failed starts
that leave nothing behind, errors that reach train.log, and class weights that are logged and counted
on the whole training split."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import builder
import train
from dataloader.folder import Folder
from models.losses.class_weights import describe_class_weights
from utils.config import PROJECT_ROOT, load_config, resolve_path, validate_config
from utils.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bg", "crack", "rust"]
# Image a has 8 crack pixels in its first row; b, c, d are all background; rust occurs nowhere.
CRACK_ROW = np.zeros((8, 8), np.uint8)
CRACK_ROW[0] = 1
# Median frequency by hand: freq(bg) = 248 / 256 (in all four images), freq(crack) = 8 / 64 (in image a);
# median 0.546875.
FULL_WEIGHTS = [0.546875 / (248 / 256), 0.546875 / (8 / 64), 0.0]
# On image a alone: freq(bg) = 56 / 64, freq(crack) = 8 / 64, median 0.5.
SUBSET_WEIGHTS = [0.5 / (56 / 64), 0.5 / (8 / 64), 0.0]


def write_data(root: Path, masks: dict[str, np.ndarray] | None = None) -> Path:
    """``images/`` and ``masks/`` of four 8x8 samples a-d (masks: index masks, CRACK_ROW for a)."""
    masks = masks if masks is not None else {"a": CRACK_ROW, **{s: np.zeros((8, 8), np.uint8) for s in "bcd"}}
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, mask in masks.items():
        cv2.imwrite(str(root / "images" / f"{stem}.png"), np.full((8, 8, 3), 90 + 10 * ord(stem) % 50, np.uint8))
        assert cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return root


def folder_config(data_dir: str, save_dir: str, **data_args) -> dict:
    return {"name": "mine", "seed": 3,
            "arch": {"type": "UNet", "args": {"base_channels": 4, "depth": 2}},
            "train_loader": {"type": "Folder", "args": {"data_dir": data_dir, "classes": CLASSES,
                                                        "batch_size": 2, **data_args}},
            "optimizer": {"type": "SGD", "args": {"lr": 0.01}},
            "trainer": {"epochs": 1, "save_dir": save_dir, "monitor": "off", "tensorboard": False,
                        "progress_bar": False}}


def write_config(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def files_below(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


# --- Folder: classes, void colours, mask formats ---------------------------------------------------

def test_config_classes_that_differ_from_classes_json_are_an_error_naming_both(tmp_path):
    data = write_data(tmp_path / "data")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["bg", "crack", "dent"]}))
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path / "c.json", folder_config(str(data), str(tmp_path / "saved"))))
    assert (f"train_loader.args: Folder: the config's classes ['bg', 'crack', 'rust'] differ from those of "
            f"{tmp_path / 'classes.json'} ['bg', 'crack', 'dent']") in str(caught.value)
    # Colours too: the file's are not silently replaced.
    (tmp_path / "classes.json").write_text(json.dumps({"classes": CLASSES, "colors": [[0, 0, 0], [1, 1, 1],
                                                                                      [2, 2, 2]]}))
    with pytest.raises(ConfigError, match=r"the config's colors \[\[0, 0, 0\], \[9, 9, 9\], \[2, 2, 2\]\] differ"):
        Folder.info({"data_dir": str(data), "classes": CLASSES, "colors": [[0, 0, 0], [9, 9, 9], [2, 2, 2]]})


def test_config_classes_that_agree_with_classes_json_say_so_and_take_its_colours(tmp_path):
    data = write_data(tmp_path / "data")
    (data / "classes.json").write_text(json.dumps({"classes": CLASSES, "colors": [[0, 0, 0], [1, 1, 1],
                                                                                  [2, 2, 2]]}))
    info = Folder.info({"data_dir": str(data), "classes": CLASSES})
    assert info.source == f"from the config; {data / 'classes.json'} lists the same"
    assert info.palette == ((0, 0, 0), (1, 1, 1), (2, 2, 2))
    assert Folder.info({"data_dir": str(data)}).source == f"from {data / 'classes.json'}"
    assert Folder.info({"data_dir": str(tmp_path / "elsewhere"), "classes": CLASSES}).source == "from the config"


def test_void_colors_with_index_masks_is_a_config_error_naming_the_key(tmp_path):
    data = write_data(tmp_path / "data")
    config = folder_config(str(data), str(tmp_path / "saved"), void_colors=[[255, 255, 255]])
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path / "c.json", config))
    assert ('train_loader.args: Folder: void_colors is set, but mask_format is "index": void colours only '
            'apply to colour masks') in str(caught.value)
    with pytest.raises(ConfigError, match="void_colors is set"):
        Folder(str(data), classes=CLASSES, void_colors=[[1, 2, 3]])
    # An index-mask model whose saved label args carry void colours still reads its labels.
    assert Folder.label_decoder({"classes": CLASSES, "void_colors": [[1, 2, 3]]}, 255)(
        data / "masks" / "a.png").tolist() == CRACK_ROW.tolist()


def test_mask_errors_name_the_mask_format_setting_that_fixes_them(tmp_path):
    data = tmp_path / "data"
    write_data(data, {"a": np.zeros((8, 8), np.uint8)})
    cv2.imwrite(str(data / "masks" / "a.png"), np.zeros((8, 8, 3), np.uint8))  # a colour mask
    with pytest.raises(DataError) as caught:
        Folder(str(data), classes=CLASSES)[0]
    assert str(caught.value) == (
        f"{data / 'masks' / 'a.png'}: label has 3 channels; expected a single-channel image of class indices; "
        'if the masks are colour images, set "mask_format": "color" (with "colors", one [r, g, b] per class) '
        "in the data set's args")
    colors = [[0, 0, 0], [0, 0, 200], [200, 0, 0]]
    cv2.imwrite(str(data / "masks" / "a.png"), np.full((8, 8, 3), 7, np.uint8))  # BGR (7, 7, 7): no class
    with pytest.raises(DataError) as caught:
        Folder(str(data), classes=CLASSES, colors=colors, mask_format="color")[0]
    assert str(caught.value) == (
        f"{data / 'masks' / 'a.png'}: colour (7, 7, 7) in 64 pixel(s) is neither a class colour nor void; "
        'give it to a class in "colors" or list it in "void_colors" (not labelled), or, if the masks hold '
        'class indices, set "mask_format": "index"')
    cv2.imwrite(str(data / "masks" / "a.png"), np.zeros((8, 8), np.uint8))  # an index mask
    with pytest.raises(DataError, match='1-channel uint8 image .*; if the masks hold class indices, set '
                                        '"mask_format": "index"'):
        Folder(str(data), classes=CLASSES, colors=colors, mask_format="color")[0]


# --- paths -------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_project_root(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert PROJECT_ROOT == ROOT
    tiny_config["trainer"].update(save_dir="runs/x", log_dir="tb")
    tiny_config["init_from"] = "~/weights.pth"
    tiny_config["arch"]["args"]["weights_path"] = "../w.pth"
    tiny_config["val_loader"] = {"type": "Folder", "args": {"data_dir": "/data/mine", "classes": ["a", "b"]}}
    tiny_config["train_loader"] = {"type": "Folder", "args": {"data_dir": "data/mine", "classes": ["a", "b"]}}
    config = validate_config(tiny_config)
    assert config["trainer"]["save_dir"] == str(ROOT / "runs" / "x")
    assert config["trainer"]["log_dir"] == str(ROOT / "tb")
    assert config["cache_dir"] == str(ROOT / "runs" / "x" / "cache")  # default: inside save_dir
    assert config["init_from"] == str(Path.home() / "weights.pth")
    assert config["arch"]["args"]["weights_path"] == str(ROOT.parent / "w.pth")
    assert config["train_loader"]["args"]["data_dir"] == str(ROOT / "data" / "mine")
    assert config["val_loader"]["args"]["data_dir"] == "/data/mine"
    assert config["train_loader"]["args"]["masks"] == "masks"  # a folder name inside data_dir, not a path
    tiny_config["cache_dir"] = "my_cache"
    assert validate_config(tiny_config)["cache_dir"] == str(ROOT / "my_cache")
    assert validate_config(config) == config  # a resolved config stays as it is (resume, inference)
    settings = builder.trainer_settings(config, torch.device("cpu"), Path("/r/tiny/20260101-000000"))
    assert settings.tensorboard_dir is None  # tensorboard is off in the tiny config
    config["trainer"]["tensorboard"] = True
    assert builder.trainer_settings(config, torch.device("cpu"), Path("/r/tiny/20260101-000000")) \
        .tensorboard_dir == ROOT / "tb" / "tiny" / "20260101-000000"
    assert resolve_path("/abs/./x/../y") == "/abs/y"


def test_a_config_run_from_another_directory_finds_its_data_and_writes_below_save_dir(tmp_path, monkeypatch,
                                                                                       capsys):
    data = write_data(tmp_path / "data")
    config = folder_config(os.path.relpath(data, ROOT), os.path.relpath(tmp_path / "saved", ROOT))
    config["loss"] = {"type": "WeightedCrossEntropyLoss", "args": {"weights": "median_frequency"}}
    path = write_config(tmp_path / "config.json", config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train.main(["-c", path, "--device", "cpu"]) == 0
    (run_dir,) = (tmp_path / "saved" / "mine").iterdir()
    assert f"Run saved in {run_dir}" in capsys.readouterr().out
    assert len(list((tmp_path / "saved" / "cache").glob("class_weights_*.json"))) == 1
    assert list(elsewhere.iterdir()) == []  # nothing written into the current directory
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train_loader"]["args"]["data_dir"] == str(data)
    assert saved["cache_dir"] == str(tmp_path / "saved" / "cache")


def test_a_missing_data_dir_names_its_key_and_absolute_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "config.json", folder_config("no/such/data", str(tmp_path / "saved")))
    assert train.main(["-c", path, "--device", "cpu"]) == 2
    assert error_line(capsys) == (
        f"error: train_loader.args.data_dir: {ROOT / 'no' / 'such' / 'data'} does not exist (a relative path in "
        f"a config is read from the project root {ROOT}, not from the current directory)")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(DataError, match=f"^val_loader.args.data_dir: {tmp_path / 'gone'} does not exist$"):
        builder.build_dataset({"val_loader": {"type": "Folder", "args": {"data_dir": str(tmp_path / "gone")}},
                               "ignore_index": 255, "seed": 0}, "val_loader")


# --- failed starts -----------------------------------------------------------------------------

def test_bad_data_creates_no_run_folder(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    cv2.imwrite(str(data / "masks" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    path = write_config(tmp_path / "config.json", folder_config(str(data), str(tmp_path / "saved")))
    assert train.main(["-c", path, "--device", "cpu"]) == 2
    assert '"mask_format": "color"' in error_line(capsys)
    assert not (tmp_path / "saved").exists()


def test_a_setup_error_after_the_run_folder_is_made_removes_it(tmp_path, tiny_config, monkeypatch, capsys):
    tiny_config["trainer"].update(save_dir=str(tmp_path / "saved"), tensorboard=True)

    def refuse(*args, **kwargs):
        trainer = builder.build_trainer(*args, **kwargs)
        trainer.logger.info("a line in train.log")
        raise ConfigError("refused after the trainer was built")

    monkeypatch.setattr(train, "build_trainer", refuse)
    assert train.main(["-c", write_config(tmp_path / "config.json", tiny_config), "--device", "cpu"]) == 2
    assert error_line(capsys) == "error: refused after the trainer was built"
    assert not (tmp_path / "saved").exists()  # the run folder, its tensorboard/ and train.log, and save_dir


def test_a_refused_resume_from_best_model_leaves_the_old_run_unchanged(tmp_path, tiny_config, capsys):
    tiny_config["trainer"].update(epochs=1, tensorboard=True)
    tiny_config["train_loader"]["args"]["num_samples"] = 12
    run_dir = tmp_path / "run"
    assert train.main(["-c", write_config(tmp_path / "config.json", tiny_config), "--run-dir", str(run_dir),
                       "--device", "cpu"]) == 0
    before = files_below(run_dir)
    assert "best_model.pth" in before and any(name.startswith("tensorboard/events") for name in before)
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir / "best_model.pth"), "--set", "trainer.epochs=2",
                       "--device", "cpu"]) == 2
    assert error_line(capsys) == (
        f"error: {run_dir / 'best_model.pth'}: checkpoint lacks training state ('optimizer'); it can be used "
        f"for inference or --init-from but not to resume; resume from {run_dir / 'checkpoint.pth'}")
    assert files_below(run_dir) == before


def test_an_error_during_training_reaches_train_log(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    (data / "images" / "d.png").write_bytes(b"not a png")  # met in the second batch of epoch 1
    path = write_config(tmp_path / "config.json", folder_config(str(data), str(tmp_path / "saved")))
    assert train.main(["-c", path, "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 2
    line = f"error: {data / 'images' / 'd.png'}: not a readable image (corrupt or unsupported format)"
    assert error_line(capsys) == line
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert log[-1].endswith(f" ERROR {line}")


# --- classes and class weights in the log ---------------------------------------------------------

def test_the_log_names_the_classes_and_the_class_weights_with_a_warning_for_weight_zero(tmp_path):
    data = write_data(tmp_path / "data")
    config = folder_config(str(data), str(tmp_path / "saved"))
    config["loss"] = {"type": "WeightedCrossEntropyLoss", "args": {"weights": "median_frequency"}}
    config["cache_dir"] = str(tmp_path / "cache")
    path = write_config(tmp_path / "config.json", config)
    assert train.main(["-c", path, "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert " INFO Classes (3): bg, crack, rust (from the config)\n" in log
    assert (" INFO Class weights of loss (median_frequency): bg=0.5645, crack=4.375, rust=0\n") in log
    assert (" WARNING Class 'rust' has weight 0 in loss (it never occurs in the training labels): the model "
            "is not trained to predict it\n") in log
    assert "Class 'bg'" not in log and "Class 'crack'" not in log


def test_class_weights_are_counted_on_the_whole_training_split_under_subset(tmp_path):
    data = write_data(tmp_path / "data")
    config = folder_config(str(data), str(tmp_path / "saved"))
    config["loss"] = {"type": "WeightedCrossEntropyLoss", "args": {"weights": "median_frequency"}}
    weights = {}
    for subset in (None, 1):
        config["cache_dir"] = str(tmp_path / f"cache_{subset}")  # each computes its own
        config["train_loader"]["args"].update(subset=subset, batch_size=1)
        components = builder.build_components(validate_config(config), torch.device("cpu"))
        assert len(components["train_loader"].dataset) == (4 if subset is None else 1)
        weights[subset] = components["loss"].weight.tolist()
    assert weights[1] == weights[None] == pytest.approx(FULL_WEIGHTS)
    assert weights[1] != pytest.approx(SUBSET_WEIGHTS)
    lines, warnings = describe_class_weights(components["loss"], CLASSES)
    assert lines == ["Class weights of loss (median_frequency): bg=0.5645, crack=4.375, rust=0"]
    assert warnings == ["Class 'rust' has weight 0 in loss (it never occurs in the training labels): the "
                        "model is not trained to predict it"]
    listed = builder.LOSSES.build({"type": "WeightedCrossEntropyLoss", "args": {"weights": [1.0, 0.0, 2.0]}},
                                  "loss", ignore_index=255, num_classes=3, train_dataset=None, cache_dir=None)
    assert describe_class_weights(listed, CLASSES, "aux_loss") == (
        ["Class weights of aux_loss (listed): bg=1, crack=0, rust=2"],
        ["Class 'crack' has weight 0 in aux_loss (aux_loss.args.weights says so): the model is not trained to "
         "predict it"])
    assert describe_class_weights(None, CLASSES) == ([], [])
