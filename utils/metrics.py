"""Confusion-matrix accumulation and the segmentation scores derived from it.

Conventions (C classes; rows of the confusion matrix are ground truth, columns
are predictions; ``TP_c`` is the diagonal, ``GT_c`` a row sum, ``PRED_c`` a
column sum):

- Pixels labelled ``ignore_index`` count nowhere: not in any score, not as a
  false positive of the predicted class.
- ``IoU_c = TP_c / (GT_c + PRED_c - TP_c)``. A class absent from both the
  ground truth and the predictions has no IoU (``None``) and is left out of
  ``mIoU``. A class that is predicted but absent from the ground truth has
  IoU 0 and does count: those pixels are plain false positives.
- ``acc_c = TP_c / GT_c`` (per-class recall) is ``None`` for a class without
  ground-truth pixels; ``mean_acc`` averages the classes present in the
  ground truth.
- ``pixel_acc = sum(TP) / total`` and ``fwIoU = sum_c (GT_c / total) * IoU_c``
  (classes without ground truth weigh 0).
- With no valid pixel at all (an empty matrix) the aggregate scores are 0.0
  rather than NaN, so they stay JSON-serialisable and comparable when picking
  the best checkpoint; every per-class value is then ``None``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from utils.distributed import all_reduce_sum


class ConfusionMatrix:
    """A ``(C, C)`` int64 pixel count matrix, rows = ground truth, cols = prediction.

    Args:
        num_classes: number of classes C.
        ignore_index: label value of void pixels, which are not counted.
        device: where ``matrix`` lives (default CPU). Counting happens on the
            device of the tensors given to :meth:`update`; with the NCCL
            backend the matrix must be on the GPU for :meth:`all_reduce`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: predicted class indices (the argmax of the logits).
            target: ground-truth class indices, ``ignore_index`` for void.

        Shape:
            ``pred`` and ``target``: the same shape, usually ``(N, H, W)``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer class indices "
                             "(take the argmax of the logits first)")
        c = self.num_classes
        valid = target != self.ignore_index
        truth = target[valid].long()
        guess = pred[valid].long()
        if truth.numel():
            self._check_range(truth, guess)
        counts = torch.bincount(truth * c + guess, minlength=c * c)
        self.matrix += counts.reshape(c, c).to(self.matrix.device)

    def _check_range(self, truth: torch.Tensor, guess: torch.Tensor) -> None:
        # One host sync for both bounds; bincount itself syncs on CUDA anyway.
        t_min, t_max, p_min, p_max = torch.stack([*torch.aminmax(truth), *torch.aminmax(guess)]).tolist()
        c = self.num_classes
        for low, high, what in ((t_min, t_max, "target"), (p_min, p_max, "pred")):
            if low < 0 or high >= c:
                bad = low if low < 0 else high
                extra = f" nor ignore_index {self.ignore_index}" if what == "target" else ""
                raise ValueError(f"{what} value {bad} is neither a class (0-{c - 1}){extra}")

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> torch.Tensor:
        """Sum the matrix over all processes (a no-op without torchrun); returns it."""
        return all_reduce_sum(self.matrix)


def segmentation_metrics(confusion: torch.Tensor | np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict:
    """Scores of a confusion matrix; see the module docstring for the conventions.

    Args:
        confusion: ``(C, C)`` pixel counts, rows = ground truth, cols = prediction.
        class_names: optional C names; adds ``class_iou_by_name``.

    Returns:
        ``{"pixel_acc", "mean_acc", "mIoU", "fwIoU"}`` as floats,
        ``"class_iou"`` and ``"class_acc"`` as lists of float-or-None, and
        ``"class_iou_by_name"`` (name -> float-or-None) if names were given.
    """
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if class_names is not None and len(class_names) != cm.shape[0]:
        raise ValueError(f"got {len(class_names)} class names for a {cm.shape[0]}-class confusion matrix")

    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = gt + predicted - tp
    total = cm.sum()
    has_gt = gt > 0
    seen = union > 0

    iou = np.divide(tp, union, out=np.zeros_like(tp), where=seen)
    acc = np.divide(tp, gt, out=np.zeros_like(tp), where=has_gt)
    result = {
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": float(acc[has_gt].mean()) if has_gt.any() else 0.0,
        "mIoU": float(iou[seen].mean()) if seen.any() else 0.0,
        "fwIoU": float((gt * iou).sum() / total) if total else 0.0,
        "class_iou": [float(v) if ok else None for v, ok in zip(iou, seen)],
        "class_acc": [float(v) if ok else None for v, ok in zip(acc, has_gt)],
    }
    if class_names is not None:
        result["class_iou_by_name"] = dict(zip(class_names, result["class_iou"]))
    return result
