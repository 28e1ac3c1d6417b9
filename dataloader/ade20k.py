"""ADE20K as the SceneParsing benchmark distributes it (``ADEChallengeData2016.zip``, 150 classes).

Expected layout under ``data_dir`` (the ``ADEChallengeData2016`` folder)::

    images/{training,validation}/ADE_<split>_<number>.jpg
    annotations/{training,validation}/ADE_<split>_<number>.png    values 0-150

Value 0 ("other objects") becomes ``ignore_index``; classes 1-150 shift down to 0-149.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from base.base_dataset import BaseDataSet, JointTransform
from dataloader.layout import bit_palette, pairs_by_suffix, require_dir
from utils.registry import DATASETS

LAYOUT = "expected images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"


@DATASETS.register
class ADE20K(BaseDataSet):
    """ADE20K SceneParsing, 150 classes.

    Args:
        data_dir: the ``ADEChallengeData2016`` folder.
        split: ``train`` (20,210 images in ``training/``) or ``val`` (2,000 in ``validation/``).
    """

    class_names = (
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
        "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car",
        "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat",
        "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
        "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
        "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
        "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
        "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
        "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
        "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
        "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
        "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
        "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
        "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
        "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
        "bulletin board", "shower", "radiator", "glass", "clock", "flag")
    palette = bit_palette(151)[1:]
    label_map = {0: None, **{i: i - 1 for i in range(1, 151)}}

    def __init__(self, data_dir: str, split: Literal["train", "val"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        folder = "training" if self.split == "train" else "validation"
        image_dir = require_dir(self.data_dir / "images" / folder, "ADE20K", LAYOUT)
        label_dir = require_dir(self.data_dir / "annotations" / folder, "ADE20K", LAYOUT)
        return pairs_by_suffix(image_dir, ".jpg", lambda p: label_dir / p.relative_to(image_dir).with_suffix(".png"),
                               "ADE20K")
