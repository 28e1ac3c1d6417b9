"""Base class of every segmentation data set.

A data set owns its file listing, decoding and label mapping. Its class names,
palette and normalisation are class attributes, so inference needs no data on
disk. Augmentation is a list of joint (image, label) transforms from config;
normalisation with the data set's own mean/std is always applied last.

Randomness is a pure function of ``(seed, epoch, index)``: the same sample gets
the same augmentation whichever worker loads it and whether or not the run was
resumed, which is what makes resumed training bit-exact.
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

    Each item is ``(image, label)``: a float tensor ``(3, H, W)`` normalised
    with ``mean``/``std`` and an int64 tensor ``(H, W)`` of class indices with
    ``ignore_index`` for void.
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.load_image(index)
        label = self.map_label(self.load_label(index), self.label_source(index))
        if image.shape[:2] != label.shape[:2]:
            raise DataError(f"{self.sample_name(index)}: image is {image.shape[1]}x{image.shape[0]} "
                            f"but its label {self.label_source(index)} is {label.shape[1]}x{label.shape[0]} "
                            "(width x height)")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return self.to_tensor(image), torch.from_numpy(np.ascontiguousarray(label))

    @classmethod
    def to_tensor(cls, image: np.ndarray) -> torch.Tensor:
        """Normalise an RGB ``uint8`` image to a float tensor ``(3, H, W)``."""
        return normalize(image, cls.mean, cls.std)

    @classmethod
    def denormalize(cls, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_tensor` for a batch ``(N, 3, H, W)``, clamped to 0-1."""
        mean = torch.tensor(cls.mean, device=tensor.device).view(1, 3, 1, 1)
        std = torch.tensor(cls.std, device=tensor.device).view(1, 3, 1, 1)
        return (tensor * std + mean).clamp_(0, 1)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB ``uint8`` ``(H, W, 3)`` -> float tensor ``(3, H, W)``: ``(x / 255 - mean) / std``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def apply_label_lut(raw: np.ndarray, lut: np.ndarray, source: str, num_classes: int) -> np.ndarray:
    """Map raw label values through ``lut`` (see :meth:`BaseDataSet.label_lut`).

    Raises:
        DataError: naming ``source`` and the first value that is neither a class nor void.
    """
    if raw.dtype != np.uint8:
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0 or high > 255:
            bad = low if low < 0 else high
            raise DataError(f"{source}: label value {bad} is neither a class (0-{num_classes - 1}) nor void")
        raw = raw.astype(np.uint8)
    mapped = lut[raw]
    invalid = mapped == _INVALID
    if invalid.any():
        raise DataError(f"{source}: label value {int(raw[invalid][0])} is neither a class "
                        f"(0-{num_classes - 1}) nor void")
    return mapped


def read_image(path) -> np.ndarray:
    """Read an image file as RGB ``uint8``; a missing or corrupt file names the file."""
    data = _read_bytes(path)
    # imdecode returns None for undecodable bytes but raises on an empty buffer.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
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
