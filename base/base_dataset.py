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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import DataError

# A value that no label mapping produces (any ignore_index, even -1, differs from it);
# marks raw label values that are neither a class nor void.
UNMAPPED = np.iinfo(np.int64).min

JointTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ClassInfo:
    """The classes of a configured data set: what models, metrics and inference need."""
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

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

    def load_image(self, index: int) -> np.ndarray:
        """RGB ``uint8`` array ``(H, W, 3)``."""
        return read_image(self.samples[index][0])

    def load_label(self, index: int) -> np.ndarray:
        """Raw label array ``(H, W)`` before mapping."""
        return read_label(self.samples[index][1])

    def label_source(self, index: int) -> str:
        return str(self.samples[index][1])

    def unpaired_labels(self) -> list[Path]:
        """Label files in the data set's folders that no sample uses (reported by ``utils.doctor``)."""
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
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # One conversion into the output layout, then x * (1 / (255 std)) - mean / std in place:
    # three passes over the batch instead of five (a fifth of the CPU time).
    # copy=True: float input must not be changed in place (for uint8 the conversion copies anyway).
    batch = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=layout, copy=True)
    return batch.mul_(std_t.mul(255.0).reciprocal_()).sub_(mean_t / std_t)


def make_label_lut(label_map: Mapping[int, int | None] | None, num_classes: int,
                   ignore_index: int) -> np.ndarray:
    """The 256-entry table of ``label_map`` (see :class:`BaseDataSet`); unmapped values get a marker."""
    lut = np.full(256, UNMAPPED, dtype=np.int64)
    # Default: labels hold class indices, and the ignore value itself is void.
    mapping = label_map if label_map is not None else {i: i for i in range(num_classes)}
    if label_map is None and 0 <= ignore_index < 256:
        mapping = {**mapping, ignore_index: None}
    for raw, cls_index in mapping.items():
        lut[raw] = ignore_index if cls_index is None else cls_index
    return lut


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
    unmapped = lut == UNMAPPED
    known = lut[~unmapped]
    dtype = _smallest_int_dtype(int(known.min()), int(known.max()))
    if raw.size == 0:
        return raw.astype(dtype)
    # One table lookup flags the unknown values (cv2.LUT: a tenth of NumPy indexing's time); only
    # a bad file pays for finding which value it was.
    if cv2.countNonZero(cv2.LUT(raw, unmapped.astype(np.uint8)).reshape(raw.shape[0], -1)):
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        raise DataError(f"{source}: label value {int(present[unmapped[present]][0])} is neither a class "
                        f"(0-{num_classes - 1}) nor void")
    table = np.where(unmapped, 0, lut).astype(dtype)
    # Map in the compact type: no int64 copy.
    return cv2.LUT(raw, table) if dtype == np.uint8 else table[raw]


def apply_color_map(rgb: np.ndarray, colors: Mapping[tuple[int, int, int], int], source: str) -> np.ndarray:
    """Map an RGB colour mask ``(H, W, 3)`` to class indices through ``colors`` (colour -> index).

    Returns:
        ``uint8`` (or wider, if an index needs it) ``(H, W)`` indices.

    Raises:
        DataError: naming ``source``, the first colour not in ``colors`` and how many pixels have it.
    """
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colors), dtype=np.int32)
    values = np.array([colors[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in keys.tolist()])
    # A sorted search over the few palette colours: no per-pixel Python and no 16M-entry table.
    where = np.searchsorted(keys, codes).clip(0, len(keys) - 1)
    unknown = keys[where] != codes
    if unknown.any():
        bad = int(codes[unknown][0])
        raise DataError(f"{source}: colour ({bad >> 16}, {(bad >> 8) & 255}, {bad & 255}) in "
                        f"{int((codes == bad).sum())} pixel(s) is neither a class colour nor void")
    return values.astype(_smallest_int_dtype(int(values.min()), int(values.max())))[where]


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


def read_label(path, color: bool = False) -> np.ndarray:
    """Read a label image without changing its values.

    Args:
        path: the label file.
        color: expect an RGB colour mask (masks mapped through a palette).

    Returns:
        ``(H, W)`` values as stored (``uint8``, or ``uint16`` for 16-bit PNGs such
        as Cityscapes' instance maps); with ``color``, an RGB ``uint8`` ``(H, W, 3)``.

    OpenCV decodes (``IMREAD_UNCHANGED``), except palette PNGs (the VOC format),
    whose class indices PIL returns where OpenCV would expand them to colours.
    """
    data = _read_bytes(path)
    if _is_palette_png(data):
        label = _read_palette_png(path, color)
    else:
        # IMREAD_UNCHANGED keeps the stored values, depth and pixel grid (no EXIF rotation).
        label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if label is None:
            raise DataError(f"{path}: not a readable label image (corrupt or unsupported format)")
        if label.ndim == 3 and color:
            label = cv2.cvtColor(label, cv2.COLOR_BGRA2RGB if label.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if color:
        if label.ndim != 3 or label.dtype != np.uint8:
            channels = label.shape[2] if label.ndim == 3 else 1
            raise DataError(f"{path}: expected an 8-bit RGB colour mask, got a {channels}-channel "
                            f"{label.dtype} image (class-index masks are read without a palette)")
        return label
    if label.ndim == 3:
        raise DataError(f"{path}: label has {label.shape[2]} channels; expected a single-channel "
                        "image of class indices")
    return label


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_palette_png(data: np.ndarray) -> bool:
    """Whether ``data`` is a PNG of colour type 3 (palette): the byte after IHDR's size and depth."""
    return data.size > 25 and data[:8].tobytes() == _PNG_SIGNATURE and int(data[25]) == 3


def _read_palette_png(path, color: bool) -> np.ndarray:
    """The indices of a palette PNG, or with ``color`` its colours (annotation tools often save those)."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB") if color else img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable label image (corrupt or unsupported format)") from exc


def _read_bytes(path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
