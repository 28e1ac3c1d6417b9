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
:func:`normalize_batch`; a label in the smallest integer type that holds the
classes and the ignore value (``uint8`` for every usual data set).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import DataError

# A value that no label mapping produces (any ignore_index, even -1, differs from it);
# marks raw label values that are neither a class nor void.
_INVALID = np.iinfo(np.int64).min

JointTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


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

    # --- label mapping -------------------------------------------------------
    @classmethod
    def label_lut(cls, ignore_index: int) -> np.ndarray:
        """A 256-entry lookup table from raw label values to class indices."""
        lut = np.full(256, _INVALID, dtype=np.int64)
        # Default: labels hold class indices, and the ignore value itself is void.
        mapping = cls.label_map if cls.label_map is not None else {i: i for i in range(cls.num_classes())}
        if cls.label_map is None and 0 <= ignore_index < 256:
            mapping = {**mapping, ignore_index: None}
        for raw, cls_index in mapping.items():
            lut[raw] = ignore_index if cls_index is None else cls_index
        return lut

    def map_label(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Map a raw label array to class indices; an unknown value names the file."""
        return apply_label_lut(raw, self._lut, source, self.num_classes())

    # --- listing and decoding ------------------------------------------------
    def _list_samples(self) -> list:
        """The samples of ``self.split``: usually ``(image_path, label_path)`` pairs."""
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        return str(self.samples[index][0])

    def load_image(self, index: int) -> np.ndarray:
        """RGB ``uint8`` array ``(H, W, 3)``."""
        return read_image(self.samples[index][0])

    def load_label(self, index: int) -> np.ndarray:
        """Raw label array ``(H, W)`` before mapping."""
        return read_label(self.samples[index][1])

    def label_source(self, index: int) -> str:
        return str(self.samples[index][1])

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
        image = self.load_image(index)
        label = self.map_label(self.load_label(index), self.label_source(index))
        if image.shape[:2] != label.shape[:2]:
            raise DataError(f"{self.sample_name(index)}: image is {image.shape[1]}x{image.shape[0]} "
                            f"but its label {self.label_source(index)} is {label.shape[1]}x{label.shape[0]} "
                            "(width x height)")
        rng = np.random.default_rng([self.seed, epoch, index])
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))


def _smallest_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest of uint8, int16, int32, int64 that holds ``low .. high``."""
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool = False) -> torch.Tensor:
    """The model input: ``uint8`` images ``(N, H, W, C)`` -> float ``(N, C, H, W)``, ``(x/255 - mean) / std``.

    Runs wherever ``images`` are (the trainer moves the bytes to the device
    first, so the float conversion happens there). ``channels_last`` keeps
    the ``(N, H, W, C)`` memory layout, which some convolutions run faster on.
    """
    scale = torch.tensor(std, device=images.device, dtype=torch.float32).mul_(255.0).view(1, -1, 1, 1)
    shift = torch.tensor(mean, device=images.device, dtype=torch.float32).mul_(255.0).view(1, -1, 1, 1)
    batch = images.permute(0, 3, 1, 2).float().sub_(shift).div_(scale)
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def apply_label_lut(raw: np.ndarray, lut: np.ndarray, source: str, num_classes: int) -> np.ndarray:
    """Map raw label values through ``lut`` (see :meth:`BaseDataSet.label_lut`).

    Returns:
        The class-index map in the smallest integer type that holds the
        table's values (``uint8`` for the usual classes and ignore value).

    Raises:
        DataError: naming ``source`` and the first value that is neither a class nor void.
    """
    if raw.dtype != np.uint8:
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0 or high > 255:
            bad = low if low < 0 else high
            raise DataError(f"{source}: label value {bad} is neither a class (0-{num_classes - 1}) nor void")
        raw = raw.astype(np.uint8)
    # Check the values present (a 256-bin count), then map in the compact type: no int64 copy.
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    unknown = present[lut[present] == _INVALID]
    if unknown.size:
        raise DataError(f"{source}: label value {int(unknown[0])} is neither a class "
                        f"(0-{num_classes - 1}) nor void")
    known = lut[lut != _INVALID]
    return lut.astype(_smallest_int_dtype(int(known.min()), int(known.max())))[raw]


def read_image(path) -> np.ndarray:
    """Read an image file as RGB ``uint8``; a missing or corrupt file names the file.

    The EXIF orientation of a JPEG is ignored, as it is for label files: both
    keep the pixel grid they were stored with, so a photo marked "rotated"
    stays aligned with its label (``python -m utils.doctor`` reports such files).
    """
    data = _read_bytes(path)
    # imdecode returns None for undecodable bytes but raises on an empty buffer.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path) -> np.ndarray:
    """Read a single-channel label image unchanged.

    PIL is used rather than OpenCV because OpenCV expands palette PNGs (the VOC
    format) to colours, while PIL returns their class indices.
    """
    try:
        with Image.open(path) as img:
            img.load()
            label = np.array(img)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: cannot read (no such file)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable label image (corrupt or unsupported format)") from exc
    if label.ndim == 3:
        raise DataError(f"{path}: label has {label.shape[2]} channels; expected a single-channel "
                        "image of class indices")
    return label


def _read_bytes(path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
