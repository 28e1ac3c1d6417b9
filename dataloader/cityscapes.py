"""Cityscapes, fine or coarse annotations, with the benchmark's 19 training classes.

Expected layout under ``data_dir`` (the release's ``leftImg8bit_trainvaltest.zip``,
``gtFine_trainvaltest.zip`` and, for coarse, ``gtCoarse.zip`` / ``leftImg8bit_trainextra.zip``)::

    leftImg8bit/{train,val,test,train_extra}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      (+ _instanceIds.png)
    gtCoarse/{train,val,train_extra}/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png

The ``*_labelIds.png`` files hold the 34 label ids (0-33); one table maps them
to the 19 train ids, every other id to ``ignore_index``. :meth:`Cityscapes.to_label_ids`
maps predictions back to label ids, the format of the evaluation server.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from base.base_dataset import BaseDataSet, JointTransform
from utils.images import read_label
from dataloader.layout import pairs_by_suffix, require_dir
from utils.cityscapes_eval import CityscapesEvaluator
from utils.errors import DataError
from utils.registry import DATASETS

LAYOUT = ("expected leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
          "gtFine/<split>/<city>/*_gtFine_labelIds.png (gtCoarse/... for mode 'coarse')")

#: The label id of each of the 19 train ids (cityscapesScripts' labels.py).
TRAIN_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
#: Mean instance size in pixels per class over the training set (the official script's constants).
AVERAGE_INSTANCE_SIZE = {
    "person": 3462.4756337644, "rider": 3930.4788056518, "car": 12794.0202738185, "truck": 27855.1264367816,
    "bus": 35732.1511111111, "train": 67583.7075812274, "motorcycle": 6298.7200839748,
    "bicycle": 4672.3249222261,
}


@DATASETS.register
class Cityscapes(BaseDataSet):
    """Cityscapes street scenes, 19 classes.

    Args:
        data_dir: folder holding ``leftImg8bit/`` and ``gtFine/`` (and ``gtCoarse/``).
        split: ``train``, ``val``, ``test``, ``trainval``, or ``train_extra`` (coarse only).
        mode: ``fine`` or ``coarse`` annotations.
        instance_maps: also return each image's ``*_instanceIds.png`` as a third item
            (an ``int32`` map: label id, or label id * 1000 + instance number), which
            the benchmark's iIoU needs (see :mod:`utils.cityscapes_eval`). Evaluation is
            at full resolution, so no transforms are allowed with it.
    """

    class_names = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                   "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                   "motorcycle", "bicycle")
    palette = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
               (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
               (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
    mean = (0.2869, 0.3251, 0.2839)  # over the 2,975 fine training images
    std = (0.1870, 0.1902, 0.1872)
    label_map = {**{label_id: None for label_id in range(34)},
                 **{label_id: train_id for train_id, label_id in enumerate(TRAIN_TO_LABEL_ID)}}
    fixed_image_size = (1024, 2048)  # every image (MiniCity's too)

    def __init__(self, data_dir: str,
                 split: Literal["train", "val", "test", "trainval", "train_extra"] = "train",
                 mode: Literal["fine", "coarse"] = "fine", instance_maps: bool = False,
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        if split == "train_extra" and mode != "coarse":
            raise ValueError("split 'train_extra' has only coarse labels; set mode 'coarse'")
        if instance_maps and transforms:
            raise ValueError("instance_maps evaluates at full resolution: remove the transforms")
        self.data_dir, self.mode, self.instance_maps = Path(data_dir), mode, instance_maps
        super().__init__(split, transforms, ignore_index, seed)

    @classmethod
    def to_label_ids(cls, train_ids: np.ndarray) -> np.ndarray:
        """Predictions in train ids ``(H, W)`` -> Cityscapes label ids ``uint8`` (the server's format)."""
        if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= len(TRAIN_TO_LABEL_ID)):
            raise ValueError(f"train ids must be 0-{len(TRAIN_TO_LABEL_ID) - 1}, got {int(train_ids.max())}")
        return np.asarray(TRAIN_TO_LABEL_ID, dtype=np.uint8)[train_ids]

    @classmethod
    def benchmark_evaluator(cls, ignore_index: int) -> CityscapesEvaluator:
        """The official benchmark's IoU and iIoU on this data set's classes (see :mod:`utils.cityscapes_eval`)."""
        n = len(cls.class_names)
        return CityscapesEvaluator(cls.class_names, cls.label_lut(ignore_index=n), AVERAGE_INSTANCE_SIZE,
                                   ignore_index)

    @classmethod
    def instance_map_path(cls, label_path: Path) -> Path | None:
        """The ``*_instanceIds.png`` beside a ``*_labelIds.png`` label, if it is there."""
        path = Path(str(label_path).replace("_labelIds", "_instanceIds"))
        return path if path != Path(label_path) and path.is_file() else None

    def _split_dirs(self) -> list[str]:
        return ["train", "val"] if self.split == "trainval" else [self.split]

    def _list_samples(self) -> list[tuple[Path, Path]]:
        gt = "gtFine" if self.mode == "fine" else "gtCoarse"
        name = type(self).__name__
        pairs = []
        for split in self._split_dirs():
            image_dir = require_dir(self.data_dir / "leftImg8bit" / split, name, LAYOUT)
            label_dir = require_dir(self.data_dir / gt / split, name, LAYOUT)
            pairs += pairs_by_suffix(image_dir, "_leftImg8bit.png", lambda p, i=image_dir, l=label_dir: (
                l / p.parent.relative_to(i) / p.name.replace("_leftImg8bit.png", f"_{gt}_labelIds.png")),
                name)
        return pairs

    def instance_source(self, index: int) -> Path:
        return Path(str(self.samples[index][1]).replace("_labelIds.png", "_instanceIds.png"))

    def load_instances(self, index: int) -> np.ndarray:
        """The raw ``*_instanceIds.png`` of sample ``index`` as ``int32`` ``(H, W)``."""
        instances = read_label(self.instance_source(index))
        return instances.astype(np.int32)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        image, label = super().__getitem__(item)
        if not self.instance_maps:
            return image, label
        index = item[1] if isinstance(item, tuple) else item
        instances = self.load_instances(index)
        if instances.shape != tuple(label.shape):
            raise DataError(f"{self.instance_source(index)}: instance map is {instances.shape[1]}x"
                            f"{instances.shape[0]}, its label is {label.shape[1]}x{label.shape[0]}")
        return image, label, torch.from_numpy(instances)
