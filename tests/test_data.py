"""Tests of the data pipeline: transforms, label mapping, decoding, data sets, sampling, loaders."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from base.base_dataloader import BaseDataLoader, EpochSampler
from base.base_dataset import BaseDataSet
from utils.images import normalize_batch, read_image, read_label
from dataloader.camvid import CamVid
from dataloader.synthetic import SyntheticShapes, make_sample
from dataloader.transforms import (ColorJitter, GaussianBlur, RandomCrop, RandomHorizontalFlip,
                                   RandomRotate, RandomScale, Resize)
from utils import distributed
from builder import build_loader
from utils.config import validate_loader
from utils.errors import ConfigError, DataError
from utils.registry import TRANSFORMS

IGNORE = 255
CAMVID_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
TRANSFORM_NAMES = ("ColorJitter", "GaussianBlur", "RandomCrop", "RandomHorizontalFlip",
                   "RandomRotate", "RandomScale", "Resize")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def position_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image and label whose every pixel encodes its position, so any crop can be located."""
    label = np.arange(height * width, dtype=np.int64).reshape(height, width)
    image = np.stack([label % 256, label // 256, np.full_like(label, 9)], axis=-1).astype(np.uint8)
    return image, label


class FixedAngle:
    """Stands in for the generator: ``uniform`` returns its upper bound, i.e. the full angle."""

    def uniform(self, low: float, high: float) -> float:
        return high


# --- transforms ----------------------------------------------------------------------------

def test_random_crop_larger_than_image_pads_label_with_ignore_and_image_with_pad_value():
    image, label = position_pair(2, 3)
    out_image, out_label = RandomCrop([4, 5], pad_value=7, ignore_index=IGNORE)(image, label, rng())

    assert out_image.shape == (4, 5, 3) and out_label.shape == (4, 5)
    # Padding goes at the bottom/right, so the only possible crop keeps the original at the top-left.
    assert np.array_equal(out_image[:2, :3], image)
    assert np.array_equal(out_label[:2, :3], label)
    expected_label = np.full((4, 5), IGNORE)
    expected_label[:2, :3] = label
    assert np.array_equal(out_label, expected_label)
    assert (out_image[2:] == 7).all() and (out_image[:, 3:] == 7).all()
    assert out_label.dtype == np.int64


def test_random_crop_takes_the_same_window_of_image_and_label():
    image, label = position_pair(10, 12)
    out_image, out_label = RandomCrop([4, 5])(image, label, rng(3))

    replay = rng(3)
    top, left = int(replay.integers(0, 7)), int(replay.integers(0, 8))
    assert out_image.shape == (4, 5, 3) and out_label.shape == (4, 5)
    assert np.array_equal(out_label, label[top:top + 4, left:left + 5])
    assert np.array_equal(out_image, image[top:top + 4, left:left + 5])


def test_random_crop_pads_only_the_short_side():
    image, label = position_pair(3, 8)
    out_image, out_label = RandomCrop([5, 4], ignore_index=IGNORE)(image, label, rng(1))

    assert out_label.shape == (5, 4)
    assert (out_label[3:] == IGNORE).all()
    assert set(np.unique(out_label[:3])) <= set(label.ravel().tolist())
    assert (out_image[3:] == 0).all()


def test_horizontal_flip_p1_mirrors_image_and_label():
    image, label = position_pair(3, 4)
    out_image, out_label = RandomHorizontalFlip(p=1.0)(image, label, rng())
    assert np.array_equal(out_label, label[:, ::-1])
    assert np.array_equal(out_image, image[:, ::-1])
    assert out_label[0, 0] == label[0, 3]


def test_horizontal_flip_p0_leaves_pair_unchanged():
    image, label = position_pair(3, 4)
    out_image, out_label = RandomHorizontalFlip(p=0.0)(image, label, rng())
    assert np.array_equal(out_label, label)
    assert np.array_equal(out_image, image)


@pytest.mark.parametrize("seed", range(5))
def test_random_scale_size_and_nearest_neighbour_labels(seed):
    label = rng(100 + seed).choice(np.array([0, 3, 7]), size=(7, 9)).astype(np.int64)
    image = np.zeros((7, 9, 3), np.uint8)
    out_image, out_label = RandomScale(0.5, 2.0)(image, label, rng(seed))

    scale = rng(seed).uniform(0.5, 2.0)
    assert out_label.shape == (round(7 * scale), round(9 * scale))
    assert out_image.shape == (*out_label.shape, 3)
    assert set(np.unique(out_label)) <= {0, 3, 7}
    assert out_label.dtype == np.int64


def test_random_scale_by_two_repeats_each_label_pixel():
    image, label = position_pair(3, 4)
    _, out_label = RandomScale(2.0, 2.0)(image, label, rng())
    assert np.array_equal(out_label, np.repeat(np.repeat(label, 2, axis=0), 2, axis=1))


def test_resize_to_height_width():
    image, label = position_pair(8, 12)
    out_image, out_label = Resize([3, 5])(image, label, rng())
    assert out_image.shape == (3, 5, 3) and out_label.shape == (3, 5)
    assert set(np.unique(out_label)) <= set(label.ravel().tolist())


def test_resize_int_sets_the_shorter_side_with_nearest_labels():
    image, label = position_pair(8, 12)
    out_image, out_label = Resize(4)(image, label, rng())
    assert out_image.shape == (4, 6, 3)
    assert np.array_equal(out_label, label[::2, ::2])


def test_rotate_fills_label_corners_with_ignore_never_zero():
    label = np.ones((9, 9), np.int64)
    image = np.full((9, 9, 3), 200, np.uint8)
    out_image, out_label = RandomRotate(degrees=45, ignore_index=IGNORE)(image, label, FixedAngle())

    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert out_label[corner] == IGNORE
        assert (out_image[corner] == 0).all()
    assert out_label[4, 4] == 1
    assert set(np.unique(out_label)) == {1, IGNORE}
    assert out_label.dtype == np.int64


def test_rotate_by_zero_is_identity():
    image, label = position_pair(5, 6)
    out_image, out_label = RandomRotate(degrees=0)(image, label, rng())
    assert np.array_equal(out_label, label)
    assert np.array_equal(out_image, image)


@pytest.mark.parametrize("transform", [GaussianBlur(p=1.0), ColorJitter(brightness=0.5, contrast=0.5)],
                         ids=["GaussianBlur", "ColorJitter"])
def test_photometric_transforms_change_image_not_label(transform):
    image = np.zeros((6, 6, 3), np.uint8)
    image[::2, ::2] = 250  # a checkerboard, so blur and contrast both visibly change it
    _, label = position_pair(6, 6)
    label_before = label.copy()
    out_image, out_label = transform(image, label, rng(5))
    assert np.array_equal(out_label, label_before)
    assert out_label.dtype == np.int64
    assert not np.array_equal(out_image, image)
    assert out_image.dtype == np.uint8 and out_image.shape == image.shape


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_every_registered_transform_returns_int64_label(name):
    args = {"Resize": {"size": [5, 7]}, "RandomCrop": {"size": 6}}.get(name, {})
    transform = TRANSFORMS.build({"type": name, "args": args}, "t", ignore_index=IGNORE)
    image, label = position_pair(8, 10)
    for seed in range(3):
        out_image, out_label = transform(image, label, rng(seed))
        assert out_label.dtype == np.int64
        assert out_label.ndim == 2 and out_image.shape == (*out_label.shape, 3)


@pytest.mark.parametrize("make", [
    lambda: RandomScale(2.0, 1.0),
    lambda: RandomScale(0.0, 1.0),
    lambda: RandomCrop(0),
    lambda: RandomCrop([4, 5, 6]),
    lambda: Resize(0),
    lambda: Resize([0, 3]),
    lambda: RandomHorizontalFlip(p=1.5),
    lambda: RandomRotate(degrees=-1),
    lambda: GaussianBlur(max_sigma=0),
    lambda: ColorJitter(brightness=-0.1),
], ids=["scale-min>max", "scale-zero", "crop-zero", "crop-3d", "resize-zero", "resize-hw-zero",
        "flip-p", "rotate-negative", "blur-sigma", "jitter-negative"])
def test_bad_transform_args_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_registry_reports_bad_transform_args_with_config_path():
    spec = {"type": "RandomScale", "args": {"min_scale": 2.0, "max_scale": 1.0}}
    with pytest.raises(ConfigError) as info:
        TRANSFORMS.build(spec, "train_loader.args.transforms[1]", ignore_index=IGNORE)
    assert str(info.value).startswith("train_loader.args.transforms[1] (RandomScale): ")
    assert "min_scale" in str(info.value)


def test_registry_injects_ignore_index_into_transforms():
    crop = TRANSFORMS.build({"type": "RandomCrop", "args": {"size": 4}}, "t", ignore_index=250)
    assert crop.ignore_index == 250
    _, out_label = crop(*position_pair(2, 2), rng())
    assert (out_label[2:] == 250).all()


# --- label mapping -----------------------------------------------------------------------

class TinyDataSet(BaseDataSet):
    """One in-memory sample; raw label values 0, 1 are classes and 7 is void."""

    class_names = ("road", "car")
    palette = ((0, 0, 0), (255, 0, 0))
    mean = (0.5, 0.4, 0.2)
    std = (0.25, 0.5, 0.1)
    label_map = {0: 0, 1: 1, 7: None}

    def __init__(self, image: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE,
                 transforms=()) -> None:
        self.image, self.raw_label = image, label
        super().__init__("train", transforms, ignore_index)

    def _list_samples(self):
        return [("tiny/image.png", "tiny/label.png")]

    def load_image(self, index):
        return self.image

    def load_label(self, index):
        return self.raw_label


class IdentityDataSet(TinyDataSet):
    """No label_map: the identity on the three classes."""

    class_names = ("a", "b", "c")
    label_map = None


def tiny(label, image=None, **kwargs) -> TinyDataSet:
    label = np.asarray(label, dtype=np.uint8)
    if image is None:
        image = np.zeros((*label.shape, 3), np.uint8)
    return TinyDataSet(image, label, **kwargs)


def test_label_map_maps_classes_and_void():
    _, label = tiny([[0, 1, 7]])[0]
    assert torch.equal(label, torch.tensor([[0, 1, IGNORE]], dtype=torch.uint8))
    assert label.dtype == torch.uint8  # classes and void fit a byte: a quarter of int32's bytes to ship


def test_label_map_with_another_ignore_index():
    _, label = tiny([[7, 1, 0]], ignore_index=100)[0]
    assert label.tolist() == [[100, 1, 0]]


def test_default_label_map_is_identity_on_classes():
    dataset = IdentityDataSet(np.zeros((1, 3, 3), np.uint8), np.array([[2, 0, 1]], np.uint8))
    assert dataset[0][1].tolist() == [[2, 0, 1]]
    dataset.raw_label = np.array([[0, 3, 1]], np.uint8)
    with pytest.raises(DataError, match=r"tiny/label\.png: label value 3 .*\(0-2\)"):
        dataset[0]


def test_unknown_label_value_names_source_and_value():
    with pytest.raises(DataError) as info:
        tiny([[0, 5, 1]])[0]
    message = str(info.value)
    assert "tiny/label.png" in message
    assert "label value 5" in message


@pytest.mark.parametrize("value", [300, -2])
def test_wide_label_value_out_of_byte_range_is_reported(value):
    dataset = tiny([[0]])
    dataset.raw_label = np.array([[0, value]], np.int32)
    dataset.image = np.zeros((1, 2, 3), np.uint8)
    with pytest.raises(DataError, match=rf"tiny/label\.png: label value {value} "):
        dataset[0]


def test_wide_label_dtype_within_range_is_mapped():
    dataset = tiny([[0]])
    dataset.raw_label = np.array([[7, 1]], np.uint16)
    dataset.image = np.zeros((1, 2, 3), np.uint8)
    assert dataset[0][1].tolist() == [[IGNORE, 1]]


def test_image_label_size_mismatch_names_both_sizes():
    dataset = TinyDataSet(np.zeros((2, 3, 3), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError) as info:
        dataset[0]
    message = str(info.value)
    assert "tiny/image.png" in message and "tiny/label.png" in message
    assert "image is 3x2" in message and "is 5x4" in message


def test_getitem_returns_uint8_image_and_compact_label():
    image = np.zeros((2, 3, 3), np.uint8)
    image[1, 2] = (255, 0, 51)
    dataset = tiny([[0, 1, 7], [1, 1, 0]], image=image)
    tensor, label = dataset[0]
    assert tensor.dtype == torch.uint8 and tensor.shape == (2, 3, 3)
    assert tensor[1, 2].tolist() == [255, 0, 51]
    assert label.dtype == torch.uint8 and label.tolist() == [[0, 1, IGNORE], [1, 1, 0]]


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_batch_values_and_layout(channels_last):
    images = torch.zeros((1, 2, 3, 3), dtype=torch.uint8)
    images[0, 1, 2] = torch.tensor([255, 0, 51])
    batch = normalize_batch(images, (0.5, 0.4, 0.2), (0.25, 0.5, 0.1), channels_last=channels_last)
    assert batch.dtype == torch.float32 and batch.shape == (1, 3, 2, 3)
    # (value / 255 - mean) / std per channel
    expected = [(1.0 - 0.5) / 0.25, (0.0 - 0.4) / 0.5, (0.2 - 0.2) / 0.1]
    assert batch[0, :, 1, 2].tolist() == pytest.approx(expected, abs=1e-6)
    assert batch[0, :, 0, 0].tolist() == pytest.approx([-2.0, -0.8, -2.0], abs=1e-6)
    assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert images[0, 1, 2].tolist() == [255, 0, 51]  # the input is left alone


@pytest.mark.parametrize("ignore_index, dtype", [(255, torch.uint8), (-1, torch.int16), (300, torch.int16)])
def test_label_dtype_holds_classes_and_ignore(ignore_index, dtype):
    _, label = tiny([[0, 1, 7]], ignore_index=ignore_index)[0]
    assert label.dtype == dtype and label.tolist() == [[0, 1, ignore_index]]


def test_item_with_epoch_uses_that_epochs_augmentation():
    dataset = augmented_shapes()
    dataset.set_epoch(3)
    image, label = dataset[2]
    dataset.set_epoch(0)
    assert torch.equal(dataset[(3, 2)][0], image) and torch.equal(dataset[(3, 2)][1], label)
    assert not torch.equal(dataset[(4, 2)][0], image)


def test_transforms_see_the_mapped_label():
    seen = []

    def record(image, label, generator):
        seen.append(label.copy())
        return image, label

    tiny([[0, 7]], transforms=[record])[0]
    assert seen[0].tolist() == [[0, IGNORE]]


def test_ignore_index_minus_one_maps_void():
    _, label = tiny([[0, 1, 7]], ignore_index=-1)[0]
    assert label.tolist() == [[0, 1, -1]]


def test_empty_split_is_an_error():
    class Empty(TinyDataSet):
        def _list_samples(self):
            return []

    with pytest.raises(DataError, match="Empty: split 'train' has no samples"):
        Empty(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8))


# --- reading files ----------------------------------------------------------------------

@pytest.fixture
def corrupt_png(tmp_path) -> Path:
    path = tmp_path / "x.png"
    path.write_bytes(rng(0).integers(0, 256, size=200, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("read", [read_image, read_label])
def test_missing_file_names_the_path(read, tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match="no such file|No such file") as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("read", [read_image, read_label])
def test_corrupt_file_names_the_path(read, corrupt_png):
    with pytest.raises(DataError, match="corrupt") as info:
        read(corrupt_png)
    assert str(corrupt_png) in str(info.value)


@pytest.mark.parametrize("read", [read_image, read_label])
def test_empty_file_names_the_path(read, tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="corrupt") as info:
        read(path)
    assert str(path) in str(info.value)


def test_read_image_returns_rgb_order(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (3, 2), (255, 10, 20)).save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    assert image[1, 2].tolist() == [255, 10, 20]


def test_palette_label_is_read_as_indices(tmp_path):
    path = tmp_path / "voc.png"
    label = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], np.uint8), mode="P")
    label.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    label.save(path)
    assert Image.open(path).mode == "P"

    raw = read_label(path)
    assert raw.dtype == np.uint8
    assert raw.tolist() == [[0, 1, 2], [2, 1, 0]]


def test_grey_label_is_read_unchanged(tmp_path):
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.array([[0, 11, 254]], np.uint8))
    assert read_label(path).tolist() == [[0, 11, 254]]


def test_rgb_label_is_an_error(tmp_path):
    path = tmp_path / "colour.png"
    Image.new("RGB", (3, 2), (128, 64, 128)).save(path)
    with pytest.raises(DataError, match="3 channels") as info:
        read_label(path)
    assert str(path) in str(info.value)


# --- CamVid on a generated tree ------------------------------------------------------------

def write_pair(root: Path, split: str, name: str, label: np.ndarray) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    image = np.full((*label.shape, 3), 90, np.uint8)
    cv2.imwrite(str(root / split / f"{name}.png"), image)
    cv2.imwrite(str(root / f"{split}annot" / f"{name}.png"), label.astype(np.uint8))


@pytest.fixture
def camvid_tree(tmp_path) -> Path:
    """train/{b,a}.png and val/c.png, 2x3 each; b's label holds void (11)."""
    root = tmp_path / "camvid"
    write_pair(root, "train", "b", np.array([[0, 11, 10], [3, 3, 11]]))
    write_pair(root, "train", "a", np.array([[1, 2, 3], [4, 5, 6]]))
    write_pair(root, "val", "c", np.array([[7, 8, 9], [0, 0, 0]]))
    return root


def test_camvid_lists_by_file_name_without_txt(camvid_tree):
    dataset = CamVid(str(camvid_tree), "train")
    assert dataset.samples == [
        (camvid_tree / "train" / "a.png", camvid_tree / "trainannot" / "a.png"),
        (camvid_tree / "train" / "b.png", camvid_tree / "trainannot" / "b.png"),
    ]


def test_camvid_lists_via_txt_with_segnet_absolute_paths(camvid_tree):
    (camvid_tree / "train.txt").write_text(
        "/SegNet/CamVid/train/b.png /SegNet/CamVid/trainannot/b.png\n"
        "\n"
        "train/a.png trainannot/a.png\n")
    dataset = CamVid(str(camvid_tree), "train")
    assert dataset.samples == [
        (camvid_tree / "train" / "b.png", camvid_tree / "trainannot" / "b.png"),
        (camvid_tree / "train" / "a.png", camvid_tree / "trainannot" / "a.png"),
    ]
    assert dataset[0][1].tolist() == [[0, IGNORE, 10], [3, 3, IGNORE]]


def test_camvid_txt_with_bad_line_names_file_and_line(camvid_tree):
    (camvid_tree / "train.txt").write_text("train/a.png trainannot/a.png\ntrain/b.png\n")
    with pytest.raises(DataError, match=r"train\.txt:2: expected 'image_path label_path'"):
        CamVid(str(camvid_tree), "train")


def test_camvid_trainval_concatenates(camvid_tree):
    train = CamVid(str(camvid_tree), "train")
    val = CamVid(str(camvid_tree), "val")
    trainval = CamVid(str(camvid_tree), "trainval")
    assert len(trainval) == 3
    assert trainval.samples == train.samples + val.samples


def test_camvid_missing_data_dir_names_path_and_layout(tmp_path):
    missing = tmp_path / "no_camvid"
    with pytest.raises(DataError) as info:
        CamVid(str(missing), "train")
    message = str(info.value)
    assert str(missing) in message
    assert "expected the SegNet layout" in message and "<split>annot/" in message


def test_camvid_missing_split_folder_is_an_error(camvid_tree):
    with pytest.raises(DataError, match="CamVid split 'test' not found .*missing test/ or testannot/"):
        CamVid(str(camvid_tree), "test")


def test_camvid_image_without_label_is_an_error(camvid_tree):
    (camvid_tree / "valannot" / "c.png").unlink()
    with pytest.raises(DataError, match=r"valannot: no label for 1 image\(s\), e\.g\. c\.png"):
        CamVid(str(camvid_tree), "val")


def test_camvid_item_maps_void_to_ignore(camvid_tree):
    image, label = CamVid(str(camvid_tree), "train")[1]  # b.png
    assert image.shape == (2, 3, 3) and image.dtype == torch.uint8
    assert label.tolist() == [[0, IGNORE, 10], [3, 3, IGNORE]]


def test_camvid_value_12_names_file_and_value(camvid_tree):
    write_pair(camvid_tree, "val", "c", np.array([[0, 12, 1], [0, 0, 0]]))
    with pytest.raises(DataError) as info:
        CamVid(str(camvid_tree), "val")[0]
    message = str(info.value)
    assert str(camvid_tree / "valannot" / "c.png") in message
    assert "label value 12" in message


# --- the real CamVid -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_camvid_dir() -> Path:
    if not (CAMVID_DIR / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {CAMVID_DIR}")
    return CAMVID_DIR


def test_real_camvid_split_sizes(real_camvid_dir):
    assert len(CamVid(str(real_camvid_dir), "train")) == 367
    assert len(CamVid(str(real_camvid_dir), "val")) == 101


def test_real_camvid_first_sample(real_camvid_dir):
    dataset = CamVid(str(real_camvid_dir), "train")
    image, label = dataset[0]
    assert image.shape == (360, 480, 3) and image.dtype == torch.uint8
    assert label.shape == (360, 480) and label.dtype == torch.uint8

    values = set(label.unique().tolist())
    assert values <= set(range(11)) | {IGNORE}
    assert 11 not in values
    # The first label has void pixels: exactly those become ignore, the rest keep their class.
    raw = torch.from_numpy(dataset.load_label(0).astype(np.int64))
    assert (raw == 11).any()
    assert torch.equal(label == IGNORE, raw == 11)
    assert torch.equal(label[raw != 11], raw[raw != 11])


# --- SyntheticShapes -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_64() -> SyntheticShapes:
    return SyntheticShapes("train", num_samples=64, image_size=32)


def test_synthetic_is_deterministic_by_data_seed():
    first = SyntheticShapes("train", num_samples=3, image_size=32, data_seed=5)
    second = SyntheticShapes("train", num_samples=3, image_size=32, data_seed=5)
    for index in range(3):
        assert torch.equal(first[index][0], second[index][0])
        assert torch.equal(first[index][1], second[index][1])
    other = SyntheticShapes("train", num_samples=1, image_size=32, data_seed=6)
    assert not torch.equal(first[0][0], other[0][0])


def test_synthetic_splits_differ():
    train, train_label = make_sample(0, "train", 0, 32)
    val, val_label = make_sample(0, "val", 0, 32)
    test, _ = make_sample(0, "test", 0, 32)
    assert not np.array_equal(train, val)
    assert not np.array_equal(val, test)
    assert not np.array_equal(train_label, val_label)


def test_synthetic_sample_shapes_and_types():
    image, label = make_sample(0, "train", 0, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert label.shape == (48, 48) and label.dtype == np.uint8


def test_synthetic_labels_cover_every_class_and_nothing_else(shapes_64):
    seen = set()
    for index in range(64):
        label = shapes_64[index][1]
        assert label.dtype == torch.uint8
        seen |= set(label.unique().tolist())
    assert seen == {0, 1, 2, 3, 4}
    assert SyntheticShapes.num_classes() == 5


def test_synthetic_bad_args_raise():
    with pytest.raises(ValueError):
        SyntheticShapes(num_samples=0)
    with pytest.raises(ValueError):
        SyntheticShapes(num_samples=1, image_size=8)


# --- sampler -------------------------------------------------------------------------------

def fake_ranks(monkeypatch, rank: int, world_size: int) -> None:
    monkeypatch.setattr(distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(distributed, "get_world_size", lambda: world_size)


def order(sampler: EpochSampler, epoch: int, skip: int = 0) -> list[int]:
    sampler.set_epoch(epoch, skip=skip)
    pairs = list(sampler)
    assert {e for e, _ in pairs} <= {epoch}  # every index carries the epoch to the workers
    return [index for _, index in pairs]


def test_sampler_without_shuffle_is_in_order():
    sampler = EpochSampler(6, shuffle=False, seed=3)
    assert order(sampler, 1) == [0, 1, 2, 3, 4, 5]
    assert order(sampler, 2) == [0, 1, 2, 3, 4, 5]
    assert len(sampler) == 6


def test_sampler_shuffle_is_a_function_of_seed_and_epoch():
    first, second = EpochSampler(20, shuffle=True, seed=7), EpochSampler(20, shuffle=True, seed=7)
    epoch_3 = order(first, 3)
    assert sorted(epoch_3) == list(range(20))
    assert epoch_3 != list(range(20))
    assert order(second, 3) == epoch_3
    assert order(first, 4) != epoch_3
    assert order(EpochSampler(20, shuffle=True, seed=8), 3) != epoch_3


def test_sampler_skip_yields_the_tail():
    sampler = EpochSampler(10, shuffle=True, seed=1)
    full = order(sampler, 2)
    assert len(sampler) == 10
    assert order(sampler, 2, skip=4) == full[4:]
    assert len(sampler) == 6
    assert order(sampler, 2, skip=12) == []
    assert len(sampler) == 0


def shards(monkeypatch, n: int, world_size: int, even_shards: bool = True, skip: int = 0):
    result = []
    for rank in range(world_size):
        fake_ranks(monkeypatch, rank, world_size)
        sampler = EpochSampler(n, shuffle=True, seed=0, even_shards=even_shards)
        result.append((order(sampler, 1, skip=skip), len(sampler)))
    return result


def test_two_ranks_split_an_even_dataset(monkeypatch):
    (zero, len_zero), (one, len_one) = shards(monkeypatch, 8, 2)
    assert len(zero) == len(one) == len_zero == len_one == 4
    assert not set(zero) & set(one)
    assert sorted(zero + one) == list(range(8))


def test_two_ranks_pad_an_odd_dataset(monkeypatch):
    (zero, len_zero), (one, len_one) = shards(monkeypatch, 7, 2)
    assert len(zero) == len(one) == len_zero == len_one == 4
    assert set(zero) | set(one) == set(range(7))
    # The only shared index is the padding: the epoch's first index, repeated as the last of rank 1.
    assert set(zero) & set(one) == {zero[0]}
    assert one[-1] == zero[0]


def test_uneven_shards_give_every_index_to_exactly_one_rank(monkeypatch):
    """Validation shards: no padding, so no image is counted twice."""
    (zero, len_zero), (one, len_one) = shards(monkeypatch, 7, 2, even_shards=False)
    assert (len(zero), len_zero, len(one), len_one) == (4, 4, 3, 3)
    assert not set(zero) & set(one)
    assert sorted(zero + one) == list(range(7))


def test_rank_skip_drops_that_ranks_first_indices(monkeypatch):
    full = shards(monkeypatch, 8, 2)
    skipped = shards(monkeypatch, 8, 2, skip=1)
    for (whole, _), (tail, length) in zip(full, skipped):
        assert tail == whole[1:] and length == 3


def test_every_rank_gets_len_indices_when_ranks_outnumber_samples(monkeypatch):
    for indices, length in shards(monkeypatch, 1, 3):
        assert len(indices) == length == 1


# --- loader --------------------------------------------------------------------------------

def augmented_shapes(num_samples: int = 12) -> SyntheticShapes:
    transforms = [RandomHorizontalFlip(), RandomScale(0.75, 1.25), RandomCrop(24)]
    return SyntheticShapes("train", num_samples=num_samples, image_size=32, transforms=transforms, seed=3)


def epoch_batches(loader: BaseDataLoader, epoch: int, skip_batches: int = 0) -> list:
    loader.set_epoch(epoch, skip_batches=skip_batches)
    return list(loader)


def assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (image_a, label_a), (image_b, label_b) in zip(first, second):
        assert torch.equal(image_a, image_b)
        assert torch.equal(label_a, label_b)


@pytest.fixture(scope="module")
def shapes_12() -> SyntheticShapes:
    return augmented_shapes()


def test_loader_batches_do_not_depend_on_workers(shapes_12):
    in_process = BaseDataLoader(shapes_12, batch_size=4, shuffle=True, num_workers=0, seed=3)
    with_workers = BaseDataLoader(augmented_shapes(), batch_size=4, shuffle=True, num_workers=2, seed=3)
    batches = epoch_batches(in_process, 3)
    assert len(batches) == 3
    assert batches[0][0].shape == (4, 24, 24, 3) and batches[0][1].shape == (4, 24, 24)
    assert_same_batches(epoch_batches(with_workers, 3), batches)
    # The augmentation really is random per epoch, so the comparison above is not vacuous.
    assert not torch.equal(epoch_batches(in_process, 4)[0][0], batches[0][0])


def test_persistent_workers_follow_the_epoch(shapes_12):
    """Workers live for the whole run and take the epoch from each request, not from their copy of the data set."""
    loader = BaseDataLoader(augmented_shapes(), batch_size=4, shuffle=True, num_workers=2, seed=3)
    reference = BaseDataLoader(shapes_12, batch_size=4, shuffle=True, num_workers=0, seed=3)
    first = epoch_batches(loader, 1)
    workers = loader._iterator._workers
    assert_same_batches(epoch_batches(loader, 2), epoch_batches(reference, 2))
    assert loader._iterator._workers == workers  # the same processes served epoch 2
    assert_same_batches(first, epoch_batches(reference, 1))
    loader.shutdown()
    assert not any(w.is_alive() for w in workers)


def test_loader_skip_batches_yields_the_rest_of_the_epoch():
    loader = BaseDataLoader(augmented_shapes(20), batch_size=4, shuffle=True, seed=3)
    full = epoch_batches(loader, 2)
    assert len(full) == 5
    resumed = epoch_batches(loader, 2, skip_batches=2)
    assert len(loader) == 3
    assert_same_batches(resumed, full[2:])


def test_loader_rejects_bad_args(shapes_12):
    with pytest.raises(ValueError, match="batch_size"):
        BaseDataLoader(shapes_12, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        BaseDataLoader(shapes_12, num_workers=-1)


# --- config and build_loader ---------------------------------------------------------------

def shapes_spec(**args) -> dict:
    return {"type": "SyntheticShapes",
            "args": {"num_samples": 8, "batch_size": 4, "image_size": 32,
                     "transforms": [{"type": "RandomHorizontalFlip"}], **args}}


def test_validate_loader_fills_defaults():
    resolved = validate_loader({"type": "SyntheticShapes", "args": {
        "num_samples": 8, "batch_size": 4, "transforms": [{"type": "RandomHorizontalFlip"}]}}, "train_loader")
    assert resolved == {"type": "SyntheticShapes", "args": {
        "split": "train", "num_samples": 8, "image_size": 64, "data_seed": 0,
        "batch_size": 4, "shuffle": False, "num_workers": 0, "drop_last": True, "pin_memory": None,
        "start_method": None, "subset": None, "transforms": [{"type": "RandomHorizontalFlip", "args": {"p": 0.5}}]}}
    # drop_last defaults to true for training (a one-image batch breaks batch norm), false for validation.
    assert validate_loader({"type": "SyntheticShapes"}, "val_loader")["args"]["drop_last"] is False


def test_validate_loader_misspelled_arg_suggests_the_key():
    spec = {"type": "SyntheticShapes", "args": {"num_samples": 8, "batch_szie": 4}}
    with pytest.raises(ConfigError) as info:
        validate_loader(spec, "train_loader")
    message = str(info.value)
    assert "train_loader.args.batch_szie" in message
    assert "Did you mean 'batch_size'?" in message


def test_validate_loader_unknown_transform_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        validate_loader(shapes_spec(transforms=[{"type": "RandomFlip"}]), "train_loader")
    message = str(info.value)
    assert "train_loader.args.transforms[0].type: unknown transform 'RandomFlip'" in message
    assert "Available: " in message
    for name in TRANSFORM_NAMES:
        assert name in message


def test_validate_loader_misspelled_transform_arg_names_its_path():
    spec = shapes_spec(transforms=["RandomHorizontalFlip", {"type": "RandomCrop", "args": {"szie": 8}}])
    with pytest.raises(ConfigError, match=r"train_loader\.args\.transforms\[1\]\.args\.szie: .*"
                                          r"Did you mean 'size'\?"):
        validate_loader(spec, "train_loader")


@pytest.mark.parametrize("args, fragment", [
    ({"batch_size": 0}, "train_loader.args.batch_size: must be >= 1"),
    ({"num_workers": -1}, "train_loader.args.num_workers: must be >= 0"),
    ({"batch_size": "4"}, "train_loader.args.batch_size: expected an integer"),
    ({"ignore_index": 3}, "train_loader.args.ignore_index: is set by the framework"),
    ({"transforms": [{"type": "RandomCrop", "args": {"size": 4, "ignore_index": 0}}]},
     "train_loader.args.transforms[0].args.ignore_index: is set by the framework"),
])
def test_validate_loader_rejects_bad_values(args, fragment):
    with pytest.raises(ConfigError) as info:
        validate_loader(shapes_spec(**args), "train_loader")
    assert fragment in str(info.value)


def test_validate_loader_rejects_subset_zero():
    with pytest.raises(ConfigError, match=r"train_loader\.args\.subset"):
        validate_loader(shapes_spec(subset=0), "train_loader")


def resolved_config(spec: dict, ignore_index: int = IGNORE, seed: int = 0) -> dict:
    return {"train_loader": validate_loader(spec, "train_loader"), "ignore_index": ignore_index, "seed": seed}


def test_build_loader_end_to_end():
    spec = shapes_spec(shuffle=True, transforms=[{"type": "RandomCrop", "args": {"size": 40}}])
    loader = build_loader(resolved_config(spec, ignore_index=250, seed=4), "train_loader")

    assert isinstance(loader, BaseDataLoader)
    assert loader.batch_size == 4 and loader.sampler.shuffle is True
    dataset = loader.dataset
    assert isinstance(dataset, SyntheticShapes)
    assert len(dataset) == 8 and dataset.image_size == 32
    assert dataset.ignore_index == 250 and dataset.seed == 4 and loader.sampler.seed == 4
    assert [type(t) for t in dataset.transforms] == [RandomCrop]
    assert dataset.transforms[0].ignore_index == 250

    loader.set_epoch(1)
    images, labels = next(iter(loader))
    assert images.shape == (4, 40, 40, 3) and labels.shape == (4, 40, 40)
    # A 40 crop of a 32 image pads 8 rows and 8 columns with the injected ignore index.
    assert ((labels == 250).sum(dim=(1, 2)) == 40 * 40 - 32 * 32).all()


def test_build_loader_subset_restricts_the_dataset():
    loader = build_loader(resolved_config(shapes_spec(subset=3)), "train_loader")
    assert len(loader.dataset) == 3
    assert loader.dataset.samples == ["synthetic:train:0", "synthetic:train:1", "synthetic:train:2"]
    assert len(loader) == 0  # 3 samples, batch_size 4, drop_last true for training


def test_batch_of_mixed_sizes_says_what_to_change():
    dataset = SyntheticShapes("train", num_samples=4, image_size=32, transforms=[RandomScale(0.5, 2.0)], seed=1)
    loader = BaseDataLoader(dataset, batch_size=4, seed=1)
    loader.set_epoch(1)
    with pytest.raises(DataError, match=r"a batch mixes image sizes \(height x width\) \d+x\d+, .*; add a "
                                        r"RandomCrop or Resize to the loader's transforms, or use batch_size 1"):
        list(loader)


def test_default_label_map_treats_the_ignore_value_as_void():
    class Plain(BaseDataSet):
        class_names = ("a", "b")
        palette = ((0, 0, 0), (255, 255, 255))

        def _list_samples(self):
            return [("img", "lbl")]

    plain = Plain("train", ignore_index=255)
    assert plain.map_label(np.array([[0, 1, 255]], np.uint8), "lbl").tolist() == [[0, 1, 255]]
    with pytest.raises(DataError, match="lbl: label value 2 is neither a class"):
        plain.map_label(np.array([[2]], np.uint8), "lbl")
