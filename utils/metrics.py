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
- ``precision_c = TP_c / PRED_c``, ``recall_c = TP_c / GT_c`` (the same as
  ``acc_c``) and ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) = 2 TP_c / (GT_c + PRED_c)``
  (F1 is the Dice coefficient). A class whose denominator is empty (no
  predicted pixel for precision, no ground-truth pixel for recall, neither for
  F1) has no value (``None``, NaN internally) and is left out of
  ``mean_precision``, ``mean_recall`` and ``mean_f1``, as for IoU.
- The means over classes (``mIoU``, ``mean_acc``, ``mean_precision``,
  ``mean_recall``, ``mean_f1``) can be restricted to some classes
  (``metric_classes``) or leave some out (``exclude``, e.g. a background class);
  per-class values, ``pixel_acc`` and ``fwIoU`` always cover every class.
- With no valid pixel at all (an empty matrix) the aggregate scores are 0.0
  rather than NaN, so they stay JSON-serialisable and comparable when picking
  the best checkpoint; every per-class value is then ``None``.
- Every score is a function of the matrix alone: under ``torchrun`` the matrix
  is summed over the processes first (:meth:`ConfusionMatrix.all_reduce`), so
  the scores are those of the whole data set, never averages of per-process
  scores.
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


ClassRefs = Sequence[int | str]


def selected_classes(num_classes: int, class_names: Sequence[str] | None = None,
                     metric_classes: ClassRefs | None = None, exclude: ClassRefs | None = None) -> list[int]:
    """The indices of the classes the means average over, in order.

    Args:
        num_classes: C.
        class_names: the C names; needed to refer to classes by name.
        metric_classes: only these classes (indices or names); None: all.
        exclude: all classes (or those of ``metric_classes``) but these.

    Raises:
        ValueError: for a class that is neither an index (0 to C-1) nor one of the names, a name
            without ``class_names``, both ``metric_classes`` and ``exclude``, or no class left.
    """
    if metric_classes is not None and exclude:
        raise ValueError("give metric_classes (the classes to average) or exclude (the classes to leave out), "
                         "not both")

    def index(ref: int | str, what: str) -> int:
        if isinstance(ref, str):
            if class_names is None:
                raise ValueError(f"{what}: class '{ref}' is given by name, but no class names were given")
            if ref not in class_names:
                raise ValueError(f"{what}: '{ref}' is not a class; the classes are {', '.join(class_names)}")
            return list(class_names).index(ref)
        if isinstance(ref, (bool, np.bool_)) or not isinstance(ref, (int, np.integer)) or not 0 <= ref < num_classes:
            raise ValueError(f"{what}: {ref!r} is not a class index (0-{num_classes - 1}) or name")
        return int(ref)

    chosen = range(num_classes) if metric_classes is None else \
        sorted({index(ref, "metric_classes") for ref in metric_classes})
    left_out = {index(ref, "exclude") for ref in exclude or ()}
    kept = [c for c in chosen if c not in left_out]
    if not kept:
        raise ValueError("no class is left to average over (metric_classes/exclude select none)")
    return kept


def _mean(values: np.ndarray, classes: list[int]) -> float:
    """The mean of ``values[classes]`` that are not NaN; 0.0 when none is."""
    chosen = values[classes]
    chosen = chosen[~np.isnan(chosen)]
    return float(chosen.mean()) if chosen.size else 0.0


def _per_class(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0."""
    out = np.full_like(numerator, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def segmentation_metrics(confusion: torch.Tensor | np.ndarray,
                         class_names: Sequence[str] | None = None,
                         metric_classes: ClassRefs | None = None,
                         exclude: ClassRefs | None = None) -> dict:
    """Scores of a confusion matrix; see the module docstring for the conventions.

    Args:
        confusion: ``(C, C)`` pixel counts, rows = ground truth, cols = prediction (under
            ``torchrun``: the matrix summed over the processes).
        class_names: optional C names; adds ``class_iou_by_name``, and classes may then be
            named in ``metric_classes`` and ``exclude``.
        metric_classes: the classes (indices or names) the means average over; None: all.
        exclude: classes (indices or names) left out of the means, e.g. ``["background"]``.

    Returns:
        ``{"pixel_acc", "mean_acc", "mIoU", "fwIoU", "mean_precision", "mean_recall",
        "mean_f1"}`` as floats; ``"class_iou"``, ``"class_acc"``, ``"class_precision"``,
        ``"class_recall"`` and ``"class_f1"`` as lists of float-or-None; ``"class_iou_by_name"``
        (name -> float-or-None) if names were given; and, when ``metric_classes`` or ``exclude``
        is given, ``"metric_classes"``: the classes the means cover (names if given, else indices).

    Raises:
        ValueError: for a matrix that is not square, a wrong number of names, or a class
            selection that :func:`selected_classes` rejects.
    """
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if class_names is not None and len(class_names) != cm.shape[0]:
        raise ValueError(f"got {len(class_names)} class names for a {cm.shape[0]}-class confusion matrix")
    classes = selected_classes(cm.shape[0], class_names, metric_classes, exclude)

    tp = np.diag(cm)
    gt = cm.sum(axis=1)  # TP + FN
    predicted = cm.sum(axis=0)  # TP + FP
    total = cm.sum()

    iou = _ratio(tp, gt + predicted - tp)
    recall = _ratio(tp, gt)
    precision = _ratio(tp, predicted)
    f1 = _ratio(2 * tp, gt + predicted)  # 2TP + FP + FN
    iou_or_zero = np.nan_to_num(iou, nan=0.0)
    result = {
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": _mean(recall, classes),
        "mIoU": _mean(iou, classes),
        "fwIoU": float((gt * iou_or_zero).sum() / total) if total else 0.0,
        "mean_precision": _mean(precision, classes),
        "mean_recall": _mean(recall, classes),
        "mean_f1": _mean(f1, classes),
        "class_iou": _per_class(iou),
        "class_acc": _per_class(recall),
        "class_precision": _per_class(precision),
        "class_recall": _per_class(recall),
        "class_f1": _per_class(f1),
    }
    if class_names is not None:
        result["class_iou_by_name"] = dict(zip(class_names, result["class_iou"]))
    if metric_classes is not None or exclude:
        result["metric_classes"] = [class_names[c] for c in classes] if class_names is not None else classes
    return result


def confusion_matrix_json(confusion: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> dict:
    """The confusion matrix as plain JSON: ``{"class_names", "rows", "columns", "matrix"}``.

    ``matrix[i][j]`` (ints) counts the pixels of ground-truth class ``class_names[i]``
    predicted as ``class_names[j]``; ignored pixels count nowhere.
    """
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.detach().cpu().numpy()
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"expected a ({len(class_names)}, {len(class_names)}) confusion matrix for "
                         f"{len(class_names)} class names, got shape {cm.shape}")
    return {"class_names": list(class_names), "rows": "ground truth", "columns": "prediction",
            "matrix": [[int(v) for v in row] for row in cm.tolist()]}
