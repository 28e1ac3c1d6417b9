"""Colouring predictions: palette PNGs, overlays and image grids."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def palette_array(palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """A ``(256, 3)`` uint8 lookup table: class colours, black elsewhere (white for ignore)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    if 0 <= ignore_index < 256 and ignore_index >= len(palette):
        table[ignore_index] = 255
    return table


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """Class-index mask ``(H, W)`` -> RGB ``uint8`` image ``(H, W, 3)``."""
    return palette_array(palette, ignore_index)[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask on an RGB ``uint8`` image; ``alpha`` is the mask's weight."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask, palette).astype(np.float32)
    return blended.round().astype(np.uint8)


def save_palette_png(mask: np.ndarray, palette: Sequence[Sequence[int]], path: str | Path) -> None:
    """Save a mask as a palette-mode PNG: pixel values are class indices, shown in colour."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(palette_array(palette).reshape(-1).tolist())
    img.save(path)


def save_rgb_png(image: np.ndarray, path: str | Path) -> None:
    """Save an RGB ``uint8`` image ``(H, W, 3)``."""
    Image.fromarray(image).save(path)


def prediction_grid(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                    palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """Rows of (image | ground truth | prediction) as one ``(3, H', W')`` uint8 array for TensorBoard.

    Args:
        images: RGB ``uint8`` images ``(N, H, W, 3)``, as the data sets give them.
        targets, preds: class indices ``(N, H, W)``.
    """
    rows = []
    for image, target, pred in zip(images, targets, preds):
        rows.append(np.concatenate([image.cpu().numpy(), colorize(target.cpu().numpy(), palette, ignore_index),
                                    colorize(pred.cpu().numpy(), palette, ignore_index)], axis=1))
    return np.concatenate(rows, axis=0).transpose(2, 0, 1)


def save_confusion_plot(confusion: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Save the confusion matrix normalised by rows (each ground-truth class sums to 1) as a PNG.

    Cell ``(i, j)`` is the fraction of class ``i``'s pixels predicted as ``j``, so
    the diagonal is each class's accuracy; classes without ground truth are blank.
    """
    from utils.plots import pyplot

    plt = pyplot()

    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    shown = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90)
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if len(class_names) <= 30:  # numbers stay legible
        for i, j in zip(*np.nonzero(np.isfinite(normalised))):
            value = normalised[i, j]
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
