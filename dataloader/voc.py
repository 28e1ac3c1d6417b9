"""Pascal VOC 2012 segmentation (21 classes), with the SBD-augmented training set.

Expected layout under ``data_dir`` (the ``VOCdevkit/VOC2012`` folder of the release)::

    JPEGImages/<name>.jpg
    SegmentationClass/<name>.png            palette PNGs: pixel values are class indices
    ImageSets/Segmentation/{train,val,trainval}.txt
    SegmentationClassAug/<name>.png         (train_aug only) SBD + VOC labels as grey PNGs
    ImageSets/Segmentation/train_aug.txt    (train_aug only) the 10,582 training names

Label values 0-20 are the classes (0 = background); 255 marks object borders
and difficult regions and becomes ``ignore_index``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from base.base_dataset import BaseDataSet, JointTransform
from dataloader.layout import bit_palette, pairs_by_name, read_list, require_dir
from utils.registry import DATASETS

LAYOUT = ("expected VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ and "
          "ImageSets/Segmentation/<split>.txt (train_aug: SegmentationClassAug/ and "
          "ImageSets/Segmentation/train_aug.txt)")


@DATASETS.register
class PascalVOC(BaseDataSet):
    """Pascal VOC 2012 semantic segmentation.

    Args:
        data_dir: the ``VOC2012`` folder (see module doc).
        split: ``train``, ``val``, ``trainval``, or ``train_aug`` (VOC train + SBD, labels
            from ``SegmentationClassAug/``).
    """

    class_names = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                   "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                   "sheep", "sofa", "train", "tvmonitor")
    palette = bit_palette(21)
    label_map = {**{i: i for i in range(21)}, 255: None}

    def __init__(self, data_dir: str, split: Literal["train", "val", "trainval", "train_aug"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        root = require_dir(self.data_dir, "PascalVOC", LAYOUT)
        label_dir = root / ("SegmentationClassAug" if self.split == "train_aug" else "SegmentationClass")
        require_dir(label_dir, "PascalVOC", LAYOUT)
        names = read_list(root / "ImageSets" / "Segmentation" / f"{self.split}.txt", "PascalVOC", LAYOUT)
        return pairs_by_name(names, lambda n: root / "JPEGImages" / f"{n}.jpg",
                             lambda n: label_dir / f"{n}.png", "PascalVOC")
