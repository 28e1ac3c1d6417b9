"""The data-set doctor on trees with planted problems: what it reports, what it writes, what it leaves alone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dataloader.folder import Folder
from tools import doctor

IGNORE = 255


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def checks(report: doctor.SplitReport) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for finding in report.findings:
        found.setdefault(finding.check, []).append(Path(finding.file).name)
    return found


@pytest.fixture
def own_data(tmp_path) -> Path:
    """images/ + masks/ with one of each problem; classes bg, crack, rust."""
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    write(root / "images" / "good.png", photo)
    write(root / "masks" / "good.png", np.array([[0, 0, 1, 1, 2, 255]] * 4, np.uint8))
    write(root / "images" / "copy.png", photo)  # same bytes as good.png
    write(root / "masks" / "copy.png", np.zeros((4, 6), np.uint8))
    write(root / "images" / "binary.png", photo[::-1].copy())
    write(root / "masks" / "binary.png", np.array([[0, 255, 255, 0, 0, 0]] * 4, np.uint8))
    write(root / "images" / "unknown.png", photo[:, ::-1].copy())
    write(root / "masks" / "unknown.png", np.array([[0, 7, 7, 9, 0, 0]] * 4, np.uint8))
    write(root / "images" / "small.png", np.zeros((2, 3, 3), np.uint8))
    write(root / "masks" / "small.png", np.zeros((4, 6), np.uint8))
    write(root / "images" / "colour.png", np.ones((4, 6, 3), np.uint8))
    write(root / "masks" / "colour.png", np.full((4, 6, 3), 128, np.uint8))
    write(root / "images" / "rotated.jpg", np.full((4, 6, 3), 50, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(root / "images" / "rotated.jpg").save(root / "images" / "rotated.jpg", exif=exif)
    write(root / "masks" / "rotated.png", np.zeros((4, 6), np.uint8))
    jpeg = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    (root / "images" / "cut.jpg").write_bytes(jpeg[:-40])
    write(root / "masks" / "cut.png", np.zeros((16, 16), np.uint8))
    write(root / "masks" / "orphan.png", np.zeros((4, 6), np.uint8))
    return root


def test_scan_reports_each_planted_problem(own_data):
    before = tree_digest(own_data)
    report = doctor.scan(Folder(str(own_data), classes=["bg", "crack", "rust"]), "train", progress=False)
    found = checks(report)
    assert found["0/255 mask"] == ["binary.png"]
    assert found["unknown values"] == ["unknown.png"]
    assert found["size mismatch"] == ["small.png"]
    assert found["colour label"] == ["colour.png"]
    assert found["EXIF-rotated"] == ["rotated.jpg"]
    assert found["truncated"] == ["cut.jpg"]
    assert found["label without image"] == ["orphan.png"]
    assert found["duplicate"] == ["copy.png"]  # sorted listing: copy.png before good.png
    unknown = next(f for f in report.findings if f.check == "unknown values")
    assert unknown.detail.startswith("7 (8 px), 9 (4 px): neither a class (0-2)")
    assert tree_digest(own_data) == before  # nothing written into the data


def test_scan_counts_classes_per_pixel_and_image(own_data):
    report = doctor.scan(Folder(str(own_data), classes=["bg", "crack", "rust"]), "train", progress=False)
    # Counted images: good (bg 8, crack 8, rust 4), copy 24 bg, rotated 24 bg, cut 256 bg, small 24 bg
    # (its label is fine, only the size differs); binary, unknown and colour are not counted.
    assert report.pixels.tolist() == [8 + 24 + 24 + 256 + 24, 8, 4]
    assert report.images.tolist() == [5, 1, 1]
    assert report.present_pixels.tolist() == [20 + 24 + 24 + 256 + 24, 20, 20]


def camvid_config(tmp_path, tiny_config, data_dir: Path) -> Path:
    tiny_config["train_loader"] = {"type": "CamVid", "args": {"data_dir": str(data_dir), "split": "train",
                                                               "batch_size": 2}}
    tiny_config["val_loader"] = {"type": "CamVid", "args": {"data_dir": str(data_dir), "split": "val",
                                                             "batch_size": 2}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config))
    return path


def camvid_tree(root: Path, bad_value: bool) -> Path:
    write(root / "train" / "a.png", np.full((2, 4, 3), 10, np.uint8))
    write(root / "trainannot" / "a.png", np.array([[0, 0, 1, 11], [0, 0, 1, 1]], np.uint8))
    write(root / "train" / "b.png", np.full((2, 4, 3), 20, np.uint8))
    write(root / "trainannot" / "b.png", np.array([[0, 0, 0, 0], [0, 0, 0, 12 if bad_value else 0]], np.uint8))
    write(root / "val" / "c.png", np.full((2, 4, 3), 30, np.uint8))
    write(root / "valannot" / "c.png", np.zeros((2, 4), np.uint8))
    return root


def test_main_clean_data_exits_zero_and_writes_weights_chart_and_report(tmp_path, tiny_config, capsys):
    config = camvid_config(tmp_path, tiny_config, camvid_tree(tmp_path / "camvid", bad_value=False))
    out = tmp_path / "doctor"
    assert doctor.main(["-c", str(config), "-o", str(out), "--no-progress"]) == 0
    weights = json.loads((out / "class_weights.json").read_text())
    # Sky: 4 + 8 px in images of 7 + 8 labelled px -> freq 12/15; Building: 3 / 7 (only image a).
    # Median frequency over the two present classes = (12/15 + 3/7) / 2.
    freq_sky, freq_building = 12 / 15, 3 / 7
    median = (freq_sky + freq_building) / 2
    assert weights["weights"][:3] == [round(median / freq_sky, 6), round(median / freq_building, 6), 0.0]
    assert (out / "class_distribution_train_loader.png").stat().st_size > 0
    assert "[train_loader] 2 samples: 0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_main_errors_exit_one_and_the_screen_is_capped(tmp_path, tiny_config, capsys):
    root = camvid_tree(tmp_path / "camvid", bad_value=True)
    for i in range(25):  # many bad files: the terminal shows --max-lines of them and a count
        write(root / "train" / f"x{i:02d}.png", np.full((2, 4, 3), 100 + i, np.uint8))
        write(root / "trainannot" / f"x{i:02d}.png", np.full((2, 4), 40, np.uint8))
    out = tmp_path / "doctor"
    assert doctor.main(["-c", str(camvid_config(tmp_path, tiny_config, root)), "-o", str(out),
                        "--no-progress", "--max-lines", "5"]) == 1
    screen = capsys.readouterr().out
    assert "error   unknown values:" in screen and "b.png: 12 (1 px)" in screen
    assert "... and 21 more in" in screen
    assert len((out / "report.txt").read_text().splitlines()) >= 26


def test_main_listing_failure_is_reported_not_raised(tmp_path, tiny_config, capsys):
    root = camvid_tree(tmp_path / "camvid", bad_value=False)
    write(root / "val" / "lonely.png", np.zeros((2, 4, 3), np.uint8))
    assert doctor.main(["-c", str(camvid_config(tmp_path, tiny_config, root)), "-o", str(tmp_path / "d"),
                        "--no-progress"]) == 1
    assert "listing: CamVid:" in capsys.readouterr().out


def test_main_bad_config_exits_two(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{")
    assert doctor.main(["-c", str(path)]) == 2
    assert "invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("data, cut", [(b"\xff\xd8abc\xff\xd9", False), (b"\xff\xd8abc", True),
                                       (b"\x89PNG\r\n\x1a\n....IEND\xaeB`\x82", False),
                                       (b"\x89PNG\r\n\x1a\n....", True), (b"BM....", False)])
def test_truncation_markers(data, cut):
    assert doctor.truncated(data) is cut


def test_main_accepts_set_like_train(tmp_path, tiny_config, capsys):
    # The config names a folder that does not exist; --set points it at the data, as with train.py.
    root = camvid_tree(tmp_path / "camvid", bad_value=False)
    config = camvid_config(tmp_path, tiny_config, tmp_path / "elsewhere")
    out = tmp_path / "doctor"
    argv = ["-c", str(config), "-o", str(out), "--no-progress", "--loaders", "train_loader"]
    assert doctor.main(argv) == 1  # the listing fails: reported, exit 1
    assert doctor.main([*argv, "--set", f"train_loader.args.data_dir={root}",
                        "--set", f"val_loader.args.data_dir={root}"]) == 0
    assert "[train_loader] 2 samples: 0 error(s), 0 warning(s)" in capsys.readouterr().out
    assert doctor.main([*argv, "--set", "trainer.epochs=x"]) == 2
    assert "trainer.epochs" in capsys.readouterr().err
