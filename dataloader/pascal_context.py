"""Pascal Context in the widely used converted layout (59 classes, or 60 with background).

The official release (VOC 2010 images plus ``trainval_merged.json`` from the
Pascal Context site) stores 459 labels; the common benchmark keeps the 59 most
frequent and folds the rest into background. Convert it once with the
``detail`` API (``pip install git+https://github.com/zhanghang1989/detail-api``)
into a PNG per image, e.g. with mmsegmentation's
``tools/dataset_converters/pascal_context.py VOCdevkit trainval_merged.json``,
which gives, under ``data_dir`` (the ``VOCdevkit/VOC2010`` folder)::

    JPEGImages/<name>.jpg
    SegmentationClassContext/<name>.png     values 0 (background) .. 59
    ImageSets/SegmentationContext/{train,val}.txt

``PascalContext`` (59 classes) ignores the background value 0 and shifts the
classes down by one; ``PascalContext60`` keeps background as class 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from base.base_dataset import BaseDataSet, JointTransform
from dataloader.layout import bit_palette, pairs_by_name, read_list, require_dir
from utils.registry import DATASETS

LAYOUT = ("expected VOCdevkit/VOC2010 converted for Pascal Context: JPEGImages/, "
          "SegmentationClassContext/ and ImageSets/SegmentationContext/<split>.txt")

CONTEXT_59 = ("aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
              "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
              "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
              "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
              "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
              "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")


@DATASETS.register
class PascalContext(BaseDataSet):
    """Pascal Context, 59 classes (background ignored).

    Args:
        data_dir: the converted ``VOC2010`` folder (see module doc).
        split: ``train`` (4,996 images) or ``val`` (5,104).
    """

    class_names = CONTEXT_59
    palette = bit_palette(60)[1:]
    # Some converters also mark unlabeled pixels 255.
    label_map = {0: None, **{i: i - 1 for i in range(1, 60)}, 255: None}

    def __init__(self, data_dir: str, split: Literal["train", "val"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        root = require_dir(self.data_dir, type(self).__name__, LAYOUT)
        label_dir = require_dir(root / "SegmentationClassContext", type(self).__name__, LAYOUT)
        names = read_list(root / "ImageSets" / "SegmentationContext" / f"{self.split}.txt",
                          type(self).__name__, LAYOUT)
        return pairs_by_name(names, lambda n: root / "JPEGImages" / f"{n}.jpg",
                             lambda n: label_dir / f"{n}.png", type(self).__name__)


@DATASETS.register
class PascalContext60(PascalContext):
    """Pascal Context, 60 classes: background is class 0.

    Args:
        data_dir: the converted ``VOC2010`` folder (see :mod:`dataloader.pascal_context`).
        split: ``train`` or ``val``.
    """

    class_names = ("background", *CONTEXT_59)
    palette = bit_palette(60)
    label_map = {**{i: i for i in range(60)}, 255: None}
