"""Label tables: raw label values or colours to class indices, by lookup table."""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from utils.errors import DataError

# A value that no label mapping produces (any ignore_index, even -1, differs from it);
# marks raw label values that are neither a class nor void.
UNMAPPED = np.iinfo(np.int64).min


def _smallest_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest of uint8, int16, int32, int64 that holds ``low .. high``."""
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


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


def apply_color_map(rgb: np.ndarray, colors: Mapping[tuple[int, int, int], int], source: str,
                    hint: str = "") -> np.ndarray:
    """Map an RGB colour mask ``(H, W, 3)`` to class indices through ``colors`` (colour -> index).

    ``hint`` is appended to the error of an unknown colour (the setting that fixes it).

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
                        f"{int((codes == bad).sum())} pixel(s) is neither a class colour nor void{hint}")
    return values.astype(_smallest_int_dtype(int(values.min()), int(values.max())))[where]
