"""The command-line entry points: end to end runs and the error paths users meet."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train
from dataloader.synthetic import make_sample
from tests.conftest import CAMVID_DIR
from utils.metrics import ConfusionMatrix, segmentation_metrics

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, config: dict, name: str = "config.json") -> str:
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run: (config path, run folder)."""
    import copy

    from tests.conftest import TINY_CONFIG

    tmp_path = tmp_path_factory.mktemp("trained")
    config = copy.deepcopy(TINY_CONFIG)
    config_path = write_config(tmp_path, config)
    run_dir = tmp_path / "run"
    assert train.main(["-c", config_path, "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    return config_path, run_dir


@pytest.fixture
def image_folder(tmp_path):
    """Three synthetic validation images and their labels, as PNG files."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(3):
        image, label = make_sample(0, "val", i, 32)
        cv2.imwrite(str(images / f"img{i}.png"), image[..., ::-1])
        Image.fromarray(label).save(labels / f"img{i}.png")
    return images, labels


def test_train_writes_the_run_folder(trained, capsys):
    _, run_dir = trained
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "checkpoint.pth", "best_model.pth", "metrics.csv", "summary.json",
            "learning_curves.png", "train.log"} <= names
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["arch"]["args"]["depth"] == 2 and saved["trainer"]["early_stop"] == 0  # resolved


def test_train_default_run_dir_and_overrides(tmp_path, tiny_config, capsys):
    config_path = write_config(tmp_path, tiny_config)
    assert train.main(["-c", config_path, "--set", "trainer.epochs=1", "--set", "name=override"]) == 0
    out = capsys.readouterr().out
    runs = list((tmp_path / "saved" / "override").iterdir())
    assert len(runs) == 1 and len(runs[0].name) == len("20260101-120000")
    assert f"Run saved in {runs[0]}" in out and "Validation mIoU: " in out
    assert json.loads((runs[0] / "summary.json").read_text())["epochs_trained"] == 1


def test_resume_from_checkpoint_alone_continues_in_its_folder(trained, tmp_path, capsys):
    _, run_dir = trained
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "checkpoint.pth").write_bytes((run_dir / "checkpoint.pth").read_bytes())
    assert train.main(["--resume", str(copy_dir / "checkpoint.pth"), "--set", "trainer.epochs=3"]) == 0
    summary = json.loads((copy_dir / "summary.json").read_text())
    assert summary["epochs_trained"] == 3  # two from the checkpoint's history, one new
    assert [r["epoch"] for r in torch.load(copy_dir / "checkpoint.pth", weights_only=True)["history"]] == [1, 2, 3]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["trainer"].update(epochs="2"), "trainer.epochs: expected an integer, got '2'"),
    (lambda c: c["arch"]["args"].update(bakbone="x"), "arch.args.bakbone: unknown argument for model 'UNet'"),
    (lambda c: c.update(lr_scheduler={"type": "Ploy"}), "lr_scheduler.type: unknown lr scheduler 'Ploy'. "
                                                        "Did you mean 'Poly'?"),
])
def test_train_config_errors(tmp_path, tiny_config, capsys, mutate, expected):
    mutate(tiny_config)
    assert train.main(["-c", write_config(tmp_path, tiny_config)]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "saved").exists()  # nothing created for a bad config


def test_train_malformed_json(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",\n "seed": }')
    assert train.main(["-c", str(path)]) == 2
    assert one_line_error(capsys) == f"error: {path}:2:10: invalid JSON: Expecting value"


def test_train_missing_data_directory(tmp_path, tiny_config, capsys):
    tiny_config["train_loader"] = {"type": "CamVid", "args": {"data_dir": str(tmp_path / "nowhere")}}
    tiny_config["val_loader"] = None
    assert train.main(["-c", write_config(tmp_path, tiny_config)]) == 2
    err = one_line_error(capsys)
    assert err == f"error: train_loader.args.data_dir: {tmp_path / 'nowhere'} does not exist"


def test_train_bad_override_and_device(tmp_path, tiny_config, capsys):
    path = write_config(tmp_path, tiny_config)
    assert train.main(["-c", path, "--set", "trainer.epochs=many"]) == 2
    assert "--set trainer.epochs: expected int like the config's 2, got 'many'" in one_line_error(capsys)
    assert train.main(["-c", path, "--device", "tpu"]) == 2
    assert "--device tpu: expected cpu, cuda or cuda:N" in one_line_error(capsys)


def test_train_resume_with_wrong_number_of_classes(trained, tmp_path, capsys):
    _, run_dir = trained
    config = {"name": "cv", "arch": {"type": "UNet", "args": {"base_channels": 4, "depth": 2}},
              "train_loader": {"type": "CamVid", "args": {"data_dir": str(CAMVID_DIR), "subset": 2,
                                                                       "batch_size": 2}},
              "optimizer": {"type": "SGD", "args": {"lr": 0.01}}, "trainer": {"epochs": 1}}
    if not CAMVID_DIR.is_dir():
        pytest.skip("CamVid not available")
    path = write_config(tmp_path, config)
    assert train.main(["-c", path, "--resume", str(run_dir / "checkpoint.pth"),
                       "--run-dir", str(tmp_path / "r")]) == 2
    assert "checkpoint predicts 5 classes, but the data set has 11" in one_line_error(capsys)


def test_inference_writes_palette_pngs_overlays_and_results(trained, image_folder, tmp_path, capsys):
    config_path, run_dir = trained
    images, labels = image_folder
    out = tmp_path / "out"
    assert inference.main(["-c", config_path, "-m", str(run_dir / "best_model.pth"), "-i", str(images),
                           "-o", str(out), "--labels", str(labels), "--device", "cpu"]) == 0

    predictor, _ = inference.load_predictor(config_path, str(run_dir / "best_model.pth"), torch.device("cpu"))
    confusion = ConfusionMatrix(5)
    for i in range(3):
        written = Image.open(out / f"img{i}.png")
        assert written.mode == "P"
        assert written.getpalette()[:6] == [0, 0, 0, 230, 25, 75]  # background, disk
        image = cv2.imread(str(images / f"img{i}.png"))[..., ::-1]
        expected = predictor.predict(image)
        assert np.array_equal(np.array(written), expected)
        assert Image.open(out / f"img{i}_overlay.png").size == (32, 32)
        confusion.update(torch.from_numpy(expected), torch.from_numpy(make_sample(0, "val", i, 32)[1]).long())
    results = json.loads((out / "results.json").read_text())
    expected_metrics = segmentation_metrics(confusion.matrix, ["background", "disk", "square", "triangle", "ring"])
    assert results["num_images"] == 3
    assert results["mIoU"] == pytest.approx(expected_metrics["mIoU"])
    for got, want in zip(results["class_iou"], expected_metrics["class_iou"]):
        assert (got is None and want is None) or got == pytest.approx(want)
    text = (out / "results.txt").read_text()
    assert f"mIoU           {expected_metrics['mIoU']:.4f}" in text


def test_inference_uses_checkpoint_config_without_c(trained, image_folder, tmp_path):
    _, run_dir = trained
    images, _ = image_folder
    assert inference.main(["-m", str(run_dir / "checkpoint.pth"), "-i", str(images), "-o", str(tmp_path / "o"),
                           "--extension", "png"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png", "img2.png", "img2_overlay.png"]


def test_inference_errors(trained, image_folder, tmp_path, capsys):
    config_path, run_dir = trained
    images, labels = image_folder
    checkpoint = str(run_dir / "best_model.pth")
    base = ["-c", config_path, "-m", checkpoint, "-o", str(tmp_path / "o")]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert inference.main(base + ["-i", str(empty)]) == 2
    assert f"{empty}: no images with extension png, jpg" in one_line_error(capsys)

    assert inference.main(base + ["-i", str(images), "--extension", "jpg"]) == 2
    assert "no images with extension jpg" in one_line_error(capsys)

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"garbage")
    assert inference.main(["-c", config_path, "-m", str(broken), "-i", str(images), "-o", str(tmp_path / "o")]) == 2
    assert f"{broken}: not a readable checkpoint" in one_line_error(capsys)

    # An unreadable image is named and skipped; the others are written; the exit code says so.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(corrupt / "b.png"), np.zeros((32, 32, 3), np.uint8))
    (corrupt / "notes.md").write_text("not an image")
    assert inference.main(base + ["-i", str(corrupt), "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "warning: skipped 1 file(s) that are not images: notes.md" in err
    assert f"warning: skipped {corrupt / 'a.png'}: not a readable image" in err
    assert f"error: 1 of 2 image(s) could not be read and were skipped: {corrupt / 'a.png'}" in err
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["b.png", "b_overlay.png"]

    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(labels / "img1.png")
    assert inference.main(base + ["-i", str(images), "--labels", str(labels)]) == 2
    assert f"{labels / 'img1.png'}: label value 9 is neither a class (0-4) nor void" in one_line_error(capsys)

    Image.fromarray(np.zeros((16, 20), np.uint8)).save(labels / "img1.png")
    assert inference.main(base + ["-i", str(images), "--labels", str(labels)]) == 2
    err = one_line_error(capsys)
    assert f"{labels / 'img1.png'}: label is 20x16 but image {images / 'img1.png'} is 32x32" in err

    (labels / "img1.png").unlink()
    assert inference.main(base + ["-i", str(images), "--labels", str(labels)]) == 2
    assert "no label file for image 'img1'" in one_line_error(capsys)


def test_inference_checkpoint_of_another_model(trained, image_folder, tmp_path, tiny_config, capsys):
    _, run_dir = trained
    images, _ = image_folder
    tiny_config["arch"]["args"]["depth"] = 3
    other = write_config(tmp_path, tiny_config, "other.json")
    assert inference.main(["-c", other, "-m", str(run_dir / "best_model.pth"), "-i", str(images),
                           "-o", str(tmp_path / "o")]) == 2
    assert "weights do not fit the configured 'UNet' model" in one_line_error(capsys)


def test_cli_subprocess_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", str(bad)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad}:1:2: invalid JSON: "
                                                   "Expecting property name enclosed in double quotes"]


@pytest.mark.skipif(not CAMVID_DIR.is_dir(), reason="CamVid not available")
def test_camvid_run_for_a_few_iterations(tmp_path, capsys):
    overrides = ["trainer.epochs=1", "trainer.tensorboard=false", "trainer.progress_bar=false",
                 "arch.args.base_channels=4", "arch.args.depth=2",
                 "train_loader.args.subset=4", "train_loader.args.batch_size=2", "train_loader.args.num_workers=0",
                 'train_loader.args.transforms=[{"type": "RandomScale", "args": {"min_scale": 0.25, '
                 '"max_scale": 0.3}}, {"type": "RandomCrop", "args": {"size": [64, 96]}}]',
                 "val_loader.args.subset=2", "val_loader.args.num_workers=0",
                 f"train_loader.args.data_dir={CAMVID_DIR}", f"val_loader.args.data_dir={CAMVID_DIR}",
                 f"cache_dir={tmp_path / 'cache'}"]
    args = ["-c", str(ROOT / "configs" / "camvid_unet.json"), "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    assert train.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = summary["last_metrics"]
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["epoch"] == 1
    assert "iou/Bicyclist" in metrics
    assert len(list((tmp_path / "cache").glob("class_weights_*.json"))) == 1  # median-frequency weights


def test_bad_label_in_a_worker_is_one_readable_line(tmp_path, tiny_config, capsys):
    """An error raised inside a DataLoader worker reaches the user without the worker's traceback."""
    data = tmp_path / "camvid"
    for folder in ("train", "trainannot"):
        (data / folder).mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(data / "train" / f"f{i}.png"), np.zeros((32, 32, 3), np.uint8))
        Image.fromarray(np.full((32, 32), 12 if i else 3, np.uint8)).save(data / "trainannot" / f"f{i}.png")
    tiny_config["train_loader"] = {"type": "CamVid", "args": {"data_dir": str(data), "batch_size": 1,
                                                              "num_workers": 1, "transforms": []}}
    tiny_config["val_loader"] = None
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert err == f"error: {data / 'trainannot' / 'f1.png'}: label value 12 is neither a class (0-10) nor void"
    assert multiprocessing.active_children() == []  # the worker was stopped, not left for the exit hooks


def test_ctrl_c_on_the_command_line_saves_and_exits_130(tmp_path, tiny_config):
    tiny_config["trainer"]["epochs"] = 1000
    config_path = write_config(tmp_path, tiny_config)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", config_path, "--run-dir",
                                str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pth").exists():  # written after every epoch (save_period 1)
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert f"checkpoint saved to {run_dir / 'checkpoint.pth'}" in err
    assert f"Resume with: python {ROOT / 'train.py'} --resume {run_dir / 'checkpoint.pth'}" in err
    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert state["epoch"] >= 1 and len(state["history"]) >= 1
    # The printed command resumes it; finish just the interrupted epoch.
    last = state["epoch"] if not state["epoch_done"] else state["epoch"] + 1
    assert train.main(["--resume", str(run_dir / "checkpoint.pth"), "--set", f"trainer.epochs={last}",
                       "--set", "trainer.progress_bar=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["epoch"] for row in torch.load(run_dir / "checkpoint.pth", weights_only=True)["history"]] \
        == list(range(1, last + 1)) and summary["epochs_trained"] == last


def test_more_bad_inputs_get_one_line(tmp_path, tiny_config, trained, image_folder, capsys):
    config_path, run_dir = trained
    images, labels = image_folder

    latin = tmp_path / "latin.json"
    latin.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    assert train.main(["-c", str(latin)]) == 2
    assert f"{latin}: not a UTF-8 text file" in one_line_error(capsys)

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(a_file / "run")]) == 2
    assert f"--run-dir {a_file / 'run'}: cannot create the folder" in one_line_error(capsys)

    tiny_config["seed"] = -1
    assert train.main(["-c", write_config(tmp_path, tiny_config)]) == 2
    assert "seed: must be between 0 and 4294967295, got -1" in one_line_error(capsys)

    checkpoint = str(run_dir / "best_model.pth")
    assert inference.main(["-m", checkpoint, "-i", str(images), "-o", str(a_file)]) == 2
    assert f"-o {a_file}: cannot create the folder" in one_line_error(capsys)
    assert inference.main(["-m", checkpoint, "-i", str(images), "-o", str(images)]) == 2
    assert "the output folder must not be the image or label folder" in one_line_error(capsys)
    assert sorted(p.name for p in images.iterdir()) == ["img0.png", "img1.png", "img2.png"]  # untouched


def test_override_to_null_and_ignore_index_that_is_a_class(tmp_path, tiny_config, capsys):
    path = write_config(tmp_path, tiny_config)
    assert train.main(["-c", path, "--set", "val_loader=null", "--set", "trainer.epochs=1",
                       "--run-dir", str(tmp_path / "run")]) == 0
    assert "mIoU" not in (tmp_path / "run" / "metrics.csv").read_text()  # trained without validation
    capsys.readouterr()
    assert train.main(["-c", path, "--set", "ignore_index=3"]) == 2
    assert "ignore_index: 3 is a class of SyntheticShapes (0-4); use a value outside, e.g. 255" \
        in one_line_error(capsys)


def test_inference_does_not_need_imagenet_weights(tmp_path, tiny_config, image_folder, capsys):
    """A config with pretrained true predicts from a checkpoint without the ImageNet file."""
    images, _ = image_folder
    tiny_config["arch"] = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}
    tiny_config["trainer"]["epochs"] = 1
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(tmp_path / "run")]) == 0
    tiny_config["arch"]["args"].update(pretrained=True, weights_path=str(tmp_path / "absent.pth"))
    config = write_config(tmp_path, tiny_config, "pretrained.json")
    assert inference.main(["-c", config, "-m", str(tmp_path / "run" / "checkpoint.pth"), "-i", str(images),
                           "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "img0.png").is_file()
    # Training from scratch with that config does need the file, and says where it should be.
    capsys.readouterr()
    assert train.main(["-c", config]) == 2
    assert f"weights_path {tmp_path / 'absent.pth'} does not exist" in one_line_error(capsys)


# --- inference: inputs, outputs, modes, report ---------------------------------------------------------
def _random_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[..., ::-1])
    return image


def test_inference_inputs_folder_tree_list_file_and_single_image(trained, tmp_path, capsys):
    config_path, run_dir = trained
    checkpoint = str(run_dir / "best_model.pth")
    images = tmp_path / "images"
    _random_image(images / "a.png", 32, 32, 0)
    b = _random_image(images / "sub" / "b.png", 24, 40, 1)
    _random_image(images / "sub" / "deeper" / "c.png", 32, 32, 2)
    (images / "sub" / "notes.md").write_text("not an image")
    out = tmp_path / "out"
    assert inference.main(["-m", checkpoint, "-i", str(images), "-o", str(out), "--batch-size", "2"]) == 0
    assert "warning: skipped 1 file(s) that are not images: sub/notes.md" in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "a.png", "a_overlay.png", "sub/b.png", "sub/b_overlay.png", "sub/deeper/c.png", "sub/deeper/c_overlay.png"]
    predictor, _ = inference.load_predictor(None, checkpoint, torch.device("cpu"))
    assert np.array_equal(np.array(Image.open(out / "sub" / "b.png")), predictor.predict(b))

    listed = tmp_path / "list.txt"
    listed.write_text("images/sub/b.png\n\n# a comment\nimages/sub/deeper/c.png\n")
    assert inference.main(["-m", checkpoint, "-i", str(listed), "-o", str(tmp_path / "from_list")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "from_list")) for p in (tmp_path / "from_list").rglob("*.png")) \
        == ["b.png", "b_overlay.png", "deeper/c.png", "deeper/c_overlay.png"]

    assert inference.main(["-m", checkpoint, "-i", str(images / "sub" / "b.png"), "-o", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["b.png", "b_overlay.png"]
    assert np.array_equal(np.array(Image.open(tmp_path / "one" / "b.png")), predictor.predict(b))

    capsys.readouterr()
    assert inference.main(["-m", checkpoint, "-i", str(images / "sub" / "notes.md"), "-o", str(tmp_path / "x")]) == 2
    assert "notes.md: not an image (png, jpg" in one_line_error(capsys)


def test_inference_modes_and_extra_outputs(trained, tmp_path):
    from predictor import InferenceSettings, Predictor, remove_small_clusters

    config_path, run_dir = trained
    checkpoint = str(run_dir / "best_model.pth")
    images = tmp_path / "images"
    image = _random_image(images / "a.png", 40, 56, 3)
    out = tmp_path / "out"
    assert inference.main(["-m", checkpoint, "-i", str(images), "-o", str(out), "--mode", "sliding", "--tile", "24",
                           "32", "--overlap", "0.5", "--flip", "--batch-size", "3", "--label-ids", "--confidence",
                           "--probs"]) == 0
    base, _ = inference.load_predictor(None, checkpoint, torch.device("cpu"))
    settings = InferenceSettings(mode="sliding", tile=(24, 32), overlap=0.5, flip=True, batch_size=3)
    probs = Predictor(base.forward, base.meta, torch.device("cpu"), settings).probabilities([image])[0]
    saved = np.load(out / "a_probs.npy")
    assert saved.dtype == np.float16 and saved.shape == (5, 40, 56)
    assert np.abs(saved.astype(np.float32) - probs.numpy()).max() < 1e-3
    pred = probs.argmax(0).numpy()
    assert np.array_equal(np.array(Image.open(out / "a.png")), pred)
    assert np.array_equal(cv2.imread(str(out / "a_labelIds.png"), cv2.IMREAD_UNCHANGED), pred)  # identity ids
    confidence = cv2.imread(str(out / "a_confidence.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(confidence, (probs.max(0).values.numpy() * 255).round().astype(np.uint8))
    # Small-cluster cleanup on the same prediction.
    assert inference.main(["-m", checkpoint, "-i", str(images), "-o", str(tmp_path / "clean"), "--mode", "sliding",
                           "--tile", "24", "32", "--overlap", "0.5", "--flip", "--min-cluster", "30"]) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "clean" / "a.png")),
                          remove_small_clusters(pred.astype(np.uint8), 30))


def test_inference_section_of_the_config(trained, tmp_path, tiny_config, capsys):
    from predictor import InferenceSettings, Predictor

    _, run_dir = trained
    checkpoint = str(run_dir / "best_model.pth")
    image = _random_image(tmp_path / "images" / "a.png", 40, 40, 4)
    tiny_config["inference"] = {"mode": "multiscale", "scales": [0.75, 1.0], "flip": True}
    config = write_config(tmp_path, tiny_config)
    assert inference.main(["-c", config, "-m", checkpoint, "-i", str(tmp_path / "images"),
                           "-o", str(tmp_path / "out")]) == 0
    base, _ = inference.load_predictor(None, checkpoint, torch.device("cpu"))
    expected = Predictor(base.forward, base.meta, torch.device("cpu"),
                         InferenceSettings(mode="multiscale", scales=(0.75, 1.0), flip=True)).predict(image)
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "a.png")), expected)
    tiny_config["inference"] = {"mode": "sliding", "tiles": [16, 16]}
    config = write_config(tmp_path, tiny_config, "bad.json")
    assert inference.main(["-c", config, "-m", checkpoint, "-i", str(tmp_path / "images"),
                           "-o", str(tmp_path / "out")]) == 2
    assert "inference.tiles: unknown key. Did you mean 'tile'?" in one_line_error(capsys)
    assert inference.main(["-m", checkpoint, "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"),
                           "--mode", "sliding"]) == 2
    assert "sliding mode needs the tile size [height, width] (--tile H W)" in one_line_error(capsys)
    assert inference.main(["-m", checkpoint, "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"),
                           "--min-cluster", "-5"]) == 2
    assert "--min-cluster -5: expected a count >= 0" in one_line_error(capsys)


def test_inference_report_confusion_plot_and_worst_images(trained, image_folder, tmp_path):
    config_path, run_dir = trained
    images, labels = image_folder
    out = tmp_path / "out"
    assert inference.main(["-c", config_path, "-m", str(run_dir / "best_model.pth"), "-i", str(images),
                           "-o", str(out), "--labels", str(labels), "--worst", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    predictor, _ = inference.load_predictor(config_path, str(run_dir / "best_model.pth"), torch.device("cpu"))
    scores = {}
    for i in range(3):
        one = ConfusionMatrix(5)
        image = cv2.imread(str(images / f"img{i}.png"))[..., ::-1]
        one.update(torch.from_numpy(predictor.predict(image)), torch.from_numpy(make_sample(0, "val", i, 32)[1]).long())
        scores[str(images / f"img{i}.png")] = segmentation_metrics(one.matrix)["mIoU"]
    worst = sorted(scores.items(), key=lambda item: item[1])[:2]
    assert [(w["image"], pytest.approx(w["mIoU"])) for w in results["worst_images"]] == \
        [(name, pytest.approx(score)) for name, score in worst]
    assert f"{worst[0][1]:.4f}  {worst[0][0]}" in (out / "results.txt").read_text()
    shown = sorted((out / "worst").iterdir())
    assert [p.name for p in shown] == [f"01_{Path(worst[0][0]).stem}.png", f"02_{Path(worst[1][0]).stem}.png"]
    assert Image.open(shown[0]).size == (96, 32)  # image | ground truth | prediction
    assert Image.open(out / "confusion_matrix.png").format == "PNG"


@pytest.mark.parametrize("extension", ["mp4", "avi"])
def test_inference_on_a_video_keeps_frames_and_frame_rate(trained, tmp_path, extension):
    _, run_dir = trained
    video = tmp_path / f"clip.{extension}"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*inference.FOURCC[extension]), 7.0, (40, 32))
    for i in range(5):
        writer.write(np.random.default_rng(i).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    assert inference.main(["-m", str(run_dir / "best_model.pth"), "-i", str(video), "-o", str(out),
                           "--batch-size", "2"]) == 0
    result = cv2.VideoCapture(str(out / f"clip_overlay.{extension}"))
    frames = []
    while True:
        ok, frame = result.read()
        if not ok:
            break
        frames.append(frame)
    assert result.get(cv2.CAP_PROP_FPS) == pytest.approx(7.0)
    assert len(frames) == 5 and frames[0].shape == (32, 40, 3)


def test_inference_report_on_cityscapes_names_has_iiou_and_label_ids(tmp_path):
    from dataloader.cityscapes import TRAIN_TO_LABEL_ID, Cityscapes
    from tests.test_export import make_checkpoint

    loader = {"type": "Cityscapes", "args": {"data_dir": str(tmp_path / "absent"), "batch_size": 2}}
    config, checkpoint = make_checkpoint(tmp_path, {"type": "UNet", "args": {"base_channels": 4, "depth": 2}},
                                         loader)
    images, labels = tmp_path / "leftImg8bit" / "val" / "aachen", tmp_path / "gtFine" / "val" / "aachen"
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        stem = f"aachen_000000_00001{i}"
        _random_image(images / f"{stem}_leftImg8bit.png", 32, 48, i)
        label = rng.choice([0, 7, 8, 11, 24, 26], size=(32, 48)).astype(np.uint8)
        instances = label.astype(np.uint16)
        instances[label == 26] = 26000 + i + 1  # one car, one person instance per image
        instances[label == 24] = 24001
        Image.fromarray(label).save(labels / f"{stem}_gtFine_labelIds.png")
        cv2.imwrite(str(labels / f"{stem}_gtFine_instanceIds.png"), instances)
    out = tmp_path / "out"
    assert inference.main(["-c", config, "-m", checkpoint, "-i", str(tmp_path / "leftImg8bit" / "val"),
                           "-o", str(out), "--labels", str(tmp_path / "gtFine" / "val"), "--label-ids"]) == 0
    expected = Cityscapes.benchmark_evaluator(255)
    for i in range(2):
        stem = f"aachen_000000_00001{i}"
        pred = np.array(Image.open(out / "aachen" / f"{stem}_leftImg8bit.png"))
        ids = cv2.imread(str(out / "aachen" / f"{stem}_leftImg8bit_labelIds.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(ids, np.asarray(TRAIN_TO_LABEL_ID)[pred])
        train_ids = Cityscapes.label_lut(255)[np.array(Image.open(labels / f"{stem}_gtFine_labelIds.png"))]
        expected.update(pred, train_ids,
                        cv2.imread(str(labels / f"{stem}_gtFine_instanceIds.png"), cv2.IMREAD_UNCHANGED))
    results = json.loads((out / "results.json").read_text())
    want = expected.result()
    assert not np.isnan(want["iIoU"])
    assert results["cityscapes"]["iIoU"] == pytest.approx(want["iIoU"])
    assert set(results["cityscapes"]["class_iiou"]) == {"person", "rider", "car", "truck", "bus", "train",
                                                        "motorcycle", "bicycle"}
    assert f"iIoU           {want['iIoU']:.4f}" in (out / "results.txt").read_text()


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels_that_the_data_cannot_give_is_a_config_error_before_anything_is_made(tmp_path, tiny_config,
                                                                                         capsys, in_channels):
    # Data sets decode RGB: a 1- or 4-channel model used to pass the checks and die at its first step
    # with a raw RuntimeError, after the run folder was made.
    tiny_config["arch"]["args"]["in_channels"] = in_channels
    run_dir = tmp_path / "run"
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"arch.args.in_channels: the model takes {in_channels}-channel input" in err
    assert "set in_channels to 3" in err and "Traceback" not in err
    assert not run_dir.exists()
