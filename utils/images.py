"""Reading image and label files, and turning ``uint8`` batches into model input.

Images are decoded by OpenCV as RGB ``uint8``; labels keep the values and depth
they were stored with. A missing or corrupt file is a :class:`DataError` that
names the file.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from utils.errors import DataError

#: The first eight bytes of every PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def read_image(path) -> np.ndarray:
    """Read an image file as RGB ``uint8``; a missing or corrupt file names the file.

    The EXIF orientation of a JPEG is ignored, as it is for label files: both
    keep the pixel grid they were stored with, so a photo marked "rotated"
    stays aligned with its label (``python -m tools.doctor`` reports such files).
    """
    data = _read_bytes(path)
    # imdecode returns None for undecodable bytes but raises on an empty buffer.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path, color: bool = False, hint: str = "") -> np.ndarray:
    """Read a label image without changing its values.

    Args:
        path: the label file.
        color: expect an RGB colour mask (masks mapped through a palette).
        hint: appended to the error of a mask with the wrong number of channels (the setting that fixes it).

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
                            f"{label.dtype} image (class-index masks are read without a palette){hint}")
        return label
    if label.ndim == 3:
        raise DataError(f"{path}: label has {label.shape[2]} channels; expected a single-channel "
                        f"image of class indices{hint}")
    return label


def _is_palette_png(data: np.ndarray) -> bool:
    """Whether ``data`` is a PNG of colour type 3 (palette): the byte after IHDR's size and depth."""
    return data.size > 25 and data[:8].tobytes() == PNG_SIGNATURE and int(data[25]) == 3


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
