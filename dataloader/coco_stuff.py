"""COCO-Stuff: 182 label ids (80 things, 91 stuff, 11 unused) as 171 contiguous classes.

**164k** (``COCOStuff164k``), the 2017 images with ``stuffthingmaps_trainval2017.zip``::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png      values 0-181 (label id - 1), 255 unlabeled

**10k** (``COCOStuff10k``), the original ``cocostuff-10k-v1.1.zip``::

    images/<name>.jpg
    annotations/<name>.mat        key "S": 0 unlabeled, 1-182 label ids
    imageLists/{train,test}.txt   names without extension (9,000 / 1,000)

The 11 label ids that COCO never uses (thing ids 12, 26, 29, 30, 45, 66, 68, 69,
71, 83, 91) are skipped, so classes 0-79 are the things and 80-170 the stuff.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import scipy.io

from base.base_dataset import BaseDataSet, JointTransform
from utils.labels import apply_label_lut
from dataloader.layout import bit_palette, pairs_by_name, pairs_by_suffix, read_list, require_dir
from utils.errors import DataError
from utils.registry import DATASETS

THINGS = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
          "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
          "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
          "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
          "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
          "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
          "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
          "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
          "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
STUFF = ("banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
         "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
         "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
         "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
         "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
         "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
         "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
         "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
         "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
         "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
         "waterdrops", "window-blind", "window-other", "wood")
#: COCO label ids (1-182) that no annotation uses.
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
#: Class index of each used label id, in order.
USED_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)

LAYOUT_164K = ("expected images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png "
               "(from stuffthingmaps_trainval2017.zip)")
LAYOUT_10K = "expected images/<name>.jpg, annotations/<name>.mat and imageLists/{train,test}.txt"


class _COCOStuff(BaseDataSet):
    class_names = THINGS + STUFF
    palette = bit_palette(172)[1:]

    def __init__(self, data_dir: str, split: str, transforms: list[JointTransform], ignore_index: int,
                 seed: int) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(split, transforms, ignore_index, seed)


@DATASETS.register
class COCOStuff164k(_COCOStuff):
    """COCO-Stuff 164k (118k train / 5k val images of COCO 2017), 171 classes.

    Args:
        data_dir: folder holding ``images/`` and ``annotations/`` (see :mod:`dataloader.coco_stuff`).
        split: ``train`` or ``val``.
    """

    label_map = {**{label_id - 1: index for index, label_id in enumerate(USED_IDS)}, 255: None}

    def __init__(self, data_dir: str, split: Literal["train", "val"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        super().__init__(data_dir, split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        folder = f"{self.split}2017"
        image_dir = require_dir(self.data_dir / "images" / folder, "COCOStuff164k", LAYOUT_164K)
        label_dir = require_dir(self.data_dir / "annotations" / folder, "COCOStuff164k", LAYOUT_164K)
        return pairs_by_suffix(image_dir, ".jpg", lambda p: label_dir / f"{p.stem}.png", "COCOStuff164k")


@DATASETS.register
class COCOStuff10k(_COCOStuff):
    """COCO-Stuff 10k (9k train / 1k test images), 171 classes.

    Args:
        data_dir: folder holding ``images/``, ``annotations/`` and ``imageLists/``.
        split: ``train`` or ``test``.
    """

    label_map = {0: None, **{label_id: index for index, label_id in enumerate(USED_IDS)}}

    def __init__(self, data_dir: str, split: Literal["train", "test"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        super().__init__(data_dir, split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        root = require_dir(self.data_dir, "COCOStuff10k", LAYOUT_10K)
        names = read_list(root / "imageLists" / f"{self.split}.txt", "COCOStuff10k", LAYOUT_10K)
        return pairs_by_name(names, lambda n: root / "images" / f"{n}.jpg",
                             lambda n: root / "annotations" / f"{n}.mat", "COCOStuff10k")

    def load_label(self, index: int) -> np.ndarray:
        return read_mat_label(self.samples[index][1])

    @classmethod
    def label_decoder(cls, args, ignore_index: int):
        lut, num_classes = cls.label_lut(ignore_index), cls.num_classes()
        return lambda path: apply_label_lut(read_mat_label(path), lut, str(path), num_classes)


def read_mat_label(path) -> np.ndarray:
    """The label matrix ``S`` of a COCO-Stuff 10k ``.mat`` annotation."""
    try:
        labels = scipy.io.loadmat(path, variable_names=["S"]).get("S")
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from exc
    if labels is None or labels.ndim != 2:
        raise DataError(f"{path}: expected a 2-D label matrix under the key 'S'")
    return labels
