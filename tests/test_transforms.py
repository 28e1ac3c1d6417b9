"""The added augmentations: photometric distortion, random resized crop with a class cap, CutMix, CopyBlob.

Mixing transforms take another sample from the data set; these tests check what is
pasted where, that nothing wraps around the border, and that the draws stay a function
of (seed, epoch, index): with workers, and across an interrupted and resumed run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from base.base_dataloader import BaseDataLoader
from base.base_dataset import BaseDataSet
from dataloader.transforms import CopyBlob, CutMix, PhotoMetricDistortion, RandomCrop, RandomResizedCrop
from utils.registry import TRANSFORMS

IGNORE = 255


class Extremes:
    """Stands in for the generator: every coin says 'apply', every range gives its upper end."""

    def random(self) -> float:
        return 0.0

    def uniform(self, low: float, high: float) -> float:
        return high

    def integers(self, low: int, high: int) -> int:
        return high - 1


def flat(rgb, height: int = 2, width: int = 2) -> np.ndarray:
    return np.tile(np.array(rgb, np.uint8), (height, width, 1))


# --- photometric distortion ----------------------------------------------------------------

def test_photometric_brightness_adds_and_saturates():
    transform = PhotoMetricDistortion(brightness=10, contrast=[1, 1], saturation=[1, 1], hue=0)
    image = np.array([[[100, 250, 0]]], np.uint8)
    label = np.array([[3]], np.uint8)
    out, out_label = transform(image, label, Extremes())
    assert out.tolist() == [[[110, 255, 10]]] and out_label is label


def test_photometric_contrast_multiplies_after_brightness():
    transform = PhotoMetricDistortion(brightness=10, contrast=[0.5, 0.5], saturation=[1, 1], hue=0)
    out, _ = transform(np.array([[[100, 30, 250]]], np.uint8), np.zeros((1, 1), np.uint8), Extremes())
    assert out.tolist() == [[[55, 20, 128]]]  # (x + 10) * 0.5, rounded half to even, clipped


def test_photometric_hue_turns_red_into_green():
    transform = PhotoMetricDistortion(brightness=0, contrast=[1, 1], saturation=[1, 1], hue=60)
    out, _ = transform(flat([255, 0, 0]), np.zeros((2, 2), np.uint8), Extremes())
    assert out[0, 0].tolist() == [0, 255, 0]  # +60 OpenCV hue units = +120 degrees


def test_photometric_zero_saturation_gives_grey():
    transform = PhotoMetricDistortion(brightness=0, contrast=[1, 1], saturation=[0, 0], hue=0)
    out, _ = transform(flat([200, 100, 100]), np.zeros((2, 2), np.uint8), Extremes())
    assert out[0, 0].tolist() == [200, 200, 200]  # value (the largest channel) is kept


@pytest.mark.parametrize("args", [{"contrast": [1.5, 0.5]}, {"saturation": [-1, 1]}, {"hue": 91},
                                  {"brightness": -1}])
def test_photometric_bad_args(args):
    with pytest.raises(ValueError):
        PhotoMetricDistortion(**args)


# --- random resized crop -------------------------------------------------------------------

def half_and_half(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((size, size), np.uint8)
    label[:, size // 2:] = 1
    image = np.stack([label * 200] * 3, axis=-1).astype(np.uint8)
    return image, label


def test_random_resized_crop_output_size_and_label_values():
    image, label = half_and_half()
    out, out_label = RandomResizedCrop([12, 16])(image, label, np.random.default_rng(0))
    assert out.shape == (12, 16, 3) and out_label.shape == (12, 16)
    assert set(np.unique(out_label).tolist()) <= {0, 1}
    assert np.array_equal(out[..., 0] == 200, out_label == 1)  # image and label cropped alike


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    image, label = half_and_half()
    def shares(cap: float) -> list[float]:
        crop = RandomResizedCrop(10, scale=[0.1, 0.1], ratio=[1, 1], cat_max_ratio=cap, max_tries=50)
        return [crop(image, label, np.random.default_rng(seed))[1].mean() for seed in range(30)]
    uncapped = shares(1.0)
    assert min(uncapped) == 0.0 or max(uncapped) == 1.0  # small crops often see one class only
    capped = shares(0.75)
    assert all(0.25 <= share <= 0.75 for share in capped)


def test_cat_max_ratio_ignores_the_ignore_value():
    label = np.full((20, 20), IGNORE, np.uint8)
    label[:, :2], label[:, 2:4] = 0, 1  # classes share 50/50 wherever both are present
    crop = RandomResizedCrop(20, scale=[1, 1], ratio=[1, 1], cat_max_ratio=0.6, ignore_index=IGNORE)
    assert crop._balanced(label)
    assert not crop._balanced(label[:, 4:])  # only void: no class, redraw


# --- CutMix --------------------------------------------------------------------------------

def test_cutmix_pastes_one_box_of_the_other_sample():
    image, label = flat([10, 10, 10], 20, 30), np.zeros((20, 30), np.uint8)
    donor = (flat([200, 200, 200], 20, 30), np.full((20, 30), 4, np.uint8))
    out, out_label = CutMix(p=1.0, min_area=0.2, max_area=0.3)(image, label, np.random.default_rng(1), lambda: donor)
    rows, cols = np.nonzero(out_label == 4)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert (out_label[box] == 4).all() and rows.size == (out_label == 4).sum()  # one filled rectangle
    assert 0.2 * 600 - 30 <= rows.size <= 0.3 * 600 + 30  # area in range (up to rounding of the sides)
    assert (out[out_label == 4] == 200).all() and (out[out_label == 0] == 10).all()
    assert (image == 10).all() and (label == 0).all()  # the inputs are not modified


def test_cutmix_p0_never_asks_for_another_sample():
    image, label = flat([1, 2, 3]), np.zeros((2, 2), np.uint8)
    def fail():
        raise AssertionError("other sample drawn")
    assert CutMix(p=0.0)(image, label, np.random.default_rng(0), fail) == (image, label)


def test_cutmix_resizes_another_size_first():
    image, label = flat([0, 0, 0], 8, 8), np.zeros((8, 8), np.uint8)
    donor = (flat([9, 9, 9], 4, 4), np.full((4, 4), 2, np.uint8))
    out, out_label = CutMix(p=1.0, min_area=1.0, max_area=1.0)(image, label, np.random.default_rng(0), lambda: donor)
    assert out_label.shape == (8, 8) and (out_label == 2).sum() >= 32


# --- CopyBlob ------------------------------------------------------------------------------

BUS, ROAD, SKY = 3, 1, 0


def donor_with_bus() -> tuple[np.ndarray, np.ndarray]:
    label = np.full((10, 10), SKY, np.uint8)
    label[2:5, 6:8] = BUS  # a 3x2 blob
    label[4, 8] = BUS      # ... with a foot: an L shape 3 high, 3 wide
    image = np.zeros((10, 10, 3), np.uint8)
    image[label == BUS] = 77
    return image, label


def test_copyblob_puts_the_blob_bottom_middle_on_the_surface():
    label = np.full((6, 6), SKY, np.uint8)
    label[5, 3] = ROAD  # the only surface pixel
    image = np.zeros((6, 6, 3), np.uint8)
    out, out_label = CopyBlob([[BUS, ROAD]], p=1.0)(image, label, np.random.default_rng(0), donor_with_bus)
    expected = np.full((6, 6), SKY, np.uint8)
    # Blob 3x3 with half = 1: bottom-middle at (5, 3) -> top-left at (3, 2).
    expected[3:6, 2:4] = BUS
    expected[5, 4] = BUS
    assert out_label.tolist() == expected.tolist()
    assert (out[out_label == BUS] == 77).all() and (out[out_label != BUS] == 0).all()
    assert (label == ROAD).sum() == 1 and (label != BUS).all()  # the input is not modified


def test_copyblob_never_wraps_around_the_border():
    label = np.full((6, 6), SKY, np.uint8)
    label[5, 5] = ROAD   # right border: a 3-wide blob centred there would stick out
    label[1, 2] = ROAD   # too high: the blob (3 rows) would stick out at the top
    out, out_label = CopyBlob([[BUS, ROAD]], p=1.0)(np.zeros((6, 6, 3), np.uint8), label,
                                                  np.random.default_rng(0), donor_with_bus)
    assert out_label.tolist() == label.tolist()


def test_copyblob_without_source_class_leaves_the_pair():
    label = np.full((6, 6), ROAD, np.uint8)
    donor = (np.zeros((6, 6, 3), np.uint8), np.full((6, 6), SKY, np.uint8))
    _, out_label = CopyBlob([[BUS, ROAD]], p=1.0)(np.zeros((6, 6, 3), np.uint8), label,
                                                np.random.default_rng(0), lambda: donor)
    assert (out_label == ROAD).all()


@pytest.mark.parametrize("args", [{"pairs": []}, {"pairs": [[1]]}, {"pairs": [[1, 2]], "p": 2.0}])
def test_copyblob_bad_args(args):
    with pytest.raises(ValueError):
        CopyBlob(**args)


def test_mixing_transforms_are_registered_with_config_args():
    cutmix = TRANSFORMS.build({"type": "CutMix", "args": {"p": 0.3, "max_area": 0.5}}, "t")
    blob = TRANSFORMS.build({"type": "CopyBlob", "args": {"pairs": [[15, 0], [3, 1]]}}, "t")
    assert cutmix.mixes and blob.mixes and blob.pairs == [(15, 0), (3, 1)]


# --- mixing inside a data set ----------------------------------------------------------------

class Numbered(BaseDataSet):
    """Sample i: image filled with 10 * i, label filled with i (classes 0-5), 12x12."""

    class_names = tuple("abcdef")
    palette = tuple((i, i, i) for i in range(6))

    def _list_samples(self):
        return [(f"{i}.png", f"{i}.png") for i in range(6)]

    def load_image(self, index):
        return np.full((12, 12, 3), 10 * index, np.uint8)

    def load_label(self, index):
        return np.full((12, 12), index, np.uint8)


def test_cutmix_in_a_data_set_pastes_another_index_after_the_earlier_transforms():
    dataset = Numbered("train", [RandomCrop(8), CutMix(p=1.0, min_area=0.3, max_area=0.3)], IGNORE, seed=5)
    image, label = dataset[(2, 3)]
    assert image.shape == (8, 8, 3)
    others = set(np.unique(label.numpy()).tolist()) - {3}
    assert len(others) == 1 and others.pop() != 3
    assert torch.equal(dataset[(2, 3)][0], image) and torch.equal(dataset[(2, 3)][1], label)
    assert any(not torch.equal(dataset[(e, 3)][1], label) for e in range(3, 8))  # depends on the epoch


def test_mixed_batches_do_not_depend_on_workers():
    transforms = [RandomCrop(8), CutMix(p=0.7), CopyBlob([[4, 1], [2, 0]], p=0.7)]
    in_process = BaseDataLoader(Numbered("train", transforms, IGNORE, seed=3), batch_size=3, shuffle=True)
    workers = BaseDataLoader(Numbered("train", transforms, IGNORE, seed=3), batch_size=3, shuffle=True,
                             num_workers=2)
    for epoch in (1, 2):
        in_process.set_epoch(epoch)
        workers.set_epoch(epoch)
        for (image_a, label_a), (image_b, label_b) in zip(in_process, workers):
            assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    workers.shutdown()


@pytest.mark.slow
def test_resume_with_cutmix_is_bit_exact(tiny_config, tmp_path):
    from test_trainer import interrupt_then_resume, make_trainer, weights
    tiny_config["train_loader"]["args"]["num_samples"] = 12  # 2 epochs of 2 iterations
    tiny_config["val_loader"]["args"]["num_samples"] = 4
    tiny_config["train_loader"]["args"]["transforms"].append({"type": "CutMix", "args": {"p": 0.8}})
    straight = make_trainer(tiny_config, tmp_path / "straight")
    straight.train()
    resumed, _, _ = interrupt_then_resume(tiny_config, tmp_path, at_call=3)  # epoch 2, iteration 1
    expected, actual = weights(straight), weights(resumed)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
