"""Joint (image, label) augmentations, implemented with OpenCV on NumPy arrays.

Every transform is called as ``transform(image, label, rng)`` with an RGB
``uint8`` image ``(H, W, 3)``, an integer label ``(H, W)`` of class indices
(``uint8`` for the usual data sets; transforms keep its type) and a
``numpy.random.Generator``; it returns the new pair. Labels are always resampled
with nearest neighbour, and any area a transform invents (crop padding, rotation
corners) is filled with ``ignore_index`` in the label, never with a real class.
Config: ``"transforms": [{"type": "RandomScale", "args": {"min_scale": 0.5}}, ...]``
in a loader's ``args``; transforms that fill the label declare ``ignore_index``,
which the framework injects. A transform that sets the output size says whether
that size is fixed (``fixed_size``): on CUDA, fixed-size training batches let
cuDNN pick its fastest kernels once (``torch.backends.cudnn.benchmark``), and
validation batches of more than one image need one size. A transform whose size
is not fixed but follows from the input's alone (``Resize`` of the shorter side)
says ``keeps_one_size``: images of one size still come out at one size.

Mixing transforms (``mixes = True``: :class:`CutMix`, :class:`CopyBlob`) are
called as ``transform(image, label, rng, other)``, where ``other()`` returns
another sample of the data set that went through the transforms listed before
this one (see :meth:`base.base_dataset.BaseDataSet._transformed`). They copy the
current pair before pasting into it, since decoded arrays may be shared.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from utils.registry import TRANSFORMS


def _label_op(label: np.ndarray, op) -> np.ndarray:
    """Apply an OpenCV operation to a label, keeping its integer type (OpenCV has no int64)."""
    if label.dtype == np.int64:
        return op(label.astype(np.int32)).astype(np.int64)
    return op(label)


def _resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int):
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = _label_op(label, lambda lab: cv2.resize(lab, (width, height), interpolation=cv2.INTER_NEAREST))
    return image, label


def _pair(value: int | list[int], name: str) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{name} must be a positive integer or [height, width], got {value!r}")
    return int(size[0]), int(size[1])


@TRANSFORMS.register
class Resize:
    """Resize to a fixed ``[height, width]``; an int resizes the shorter side to it.

    Args:
        size: ``[height, width]``, or one int for the shorter side (aspect ratio kept).
    """

    def __init__(self, size: int | list[int]) -> None:
        self.size = size if isinstance(size, int) else _pair(size, "size")
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.fixed_size = not isinstance(size, int)

    #: The output size is a function of the input size (no chance): images of one size stay of one size.
    keeps_one_size = True

    def __call__(self, image, label, rng):
        h, w = image.shape[:2]
        if isinstance(self.size, int):
            scale = self.size / min(h, w)
            return _resize_pair(image, label, round(h * scale), round(w * scale))
        return _resize_pair(image, label, *self.size)


@TRANSFORMS.register
class RandomScale:
    """Rescale by a factor drawn uniformly from ``[min_scale, max_scale]``.

    Args:
        min_scale: smallest scale factor.
        max_scale: largest scale factor.
    """

    fixed_size = False

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
        self.min_scale, self.max_scale = min_scale, max_scale

    def __call__(self, image, label, rng):
        scale = rng.uniform(self.min_scale, self.max_scale)
        h, w = image.shape[:2]
        return _resize_pair(image, label, max(1, round(h * scale)), max(1, round(w * scale)))


@TRANSFORMS.register
class RandomCrop:
    """Crop ``[height, width]`` at a random place, padding first if the image is smaller.

    The image is padded with ``pad_value`` (default: black) and the label with
    ``ignore_index`` so the padding never counts as a class.

    Args:
        size: ``[height, width]`` of the crop, or one int for a square.
        pad_value: image value of the padding (0-255, all channels).
    """

    fixed_size = True

    def __init__(self, size: int | list[int], pad_value: int = 0, ignore_index: int = 255) -> None:
        self.height, self.width = _pair(size, "size")
        self.pad_value = pad_value
        self.ignore_index = ignore_index

    def __call__(self, image, label, rng):
        h, w = image.shape[:2]
        pad_h, pad_w = max(self.height - h, 0), max(self.width - w, 0)
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                                       value=(self.pad_value,) * 3)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
            h, w = image.shape[:2]
        top = int(rng.integers(0, h - self.height + 1))
        left = int(rng.integers(0, w - self.width + 1))
        return (image[top:top + self.height, left:left + self.width],
                label[top:top + self.height, left:left + self.width])


@TRANSFORMS.register
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``.

    Args:
        p: probability of flipping.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label


@TRANSFORMS.register
class RandomRotate:
    """Rotate by an angle drawn uniformly from ``[-degrees, degrees]``.

    Corners that come from outside the image are black in the image and
    ``ignore_index`` in the label.

    Args:
        degrees: largest rotation in degrees, either way.
    """

    def __init__(self, degrees: float = 10.0, ignore_index: int = 255) -> None:
        if degrees < 0:
            raise ValueError(f"degrees must be >= 0, got {degrees}")
        self.degrees = degrees
        self.ignore_index = ignore_index

    def __call__(self, image, label, rng):
        angle = rng.uniform(-self.degrees, self.degrees)
        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        label = _label_op(label, lambda lab: cv2.warpAffine(
            lab, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.ignore_index))
        return image, label


@TRANSFORMS.register
class GaussianBlur:
    """Blur the image (not the label) with probability ``p``, sigma in ``[0.1, max_sigma]``.

    Args:
        p: probability of blurring.
        max_sigma: largest Gaussian sigma in pixels.
    """

    def __init__(self, p: float = 0.5, max_sigma: float = 1.5) -> None:
        if not 0 <= p <= 1 or max_sigma <= 0:
            raise ValueError("need 0 <= p <= 1 and max_sigma > 0")
        self.p, self.max_sigma = p, max_sigma

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.1, self.max_sigma))
        return image, label


@TRANSFORMS.register
class ColorJitter:
    """Random brightness and contrast factors in ``[1 - x, 1 + x]``, applied to the image only.

    Args:
        brightness: largest relative brightness change.
        contrast: largest relative contrast change (about the image mean).
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2) -> None:
        if brightness < 0 or contrast < 0:
            raise ValueError("brightness and contrast must be >= 0")
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, image, label, rng):
        alpha = rng.uniform(1 - self.contrast, 1 + self.contrast)
        beta = 255.0 * (rng.uniform(1 - self.brightness, 1 + self.brightness) - 1)
        shift = beta + (1 - alpha) * image.mean()  # contrast about the image mean
        out = np.clip(image.astype(np.float32) * alpha + shift, 0, 255).astype(np.uint8)
        return out, label


def _check_probability(p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")


@TRANSFORMS.register
class PhotoMetricDistortion:
    """Brightness, contrast, saturation and hue changes (each with probability 1/2), image only.

    Brightness adds a value in ``[-brightness, brightness]``; contrast multiplies by a
    factor in ``contrast``; saturation and hue are changed in HSV (OpenCV's hue runs
    0-179, so ``hue`` is in those units). Contrast comes before or after the HSV
    changes at random. Every step is a 256-entry table lookup on ``uint8``.

    Args:
        brightness: largest brightness shift (0-255 units).
        contrast: ``[low, high]`` contrast factors.
        saturation: ``[low, high]`` saturation factors.
        hue: largest hue shift (OpenCV units, 0-179 is the full circle).
    """

    def __init__(self, brightness: int = 32, contrast: list[float] = (0.5, 1.5),
                 saturation: list[float] = (0.5, 1.5), hue: int = 18) -> None:
        for name, value in (("contrast", contrast), ("saturation", saturation)):
            if len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got {list(value)}")
        if not 0 <= brightness <= 255 or not 0 <= hue <= 90:
            raise ValueError(f"need 0 <= brightness <= 255 and 0 <= hue <= 90, got {brightness} and {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, tuple(contrast), tuple(saturation), hue

    def __call__(self, image, label, rng):
        values = np.arange(256, dtype=np.float32)
        shift = rng.uniform(-self.brightness, self.brightness) if rng.random() < 0.5 else 0.0
        factor = rng.uniform(*self.contrast) if rng.random() < 0.5 else 1.0
        contrast_first = rng.random() < 0.5
        saturation = rng.uniform(*self.saturation) if rng.random() < 0.5 else 1.0
        hue = int(rng.integers(-self.hue, self.hue + 1)) if rng.random() < 0.5 else 0
        brightness_lut = values + shift
        contrast_lut = values * factor
        if contrast_first:
            image = cv2.LUT(image, _to_uint8(contrast_lut[_to_uint8(brightness_lut)]))
        else:
            image = cv2.LUT(image, _to_uint8(brightness_lut))
        if saturation != 1.0 or hue:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            hue_lut = np.where(values < 180, (values + hue) % 180, values)
            hsv = cv2.LUT(hsv, np.stack([_to_uint8(hue_lut), _to_uint8(values * saturation),
                                         values.astype(np.uint8)], axis=-1).reshape(1, 256, 3))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and factor != 1.0:
            image = cv2.LUT(image, _to_uint8(contrast_lut))
        return image, label


def _to_uint8(table: np.ndarray) -> np.ndarray:
    return np.clip(np.round(table), 0, 255).astype(np.uint8)


@TRANSFORMS.register
class RandomResizedCrop:
    """Crop a random area and aspect ratio, then resize it to ``size``; optionally cap one class's share.

    With ``cat_max_ratio < 1`` the crop is drawn again (up to ``max_tries`` times)
    while a single class covers more than that share of its labelled pixels, as
    mmsegmentation's ``cat_max_ratio``; a crop with only one class is always redrawn.
    The last draw is kept if none passes.

    Args:
        size: ``[height, width]`` of the output, or one int for a square.
        scale: ``[low, high]`` share of the image area that the crop covers.
        ratio: ``[low, high]`` aspect ratios (width / height) of the crop.
        cat_max_ratio: largest share of one class in the crop; 1 disables the check.
        max_tries: crops drawn at most to meet ``cat_max_ratio``.
    """

    fixed_size = True

    def __init__(self, size: int | list[int], scale: list[float] = (0.25, 1.0),
                 ratio: list[float] = (0.75, 1.3333), cat_max_ratio: float = 1.0, max_tries: int = 10,
                 ignore_index: int = 255) -> None:
        self.height, self.width = _pair(size, "size")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be [low, high] with 0 < low <= high, got {list(ratio)}")
        if not 0 < cat_max_ratio <= 1 or max_tries < 1:
            raise ValueError(f"need 0 < cat_max_ratio <= 1 and max_tries >= 1, got {cat_max_ratio}, {max_tries}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.cat_max_ratio, self.max_tries, self.ignore_index = cat_max_ratio, max_tries, ignore_index

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = rng.uniform(*self.scale) * h * w
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        crop_h = min(h, max(1, round(math.sqrt(area / aspect))))
        crop_w = min(w, max(1, round(math.sqrt(area * aspect))))
        top, left = int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1))
        return top, left, crop_h, crop_w

    def _balanced(self, crop: np.ndarray) -> bool:
        values, counts = np.unique(crop, return_counts=True)
        counts = counts[values != self.ignore_index]
        return len(counts) > 1 and counts.max() <= self.cat_max_ratio * counts.sum()

    def __call__(self, image, label, rng):
        h, w = image.shape[:2]
        for _ in range(self.max_tries):
            top, left, crop_h, crop_w = self._window(h, w, rng)
            if self.cat_max_ratio >= 1 or self._balanced(label[top:top + crop_h, left:left + crop_w]):
                break
        return _resize_pair(image[top:top + crop_h, left:left + crop_w],
                            label[top:top + crop_h, left:left + crop_w], self.height, self.width)


Other = Callable[[], tuple[np.ndarray, np.ndarray]]


@TRANSFORMS.register
class CutMix:
    """Paste a box of another sample (image and label) onto this one, with probability ``p``.

    The box covers a share of the image drawn from ``[min_area, max_area]``, with an
    aspect ratio between 1:2 and 2:1, at a random place; it comes from the same place
    of the other sample (resized to this size first if the sizes differ: list
    CutMix after the crop to avoid that).

    Args:
        p: probability of mixing.
        min_area: smallest share of the image the box covers.
        max_area: largest share.
    """

    mixes = True

    def __init__(self, p: float = 0.5, min_area: float = 0.1, max_area: float = 0.4) -> None:
        _check_probability(p)
        if not 0 < min_area <= max_area <= 1:
            raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area} and {max_area}")
        self.p, self.min_area, self.max_area = p, min_area, max_area

    def __call__(self, image, label, rng, other: Other):
        if rng.random() >= self.p:
            return image, label
        other_image, other_label = other()
        h, w = image.shape[:2]
        if other_image.shape[:2] != (h, w):
            other_image, other_label = _resize_pair(other_image, other_label, h, w)
        area = rng.uniform(self.min_area, self.max_area) * h * w
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        box_h = min(h, max(1, round(math.sqrt(area / aspect))))
        box_w = min(w, max(1, round(math.sqrt(area * aspect))))
        top, left = int(rng.integers(0, h - box_h + 1)), int(rng.integers(0, w - box_w + 1))
        image, label = np.array(image), np.array(label)
        box = (slice(top, top + box_h), slice(left, left + box_w))
        image[box] = other_image[box]
        label[box] = other_label[box]
        return image, label


@TRANSFORMS.register
class CopyBlob:
    """Copy a whole connected blob of a class from another sample onto the surface it stands on.

    For each ``[source, surface]`` pair (class indices, e.g. bus onto road), with
    probability ``p``: one connected component of ``source`` in the other sample is
    chosen at random and pasted (image and label, its own pixels only) so that the
    middle of its bottom row lands on a random ``surface`` pixel of this sample,
    chosen among the places where the whole blob fits inside the image: nothing
    wraps around the border. Pairs without a blob or a place are skipped.

    Args:
        pairs: ``[[source, surface], ...]`` class indices.
        p: probability of pasting, per pair.
    """

    mixes = True

    def __init__(self, pairs: list[list[int]], p: float = 0.5) -> None:
        _check_probability(p)
        if not pairs or not all(len(pair) == 2 and min(pair) >= 0 for pair in pairs):
            raise ValueError(f"pairs must be a non-empty list of [source, surface] class indices, got {pairs!r}")
        self.pairs, self.p = [tuple(pair) for pair in pairs], p

    def __call__(self, image, label, rng, other: Other):
        donor = None
        for source, surface in self.pairs:
            if rng.random() >= self.p:
                continue
            if donor is None:
                donor = other()
                image, label = np.array(image), np.array(label)
            self._paste(image, label, *donor, source, surface, rng)
        return image, label

    @staticmethod
    def _paste(image, label, donor_image, donor_label, source: int, surface: int,
               rng: np.random.Generator) -> None:
        count, components, stats, _ = cv2.connectedComponentsWithStats(
            (donor_label == source).astype(np.uint8), connectivity=8)
        if count < 2:
            return
        blob = int(rng.integers(1, count))
        x, y, blob_w, blob_h = (int(v) for v in stats[blob, :4])
        h, w = label.shape
        if blob_h > h or blob_w > w:
            return
        # Anchor = the bottom-middle pixel of the blob: rows blob_h-1 .. h-1, columns half .. w-blob_w+half.
        half = blob_w // 2
        rows, cols = slice(blob_h - 1, h), slice(half, w - blob_w + half + 1)
        ys, xs = np.nonzero(label[rows, cols] == surface)
        if ys.size == 0:
            return
        pick = int(rng.integers(0, ys.size))
        top, left = int(ys[pick]), int(xs[pick])  # offsets of the anchor window = the blob's top-left corner
        mask = components[y:y + blob_h, x:x + blob_w] == blob
        target = (slice(top, top + blob_h), slice(left, left + blob_w))
        image[target][mask] = donor_image[y:y + blob_h, x:x + blob_w][mask]
        label[target][mask] = source
