"""Listing helpers shared by the data sets: folders, split list files, image/label pairing, palettes."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from utils.errors import DataError


def require_dir(path: Path, dataset: str, layout: str) -> Path:
    """``path`` if it is a folder; otherwise a DataError naming it (absolute) and the expected layout."""
    if not path.is_dir():
        raise DataError(f"{dataset}: folder {path.absolute()} not found; {layout}")
    return path


def read_list(path: Path, dataset: str, layout: str) -> list[str]:
    """The non-empty lines of a split list file (one sample name per line, first column)."""
    if not path.is_file():
        raise DataError(f"{dataset}: split list {path} not found; {layout}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def pairs_by_name(names: list[str], image_of: Callable[[str], Path], label_of: Callable[[str], Path],
                  dataset: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` paths of the listed names; a name without its image or label is an error."""
    pairs = [(image_of(name), label_of(name)) for name in names]
    for kind, column in (("image", 0), ("label", 1)):
        missing = [pair[column] for pair in pairs if not pair[column].is_file()]
        if missing:
            raise DataError(f"{dataset}: {len(missing)} listed {kind}(s) missing, e.g. {missing[0]}")
    return pairs


def pairs_by_suffix(image_dir: Path, image_suffix: str, label_of: Callable[[Path], Path],
                    dataset: str) -> list[tuple[Path, Path]]:
    """Every ``*image_suffix`` file below ``image_dir`` (sorted) with its label; a missing label is an error."""
    images = sorted(image_dir.rglob(f"*{image_suffix}"))
    pairs = [(image, label_of(image)) for image in images]
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        raise DataError(f"{dataset}: no label for {len(missing)} image(s) in {image_dir}, "
                        f"e.g. {missing[0]} is missing")
    return pairs


def bit_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for ``count`` classes by spreading the bits of the index over R, G, B.

    This is the scheme of the Pascal VOC development kit, whose first 21 entries
    are VOC's own colours; other data sets without an official palette use it too.
    """
    colors = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((r, g, b))
    return tuple(colors)
