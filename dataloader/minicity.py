"""MiniCity, the Cityscapes subset of the VIPriors segmentation challenge.

Expected layout under ``data_dir`` (no city folders)::

    leftImg8bit/{train,val,test}/<name>_leftImg8bit.png
    gtFine/{train,val}/<name>_gtFine_labelIds.png     (+ _instanceIds.png)

Classes, label ids and evaluation are those of Cityscapes. The test split has
no labels: predict it with ``inference.py``.
"""
from __future__ import annotations

from typing import Literal

from base.base_dataset import JointTransform
from dataloader.cityscapes import Cityscapes
from utils.registry import DATASETS


@DATASETS.register
class MiniCity(Cityscapes):
    """MiniCity (VIPriors), 19 Cityscapes classes.

    Args:
        data_dir: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train`` (200 images), ``val`` (100) or ``trainval``.
        instance_maps: also return the instance maps (see :class:`Cityscapes`).
    """

    def __init__(self, data_dir: str, split: Literal["train", "val", "trainval"] = "train",
                 instance_maps: bool = False, transforms: list[JointTransform] = (),
                 ignore_index: int = 255, seed: int = 0) -> None:
        super().__init__(data_dir, split, "fine", instance_maps, transforms, ignore_index, seed)
