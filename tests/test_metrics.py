import json
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, segmentation_metrics


def approx(value):
    return pytest.approx(float(value), abs=1e-12)


# --- segmentation_metrics -------------------------------------------------------

# Rows = ground truth, cols = prediction.
#   GT   = row sums = [4, 7, 6], total 17
#   PRED = col sums = [5, 6, 6]
#   TP   = diagonal = [3, 4, 5]
THREE_CLASS = [[3, 1, 0],
               [2, 4, 1],
               [0, 1, 5]]


def test_three_class_matrix_by_hand():
    m = segmentation_metrics(torch.tensor(THREE_CLASS))
    # pixel_acc = (3 + 4 + 5) / 17
    assert m["pixel_acc"] == approx(Fr(12, 17))
    # recall: 3/4, 4/7, 5/6
    assert m["class_acc"] == [approx(Fr(3, 4)), approx(Fr(4, 7)), approx(Fr(5, 6))]
    assert m["mean_acc"] == approx((Fr(3, 4) + Fr(4, 7) + Fr(5, 6)) / 3)
    # IoU = TP / (GT + PRED - TP): 3/(4+5-3) = 1/2, 4/(7+6-4) = 4/9, 5/(6+6-5) = 5/7
    assert m["class_iou"] == [approx(Fr(1, 2)), approx(Fr(4, 9)), approx(Fr(5, 7))]
    assert m["mIoU"] == approx((Fr(1, 2) + Fr(4, 9) + Fr(5, 7)) / 3)
    # fwIoU = (4 * 1/2 + 7 * 4/9 + 6 * 5/7) / 17
    assert m["fwIoU"] == approx((4 * Fr(1, 2) + 7 * Fr(4, 9) + 6 * Fr(5, 7)) / 17)


def test_ndarray_and_tensor_give_the_same_plain_floats():
    from_tensor = segmentation_metrics(torch.tensor(THREE_CLASS))
    from_array = segmentation_metrics(np.array(THREE_CLASS))
    assert from_tensor == from_array
    assert all(type(from_array[k]) is float for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"))
    json.dumps(from_array)


def test_absent_class_convention():
    # Class 1: predicted once but absent from GT -> IoU 0, counted in mIoU, no accuracy.
    # Class 2: absent from both -> no IoU, excluded from mIoU.
    cm = [[2, 1, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 3]]
    m = segmentation_metrics(cm)
    # class 0: TP 2, GT 3, PRED 2 -> IoU 2/3, acc 2/3; class 3: IoU 1, acc 1
    assert m["class_iou"] == [approx(Fr(2, 3)), 0.0, None, 1.0]
    assert m["class_acc"] == [approx(Fr(2, 3)), None, None, 1.0]
    # mIoU over classes 0, 1, 3: (2/3 + 0 + 1) / 3 = 5/9 (not 5/12, not 5/6)
    assert m["mIoU"] == approx(Fr(5, 9))
    # mean_acc over the classes in GT (0 and 3): (2/3 + 1) / 2 = 5/6
    assert m["mean_acc"] == approx(Fr(5, 6))
    assert m["pixel_acc"] == approx(Fr(5, 6))
    # fwIoU = (3 * 2/3 + 0 * 0 + 3 * 1) / 6 = 5/6
    assert m["fwIoU"] == approx(Fr(5, 6))


def test_empty_matrix_gives_zero_aggregates_and_no_class_values():
    m = segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert (m["pixel_acc"], m["mean_acc"], m["mIoU"], m["fwIoU"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["class_iou"] == [None, None, None]
    assert m["class_acc"] == [None, None, None]


def test_class_names_give_iou_by_name():
    m = segmentation_metrics(THREE_CLASS, class_names=["sky", "road", "car"])
    assert m["class_iou_by_name"] == {"sky": approx(Fr(1, 2)), "road": approx(Fr(4, 9)),
                                      "car": approx(Fr(5, 7))}
    assert "class_iou_by_name" not in segmentation_metrics(THREE_CLASS)


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros(3)])
def test_non_square_matrix_is_rejected(bad):
    with pytest.raises(ValueError, match="square"):
        segmentation_metrics(bad)


def test_wrong_number_of_class_names_is_rejected():
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        segmentation_metrics(THREE_CLASS, class_names=["a", "b"])


# --- ConfusionMatrix ----------------------------------------------------------------

def test_matrix_matches_a_hand_built_one():
    target = torch.tensor([[[0, 1, 2], [2, 255, 1]]])
    pred = torch.tensor([[[0, 2, 2], [1, 0, 1]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # (gt, pred) pairs: (0,0) (1,2) (2,2) (2,1) (1,1); the void pixel is dropped.
    expected = torch.tensor([[1, 0, 0],
                             [0, 1, 1],
                             [0, 1, 1]])
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)


def test_ignored_pixels_count_nowhere():
    target = torch.tensor([[[0, 255], [1, 255]]])
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(torch.tensor([[[0, 0], [1, 2]]]), target)
    b.update(torch.tensor([[[0, 2], [1, 1]]]), target)
    assert torch.equal(a.matrix, b.matrix)
    assert torch.equal(a.matrix, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]]))


def test_custom_ignore_index():
    cm = ConfusionMatrix(2, ignore_index=-1)
    cm.update(torch.tensor([[1, 0, 1]]), torch.tensor([[1, -1, 0]]))
    assert torch.equal(cm.matrix, torch.tensor([[0, 1], [0, 1]]))


def test_accumulated_updates_equal_one_update_on_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (2, 5, 6), generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 4, (2, 5, 6), generator=gen) for _ in range(3)]
    for t in targets:
        t[t == 3] = 255
    stepwise, at_once = ConfusionMatrix(4), ConfusionMatrix(4)
    for p, t in zip(preds, targets):
        stepwise.update(p, t)
    at_once.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(stepwise.matrix, at_once.matrix)
    assert stepwise.matrix.sum() == sum(int((t != 255).sum()) for t in targets)


def test_one_bincount_call_per_update(monkeypatch):
    calls = []
    original = torch.bincount

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "bincount", counting)
    cm = ConfusionMatrix(5)
    cm.update(torch.randint(0, 5, (2, 8, 8)), torch.randint(0, 5, (2, 8, 8)))
    assert len(calls) == 1


def test_reset_clears_the_matrix():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    cm.reset()
    assert torch.equal(cm.matrix, torch.zeros(2, 2, dtype=torch.int64))


def test_all_reduce_is_a_no_op_in_a_single_process():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    assert cm.all_reduce() is cm.matrix
    # (gt, pred) pairs (1, 0) and (1, 1)
    assert torch.equal(cm.matrix, torch.tensor([[0, 0], [1, 1]]))


def test_all_reduce_sums_the_matrix_in_place(monkeypatch):
    # Stand in for two processes that counted the same batch.
    import torch.distributed as dist
    import utils.distributed

    def fake_all_reduce(tensor, op):
        assert op == dist.ReduceOp.SUM
        tensor.mul_(2)

    monkeypatch.setattr(utils.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    matrix = cm.matrix
    cm.all_reduce()
    assert cm.matrix is matrix
    assert torch.equal(cm.matrix, torch.tensor([[0, 0], [2, 2]]))


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_out_of_range_target_names_the_value(bad):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=rf"target value {bad} is neither a class \(0-2\) nor ignore_index 255"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[bad, 1]]))
    assert cm.matrix.sum() == 0


def test_out_of_range_prediction_is_rejected():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="pred value 4"):
        cm.update(torch.tensor([[4, 1]]), torch.tensor([[0, 1]]))


def test_shape_mismatch_and_float_predictions_are_rejected():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(1, 3, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="argmax"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64))
