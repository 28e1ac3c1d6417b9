"""Base class of every segmentation data set.

A data set owns its file listing, decoding and label mapping. Its class names,
palette and normalisation are class attributes, so inference needs no data on
disk. Augmentation is a list of joint (image, label) transforms from config;
normalisation with the data set's own mean/std is always applied last.

Randomness is a pure function of ``(seed, epoch, index)``: the same sample gets
the same augmentation whichever worker loads it and whether or not the run was
resumed, which is what makes resumed training bit-exact. The loaders ask for
``dataset[(epoch, index)]``, so persistent workers need no message when the
epoch changes.

Items stay ``uint8`` from decoding to the device: an image is shipped as
``(H, W, 3)`` bytes (a quarter of the float size) and normalised there by
:func:`utils.images.normalize_batch`; a label in the smallest integer type that holds the
classes and the ignore value (``uint8`` for every usual data set).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import DataError
from utils.images import read_image, read_label
from utils.labels import apply_label_lut, make_label_lut

JointTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ClassInfo:
    """The classes of a configured data set: what models, metrics and inference need."""
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Where the class names come from, for the run's log (``Folder``: the config or a classes.json);
    #: empty for the benchmarks, whose classes are fixed.
    source: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class BaseDataSet(Dataset):
    """Images and label maps of one split.

    Subclasses set the class attributes and implement :meth:`_list_samples`;
    they may override :meth:`load_image` / :meth:`load_label` for formats that
    are not image files on disk.

    Class attributes:
        class_names: one name per class, in label order.
        palette: one RGB colour per class (used for predictions and overlays).
        mean, std: RGB normalisation in the 0-1 range.
        label_map: raw label value -> class index, or ``None`` for void
            (mapped to ``ignore_index``). Values not in the map are an error.
            Default: identity on ``0 .. num_classes-1``, and ``ignore_index`` is void.

    Each item is ``(image, label)``: a ``uint8`` tensor ``(H, W, 3)`` of RGB
    values and a tensor ``(H, W)`` of class indices with ``ignore_index`` for
    void, in the smallest integer type that holds both (``uint8`` unless the
    ignore value is negative or above 255).
    ``dataset[i]`` uses the current epoch (:meth:`set_epoch`);
    ``dataset[(epoch, i)]`` names it.
    """

    class_names: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = ()
    mean: ClassVar[tuple[float, float, float]] = (0.485, 0.456, 0.406)
    std: ClassVar[tuple[float, float, float]] = (0.229, 0.224, 0.225)
    label_map: ClassVar[dict[int, int | None] | None] = None
    #: Channels of the decoded images (every data set decodes 8-bit RGB); a model's ``in_channels``
    #: must match it, which the config check verifies before anything is built.
    image_channels: ClassVar[int] = 3
    #: Whether each item carries a third element, the instance map that :meth:`benchmark_evaluator` needs.
    instance_maps: bool = False
    #: ``(height, width)`` when every image of the data set has that one size (CamVid, Cityscapes); None
    #: when sizes differ or are not known. Batches of validation images need one size
    #: (:func:`builder.check_batches_of_one_size`).
    fixed_image_size: ClassVar[tuple[int, int] | None] = None

    def __init__(self, split: str, transforms: Sequence[JointTransform] = (),
                 ignore_index: int = 255, seed: int = 0) -> None:
        self.split = split
        self.transforms = list(transforms)
        self.ignore_index = ignore_index
        self.seed = seed
        self.epoch = 0
        self._lut = self.label_lut(ignore_index)
        self.samples = self._list_samples()
        if len(self.samples) == 0:
            raise DataError(f"{type(self).__name__}: split '{split}' has no samples")

    @classmethod
    def num_classes(cls) -> int:
        return len(cls.class_names)

    @classmethod
    def info(cls, args: Mapping[str, Any]) -> ClassInfo:
        """The classes when configured with ``args`` (a loader's resolved data set args).

        Fixed benchmarks return their class attributes; a data set whose classes
        come from the config or from a file beside the data (``Folder``) reads them here.
        """
        return ClassInfo(tuple(cls.class_names), tuple(tuple(c) for c in cls.palette),
                         tuple(cls.mean), tuple(cls.std))

    # --- label mapping -------------------------------------------------------
    @classmethod
    def label_lut(cls, ignore_index: int) -> np.ndarray:
        """A 256-entry lookup table from raw label values to class indices."""
        return make_label_lut(cls.label_map, cls.num_classes(), ignore_index)

    @classmethod
    def label_args(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the data set's config args that :meth:`label_decoder` needs, as plain JSON.

        Saved in every checkpoint's ``meta`` (and so in exported files), so that a model's labels can
        be read without its config or data. The benchmarks need none: their label format is fixed.
        """
        return {}

    @classmethod
    def label_decoder(cls, args: Mapping[str, Any], ignore_index: int) -> Callable[[str | Path], np.ndarray]:
        """A function reading one label file of this data set into class indices, without data on disk.

        For ``inference.py --labels``: ``args`` are the loader's resolved data set args
        (``Folder`` takes its classes and mask format from them).
        """
        lut, num_classes = cls.label_lut(ignore_index), cls.num_classes()
        return lambda path: apply_label_lut(read_label(path), lut, str(path), num_classes)

    def map_label(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Map a raw label array to class indices; an unknown value names the file."""
        return apply_label_lut(raw, self._lut, source, self.num_classes())

    # --- listing and decoding ------------------------------------------------
    def _list_samples(self) -> list:
        """The samples of ``self.split``: usually ``(image_path, label_path)`` pairs."""
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        return str(self.samples[index][0])

    @classmethod
    def benchmark_evaluator(cls, ignore_index: int) -> Any:
        """The data set's own benchmark evaluator, or None (the default: the confusion-matrix metrics suffice).

        An evaluator has ``update(pred, target, instances=None)`` per full-resolution image,
        ``synchronize(device)`` to sum the shards of every process, ``result()`` with
        ``class_iiou`` and ``iIoU``, and a ``name`` (the key of its scores in results files).
        The trainer feeds it when the validation items carry instance maps
        (:attr:`instance_maps`); ``inference.py --labels`` when :meth:`instance_map_path` finds one.
        """
        return None

    @classmethod
    def instance_map_path(cls, label_path: Path) -> Path | None:
        """The instance map beside a label file, for :meth:`benchmark_evaluator`; None when there is none."""
        return None

    def load_image(self, index: int) -> np.ndarray:
        """RGB ``uint8`` array ``(H, W, 3)``."""
        return read_image(self.samples[index][0])

    def load_label(self, index: int) -> np.ndarray:
        """Raw label array ``(H, W)`` before mapping."""
        return read_label(self.samples[index][1])

    def label_source(self, index: int) -> str:
        return str(self.samples[index][1])

    def unpaired_labels(self) -> list[Path]:
        """Label files in the data set's folders that no sample uses (reported by ``tools.doctor``)."""
        return []

    # --- items ------------------------------------------------------------------
    def restrict(self, count: int) -> None:
        """Keep only the first ``count`` samples (the loaders' ``subset`` option)."""
        if count < 1:
            raise ValueError(f"subset must be >= 1, got {count}")
        self.samples = self.samples[:count]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation randomness of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        image, label = self._transformed(epoch, index, len(self.transforms), np.random.default_rng(
            [self.seed, epoch, index]))
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` decoded and label-mapped, before any transform; a size mismatch names both files."""
        image = self.load_image(index)
        label = self.map_label(self.load_label(index), self.label_source(index))
        if image.shape[:2] != label.shape[:2]:
            raise DataError(f"{self.sample_name(index)}: image is {image.shape[1]}x{image.shape[0]} "
                            f"but its label {self.label_source(index)} is {label.shape[1]}x{label.shape[0]} "
                            "(width x height)")
        return image, label

    def _transformed(self, epoch: int, index: int, stop: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` through ``self.transforms[:stop]``, drawing from ``rng``.

        A mixing transform (``mixes = True``: CutMix, CopyBlob) also receives a
        function returning another sample of the data set; that sample is drawn
        with the same ``rng`` and passes through the transforms *before* the mixing
        one (so it has been cropped alike) with a generator seeded by
        ``(seed, epoch, other index, position + 1)``. Every draw is therefore a
        function of ``(seed, epoch, index)``, in any worker and after a resume.
        """
        image, label = self.decoded(index)
        for position, transform in enumerate(self.transforms[:stop]):
            if getattr(transform, "mixes", False):
                image, label = transform(image, label, rng, partial(self._other, epoch, index, position, rng))
            else:
                image, label = transform(image, label, rng)
        return image, label

    def _other(self, epoch: int, index: int, position: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Another sample than ``index`` (itself if it is the only one), through the transforms before ``position``."""
        other = int(rng.integers(0, max(len(self) - 1, 1)))
        if len(self) > 1 and other >= index:
            other += 1
        return self._transformed(epoch, other, position,
                                 np.random.default_rng([self.seed, epoch, other, position + 1]))
