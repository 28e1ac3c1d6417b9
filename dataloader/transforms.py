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
cuDNN pick its fastest kernels once (``torch.backends.cudnn.benchmark``).
"""
from __future__ import annotations

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
