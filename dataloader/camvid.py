"""CamVid in the SegNet layout (11 classes, 360x480).

Expected layout under ``data_dir``::

    train/  trainannot/  val/  valannot/  test/  testannot/   (PNG files)
    train.txt  val.txt  test.txt    (optional: "train/x.png trainannot/x.png" per line)

Label PNGs hold class indices 0-10; 11 is void and becomes ``ignore_index``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from base.base_dataset import BaseDataSet, JointTransform
from utils.errors import DataError
from utils.registry import DATASETS

LAYOUT = ("expected the SegNet layout: <split>/ with RGB PNGs and <split>annot/ with label PNGs "
          "(values 0-10, 11 = void), optionally listed in <split>.txt")


@DATASETS.register
class CamVid(BaseDataSet):
    """The CamVid road-scene data set as distributed with SegNet.

    Args:
        data_dir: folder holding ``train/``, ``trainannot/``, ``val/``... (see module doc).
        split: ``train``, ``val``, ``test`` or ``trainval``.
    """

    class_names = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                   "Car", "Pedestrian", "Bicyclist")
    palette = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
               (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
    mean = (0.412, 0.425, 0.433)  # measured over the 367 training images
    std = (0.307, 0.312, 0.307)
    label_map = {**{i: i for i in range(11)}, 11: None}
    fixed_image_size = (360, 480)  # every image of every split

    def __init__(self, data_dir: str, split: Literal["train", "val", "test", "trainval"] = "train",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(split, transforms, ignore_index, seed)

    def _list_samples(self) -> list[tuple[Path, Path]]:
        if not self.data_dir.is_dir():
            raise DataError(f"CamVid data directory {self.data_dir} does not exist; {LAYOUT}")
        splits = ("train", "val") if self.split == "trainval" else (self.split,)
        return [pair for split in splits for pair in self._list_split(split)]

    def _list_split(self, split: str) -> list[tuple[Path, Path]]:
        listing = self.data_dir / f"{split}.txt"
        if listing.is_file():
            pairs = []
            for number, line in enumerate(listing.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise DataError(f"{listing}:{number}: expected 'image_path label_path', got {line!r}")
                # The SegNet release lists absolute paths (/SegNet/CamVid/train/x.png): keep the
                # last two components, relative to data_dir.
                pairs.append(tuple(self.data_dir / Path(*Path(p).parts[-2:]) for p in parts))
            return pairs
        image_dir, label_dir = self.data_dir / split, self.data_dir / f"{split}annot"
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DataError(f"CamVid split '{split}' not found in {self.data_dir}: "
                            f"missing {image_dir.name}/ or {label_dir.name}/; {LAYOUT}")
        images = sorted(image_dir.glob("*.png"))
        missing = [p.name for p in images if not (label_dir / p.name).is_file()]
        if missing:
            raise DataError(f"{label_dir}: no label for {len(missing)} image(s), e.g. {missing[0]}")
        return [(p, label_dir / p.name) for p in images]
