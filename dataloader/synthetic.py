"""An embedded synthetic data set: coloured shapes on textured backgrounds.

Generated in code, deterministic by seed, nothing on disk: it lets ``make
train`` and the tests exercise the whole pipeline in minutes on a CPU. The class
of a shape is its geometry (disk, square, triangle, ring), not its colour:
colours are drawn at random for every shape and the background is a random
mix of smooth blotches, stripes and noise, so a model has to learn shape and
context rather than a colour lookup.
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from base.base_dataset import BaseDataSet, JointTransform
from utils.registry import DATASETS

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blotches, optional stripes and pixel noise."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        period = rng.uniform(6, 16)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        image += wave[..., None] * rng.uniform(10, 40, size=3).astype(np.float32)
    image += rng.normal(0, 12, size=image.shape).astype(np.float32)
    return image


def _draw_shape(kind: int, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Draw shape ``kind`` (1 disk, 2 square, 3 triangle, 4 ring) as 1s into ``mask``."""
    size = mask.shape[0]
    radius = rng.uniform(0.1, 0.2) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    if kind == 1:
        cv2.circle(mask, (round(cx), round(cy)), round(radius), 1, -1)
    elif kind == 4:
        cv2.circle(mask, (round(cx), round(cy)), round(radius), 1, max(2, round(radius * 0.4)))
    else:
        corners = 4 if kind == 2 else 3
        start = rng.uniform(0, 2 * np.pi)
        angles = start + np.arange(corners) * 2 * np.pi / corners
        points = np.stack([cx + radius * 1.2 * np.cos(angles), cy + radius * 1.2 * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)


def make_sample(seed: int, split: str, index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of ``split``: an RGB ``uint8`` image and a ``uint8`` label map."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(1, 5))
        mask = np.zeros((size, size), dtype=np.uint8)
        _draw_shape(kind, mask, rng)
        region = mask.astype(bool)
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        shading = rng.normal(0, 10, size=(size, size, 1)).astype(np.float32)
        image[region] = (color + shading)[region]
        label[region] = kind
    return np.clip(image, 0, 255).astype(np.uint8), label


@DATASETS.register
class SyntheticShapes(BaseDataSet):
    """Disks, squares, triangles and rings on textured backgrounds (5 classes).

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint random streams).
        num_samples: images in the split.
        image_size: side of the square images in pixels.
        data_seed: seed of the generator (independent of the training seed).
    """

    class_names = ("background", "disk", "square", "triangle", "ring")
    palette = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, split: Literal["train", "val", "test"] = "train", num_samples: int = 512,
                 image_size: int = 64, data_seed: int = 0, transforms: list[JointTransform] = (),
                 ignore_index: int = 255, seed: int = 0) -> None:
        if num_samples < 1 or image_size < 16:
            raise ValueError("need num_samples >= 1 and image_size >= 16")
        self.num_samples, self.image_size, self.data_seed = num_samples, image_size, data_seed
        self.fixed_image_size = (image_size, image_size)  # every image: batches need no resize
        super().__init__(split, transforms, ignore_index, seed)
        # Generated once: a few MB for the default sizes, and faster than drawing every epoch.
        self._data = [make_sample(data_seed, split, i, image_size) for i in range(num_samples)]

    def _list_samples(self) -> list[str]:
        return [f"synthetic:{self.split}:{i}" for i in range(self.num_samples)]

    def sample_name(self, index: int) -> str:
        return self.samples[index]

    def label_source(self, index: int) -> str:
        return self.samples[index]

    def load_image(self, index: int) -> np.ndarray:
        return self._data[index][0]

    def load_label(self, index: int) -> np.ndarray:
        return self._data[index][1]
