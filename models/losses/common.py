"""Pieces shared by the losses: precision, the valid-pixel mask, one-hot targets, safe means."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as float32 when they are float16/bfloat16; float32 and float64 stay as they are.

    Softmax, logarithms and sums over millions of pixels lose too much in half
    precision, so every loss computes in at least float32 (also under autocast).
    """
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def one_hot_valid(target: torch.Tensor, num_classes: int, ignore_index: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid-pixel mask and the one-hot target, zero at void pixels.

    Args:
        target: int64 labels ``(N, H, W)``; not modified.
        num_classes: C.
        ignore_index: label of void pixels.
        dtype: dtype of the one-hot tensor.

    Returns:
        ``(valid, one_hot)``: bool ``(N, H, W)`` and ``(N, C, H, W)`` of ``dtype``.
    """
    valid = target != ignore_index
    # where() gives void pixels an in-range label without touching target.
    one_hot = F.one_hot(torch.where(valid, target, 0), num_classes).permute(0, 3, 1, 2)
    return valid, one_hot.to(dtype) * valid.unsqueeze(1)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, or ``numerator`` (which is then 0) where the denominator is 0.

    Used for means over valid pixels: a batch without any gives 0 and a zero
    gradient instead of NaN. where() instead of an if: no host sync on the GPU.
    """
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
