"""KITTI road (``data_road.zip``): road versus non-road, decoded from the ground-truth colours.

Expected layout under ``data_dir`` (the ``data_road`` folder)::

    training/image_2/<cat>_<number>.png            cat: um, umm or uu
    training/gt_image_2/<cat>_road_<number>.png    magenta road, red non-road, black void

The benchmark releases no validation labels: ``val`` is every ``val_every``-th
training image of each category (sorted by name) and ``train`` the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from base.base_dataset import BaseDataSet, JointTransform
from utils.images import read_label
from utils.labels import apply_color_map
from dataloader.layout import require_dir
from utils.errors import DataError
from utils.registry import DATASETS

LAYOUT = "expected data_road/training/image_2/<cat>_<n>.png and training/gt_image_2/<cat>_road_<n>.png"


@DATASETS.register
class KITTIRoad(BaseDataSet):
    """KITTI road segmentation, 2 classes (road, non-road); the black "don't care" area is ignored.

    Args:
        data_dir: the ``data_road`` folder.
        split: ``train``, ``val`` or ``trainval`` (all 289 labelled images).
        val_every: every n-th image of a category goes to ``val``.
    """

    class_names = ("road", "non-road")
    palette = ((255, 0, 255), (255, 0, 0))
    #: Ground-truth colour -> class (None = void).
    colors = {(255, 0, 255): 0, (255, 0, 0): 1, (0, 0, 0): None}

    def __init__(self, data_dir: str, split: Literal["train", "val", "trainval"] = "train", val_every: int = 5,
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        if val_every < 2:
            raise ValueError(f"val_every must be >= 2, got {val_every}")
        self.data_dir, self.val_every = Path(data_dir), val_every
        super().__init__(split, transforms, ignore_index, seed)
        self._color_map = self.color_map(ignore_index)

    @classmethod
    def color_map(cls, ignore_index: int) -> dict[tuple[int, int, int], int]:
        """Ground-truth colour -> class index, void colours -> ``ignore_index``."""
        return {color: ignore_index if index is None else index for color, index in cls.colors.items()}

    @classmethod
    def label_decoder(cls, args, ignore_index: int):
        colors = cls.color_map(ignore_index)
        return lambda path: apply_color_map(read_label(path, color=True), colors, str(path))

    def _list_samples(self) -> list[tuple[Path, Path]]:
        image_dir = require_dir(self.data_dir / "training" / "image_2", "KITTIRoad", LAYOUT)
        label_dir = require_dir(self.data_dir / "training" / "gt_image_2", "KITTIRoad", LAYOUT)
        pairs, seen = [], {}
        for image in sorted(image_dir.glob("*.png")):
            category, number = image.stem.rsplit("_", 1)
            label = label_dir / f"{category}_road_{number}.png"
            if not label.is_file():
                raise DataError(f"KITTIRoad: no label {label} for {image}")
            position = seen.get(category, 0)
            seen[category] = position + 1
            is_val = position % self.val_every == self.val_every - 1
            if self.split == "trainval" or is_val == (self.split == "val"):
                pairs.append((image, label))
        return pairs

    def load_label(self, index: int) -> np.ndarray:
        return read_label(self.samples[index][1], color=True)

    def map_label(self, raw: np.ndarray, source: str) -> np.ndarray:
        return apply_color_map(raw, self._color_map, source)
