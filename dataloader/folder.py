"""Your own data: an ``images/`` and a ``masks/`` folder, no code to write.

Layout under ``data_dir`` (one such folder per split, or one folder with list files)::

    images/<stem>.jpg|.png|...     RGB photos
    masks/<stem>.png               class indices (0, 1, 2...) or RGB colours (mask_format "color")
    classes.json                   optional: {"classes": [...], "colors": [[r, g, b], ...]}
    <split>.txt                    optional: the stems of split <split>, one per line

An image and its mask share the stem (``a.jpg`` and ``a.png``). With ``split``
``"all"`` every image is used; any other split reads ``<split>.txt``. Class
names and colours come from the config (``classes``, ``colors``) or from a
``classes.json`` in ``data_dir`` or its parent; when both give them, they must
agree. With index masks, the ignore value (255) is void; with colour masks,
``void_colors`` are. Any other value or colour is an error naming the file and
the value.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from base.base_dataset import BaseDataSet, ClassInfo, JointTransform
from utils.images import read_label
from utils.labels import apply_color_map, apply_label_lut, make_label_lut
from dataloader.layout import bit_palette, read_list, require_dir
from utils.errors import ConfigError, DataError
from utils.registry import DATASETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LAYOUT = "expected images/ and masks/ with matching file stems (see dataloader/folder.py)"
# What fixes a mask that does not fit mask_format, appended to the errors.
INDEX_HINT = ('; if the masks are colour images, set "mask_format": "color" (with "colors", one [r, g, b] '
              'per class) in the data set\'s args')
COLOR_HINT = '; if the masks hold class indices, set "mask_format": "index" in the data set\'s args'
UNKNOWN_COLOR_HINT = ('; give it to a class in "colors" or list it in "void_colors" (not labelled), '
                      'or, if the masks hold class indices, set "mask_format": "index"')


def _classes_file(data_dir: Path) -> Path | None:
    for folder in (data_dir, data_dir.parent):
        if (folder / "classes.json").is_file():
            return folder / "classes.json"
    return None


def _same_colors(first, second) -> bool:
    return [list(c) if isinstance(c, list | tuple) else c for c in first] == \
        [list(c) if isinstance(c, list | tuple) else c for c in second]


def _read_classes_file(path: Path) -> tuple[list, list | None]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("classes"), list):
        raise ConfigError(f'{path}: expected {{"classes": ["name", ...], "colors": [[r, g, b], ...]}}')
    return content["classes"], content.get("colors")


def _color_table(info: ClassInfo, void_colors, ignore_index: int) -> dict[tuple[int, int, int], int]:
    """Mask colour -> class index, void colours -> ``ignore_index``."""
    table = {color: index for index, color in enumerate(info.palette)}
    for color in map(tuple, void_colors):
        if color in table:
            raise ConfigError(f"Folder: void colour {list(color)} is also the colour of class "
                              f"'{info.class_names[table[color]]}'")
        table[color] = ignore_index
    return table


@DATASETS.register
class Folder(BaseDataSet):
    """Images and masks from two folders, with classes from the config or a ``classes.json``.

    Args:
        data_dir: folder holding ``images/`` and ``masks/``.
        split: ``all`` (every image), or a name whose ``<split>.txt`` in ``data_dir`` lists the stems.
        classes: class names in index order; null reads ``classes.json``.
        colors: one ``[r, g, b]`` per class: the mask colours (mask_format ``color``) and
            the palette of predictions; null gives distinct colours (index masks only).
        mask_format: ``index`` (pixel values are class indices) or ``color`` (RGB colours).
        void_colors: colours that mean "not labelled" in colour masks.
        images: name of the image folder.
        masks: name of the mask folder.
    """

    def __init__(self, data_dir: str, split: str = "all", classes: list[str] | None = None,
                 colors: list[list[int]] | None = None, mask_format: Literal["index", "color"] = "index",
                 void_colors: list[list[int]] = (), images: str = "images", masks: str = "masks",
                 transforms: list[JointTransform] = (), ignore_index: int = 255, seed: int = 0) -> None:
        self.data_dir, self.image_dir, self.mask_dir = Path(data_dir), images, masks
        self.mask_format = mask_format
        info = self.info({"data_dir": data_dir, "classes": classes, "colors": colors, "mask_format": mask_format,
                          "void_colors": void_colors})
        # Instance attributes: these classes belong to this data, not to the Folder type.
        self.class_names, self.palette, self.mean, self.std = info.class_names, info.palette, info.mean, info.std
        super().__init__(split, transforms, ignore_index, seed)
        if mask_format == "color":
            self._colors = _color_table(info, void_colors, ignore_index)

    @classmethod
    def info(cls, args: Mapping[str, Any]) -> ClassInfo:
        """The classes of ``args``: the config's ``classes``/``colors`` or a ``classes.json`` beside the data.

        When both exist they must agree (a file that the config silently overrode would be a trap);
        ``void_colors`` need colour masks.
        """
        classes, colors = args.get("classes"), args.get("colors")
        if args.get("void_colors") and args.get("mask_format", "index") != "color":
            raise ConfigError('Folder: void_colors is set, but mask_format is "index": void colours only apply '
                              'to colour masks (in index masks the ignore value is void); remove void_colors, '
                              'or set "mask_format": "color" if the masks are colour images')
        path = _classes_file(Path(args["data_dir"])) if args.get("data_dir") is not None else None
        source, described = "config", "from the config"
        if classes is None:
            if path is None:
                raise ConfigError(f"Folder: no classes given: set 'classes' (and 'colors') in the config or "
                                  f"write classes.json into {args['data_dir']} or its parent")
            classes, file_colors = _read_classes_file(path)
            source, described = str(path), f"from {path}"
        else:
            file_classes, file_colors = _read_classes_file(path) if path is not None else (None, None)
            if file_classes is not None and list(file_classes) != list(classes):
                raise ConfigError(f"Folder: the config's classes {list(classes)} differ from those of {path} "
                                  f"{list(file_classes)}; give the classes in one place (remove 'classes' "
                                  f"from the config to use the file's, or correct one of them)")
            if path is not None:
                described = f"from the config; {path} lists the same"
        if colors is not None and path is not None and file_colors is not None \
                and not _same_colors(colors, file_colors):
            raise ConfigError(f"Folder: the config's colors {list(colors)} differ from those of {path} "
                              f"{list(file_colors)}; give the colours in one place (remove 'colors' from the "
                              f"config to use the file's, or correct one of them)")
        if colors is None and path is not None:
            colors = file_colors
        if not classes or not all(isinstance(name, str) for name in classes):
            raise ConfigError(f"Folder ({source}): classes must be a non-empty list of names")
        if colors is None:
            if args.get("mask_format", "index") == "color":
                raise ConfigError(f"Folder ({source}): colour masks need 'colors', one [r, g, b] per class")
            colors = bit_palette(len(classes) + 1)[1:]
        if not isinstance(colors, list | tuple) or len(colors) != len(classes) or not all(
                isinstance(c, list | tuple) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in colors):
            raise ConfigError(f"Folder ({source}): colors must be {len(classes)} [r, g, b] lists of 0-255, "
                              f"one per class")
        if len({tuple(c) for c in colors}) != len(colors):
            raise ConfigError(f"Folder ({source}): two classes share a colour")
        return ClassInfo(tuple(classes), tuple(tuple(c) for c in colors), cls.mean, cls.std, described)

    @classmethod
    def label_args(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        info = cls.info(args)
        return {"classes": list(info.class_names), "colors": [list(c) for c in info.palette],
                "mask_format": args.get("mask_format", "index"),
                "void_colors": [list(c) for c in args.get("void_colors", ())]}

    @classmethod
    def label_decoder(cls, args: Mapping[str, Any], ignore_index: int):
        if args.get("mask_format", "index") == "color":
            info = cls.info(args)
            colors = _color_table(info, args.get("void_colors", ()), ignore_index)
            return lambda path: apply_color_map(read_label(path, color=True, hint=COLOR_HINT), colors, str(path),
                                                UNKNOWN_COLOR_HINT)
        # Checkpoints of older versions may carry void_colors beside index masks: they never applied.
        info = cls.info({**args, "void_colors": ()})
        lut = make_label_lut(None, info.num_classes, ignore_index)
        return lambda path: apply_label_lut(read_label(path, hint=INDEX_HINT), lut, str(path), info.num_classes)

    def num_classes(self) -> int:
        return len(self.class_names)

    def label_lut(self, ignore_index: int) -> np.ndarray:
        return make_label_lut(None, self.num_classes(), ignore_index)

    def _files(self, folder: str) -> dict[str, Path]:
        found = require_dir(self.data_dir / folder, "Folder", LAYOUT)
        return {p.stem: p for p in sorted(found.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    def unpaired_labels(self) -> list[Path]:
        images = self._files(self.image_dir)
        return [path for stem, path in self._files(self.mask_dir).items() if stem not in images]

    def _list_samples(self) -> list[tuple[Path, Path]]:
        image_dir, mask_dir = self.data_dir / self.image_dir, self.data_dir / self.mask_dir
        images, masks = self._files(self.image_dir), self._files(self.mask_dir)
        if self.split == "all":
            stems = sorted(images)
        else:
            stems = read_list(self.data_dir / f"{self.split}.txt", "Folder", LAYOUT + f", and {self.split}.txt")
            unknown = [s for s in stems if s not in images]
            if unknown:
                raise DataError(f"Folder: {self.data_dir / f'{self.split}.txt'} lists {len(unknown)} stem(s) "
                                f"without an image in {image_dir}, e.g. '{unknown[0]}'")
        missing = [s for s in stems if s not in masks]
        if missing:
            raise DataError(f"Folder: {len(missing)} image(s) without a mask in {mask_dir}, "
                            f"e.g. {images[missing[0]].name} (a mask has the image's stem)")
        return [(images[s], masks[s]) for s in stems]

    def load_label(self, index: int) -> np.ndarray:
        color = self.mask_format == "color"
        return read_label(self.samples[index][1], color=color, hint=COLOR_HINT if color else INDEX_HINT)

    def map_label(self, raw: np.ndarray, source: str) -> np.ndarray:
        if self.mask_format == "color":
            return apply_color_map(raw, self._colors, source, UNKNOWN_COLOR_HINT)
        return apply_label_lut(raw, self._lut, source, self.num_classes())
