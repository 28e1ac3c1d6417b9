import json
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, confusion_matrix_json, segmentation_metrics, selected_classes


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


# --- precision, recall, F1 (Dice), class selection, the JSON matrix -------------------------------

# THREE_CLASS: TP = [3, 4, 5], GT = TP + FN = [4, 7, 6], PRED = TP + FP = [5, 6, 6]
PRECISION = [Fr(3, 5), Fr(4, 6), Fr(5, 6)]
RECALL = [Fr(3, 4), Fr(4, 7), Fr(5, 6)]
F1 = [Fr(2 * 3, 4 + 5), Fr(2 * 4, 7 + 6), Fr(2 * 5, 6 + 6)]  # 2TP / (2TP + FP + FN) = 2/3, 8/13, 5/6
IOU = [Fr(1, 2), Fr(4, 9), Fr(5, 7)]
NAMES = ["sky", "road", "car"]


def mean(values):
    return sum(values) / len(values)


def test_precision_recall_f1_by_hand():
    m = segmentation_metrics(THREE_CLASS)
    assert m["class_precision"] == [approx(v) for v in PRECISION]
    assert m["class_recall"] == [approx(v) for v in RECALL] == m["class_acc"]
    assert m["class_f1"] == [approx(v) for v in F1]
    assert m["mean_precision"] == approx(mean(PRECISION))  # (3/5 + 2/3 + 5/6) / 3
    assert m["mean_recall"] == approx(mean(RECALL)) == m["mean_acc"]
    assert m["mean_f1"] == approx(mean(F1))  # (2/3 + 8/13 + 5/6) / 3
    assert "metric_classes" not in m
    json.dumps(m)


@pytest.mark.parametrize("selection", [{"exclude": ["sky"]}, {"exclude": [0]}, {"metric_classes": ["road", "car"]},
                                       {"metric_classes": [2, "road"]}])
def test_means_without_an_excluded_class_by_hand(selection):
    m = segmentation_metrics(THREE_CLASS, NAMES, **selection)
    assert m["mIoU"] == approx((Fr(4, 9) + Fr(5, 7)) / 2)
    assert m["mean_acc"] == m["mean_recall"] == approx((Fr(4, 7) + Fr(5, 6)) / 2)
    assert m["mean_precision"] == approx((Fr(2, 3) + Fr(5, 6)) / 2)
    assert m["mean_f1"] == approx((Fr(8, 13) + Fr(5, 6)) / 2)
    assert m["metric_classes"] == ["road", "car"]
    # Per-class values, pixel accuracy and fwIoU still cover every class.
    full = segmentation_metrics(THREE_CLASS, NAMES)
    for key in ("class_iou", "class_acc", "class_precision", "class_recall", "class_f1", "pixel_acc", "fwIoU"):
        assert m[key] == full[key]


def test_means_of_one_chosen_class_by_hand():
    m = segmentation_metrics(THREE_CLASS, metric_classes=[2])
    assert (m["mIoU"], m["mean_acc"], m["mean_precision"], m["mean_f1"]) == \
        (approx(Fr(5, 7)), approx(Fr(5, 6)), approx(Fr(5, 6)), approx(Fr(5, 6)))
    assert m["metric_classes"] == [2]  # indices without names
    # metric_classes and exclude together: exclude applies inside metric_classes (empty exclude is none)
    assert segmentation_metrics(THREE_CLASS, metric_classes=[1, 2], exclude=[])["mIoU"] == approx(mean(IOU[1:]))


def test_empty_denominators_have_no_value_and_are_left_out_of_the_means():
    # Class 1: predicted once, absent from GT -> precision 0, no recall, F1 0.
    # Class 2: absent from both -> no precision, recall or F1. Class 3: perfect.
    cm = [[2, 1, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 3]]
    m = segmentation_metrics(cm)
    # class 0: TP 2, GT 3, PRED 2 -> precision 1, recall 2/3, F1 4/5
    assert m["class_precision"] == [1.0, 0.0, None, 1.0]
    assert m["class_recall"] == [approx(Fr(2, 3)), None, None, 1.0]
    assert m["class_f1"] == [approx(Fr(4, 5)), 0.0, None, 1.0]
    assert m["mean_precision"] == approx(Fr(2, 3))  # (1 + 0 + 1) / 3
    assert m["mean_recall"] == approx(Fr(5, 6))  # (2/3 + 1) / 2
    assert m["mean_f1"] == approx(Fr(3, 5))  # (4/5 + 0 + 1) / 3
    # Excluding the classes without a value changes nothing; excluding class 1 does.
    assert segmentation_metrics(cm, exclude=[2])["mean_f1"] == m["mean_f1"]
    assert segmentation_metrics(cm, exclude=[1])["mean_f1"] == approx(Fr(9, 10))
    assert segmentation_metrics(cm, metric_classes=[2])["mean_f1"] == 0.0  # nothing to average


def test_empty_matrix_gives_zero_means_of_the_new_scores():
    m = segmentation_metrics(np.zeros((3, 3)))
    assert (m["mean_precision"], m["mean_recall"], m["mean_f1"]) == (0.0, 0.0, 0.0)
    assert m["class_precision"] == m["class_recall"] == m["class_f1"] == [None, None, None]


@pytest.mark.parametrize("kwargs, message", [
    ({"exclude": ["sea"]}, "exclude: 'sea' is not a class; the classes are sky, road, car"),
    ({"metric_classes": [3]}, r"metric_classes: 3 is not a class index \(0-2\)"),
    ({"metric_classes": [-1]}, "metric_classes: -1 is not a class index"),
    ({"metric_classes": [True]}, "metric_classes: True is not a class index"),
    ({"exclude": [0, 1, 2]}, "no class is left"),
    ({"metric_classes": [0], "exclude": [1]}, "not both"),
])
def test_bad_class_selections_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        segmentation_metrics(THREE_CLASS, NAMES, **kwargs)


def test_names_need_class_names():
    with pytest.raises(ValueError, match="by name, but no class names"):
        selected_classes(3, None, exclude=["sky"])
    assert selected_classes(3, NAMES, metric_classes=["car", 0, "car"]) == [0, 2]


def numpy_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int, classes: list[int]) -> dict:
    """Precision, recall, F1 and IoU counted straight from the pixels, without a confusion matrix."""
    valid = target != ignore
    scores = {k: [] for k in ("precision", "recall", "f1", "iou")}
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        for key, num, den in (("precision", tp, tp + fp), ("recall", tp, tp + fn), ("f1", 2 * tp, 2 * tp + fp + fn),
                              ("iou", tp, tp + fp + fn)):
            scores[key].append(num / den if den else np.nan)
    means = {key: float(np.nanmean(np.array(values)[classes])) for key, values in scores.items()}
    return {"class": scores, "mean": means}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_a_numpy_recount_on_random_arrays(seed):
    rng = np.random.default_rng(seed)
    num_classes, ignore = 5, 255
    target = rng.integers(0, num_classes, (3, 17, 23))
    pred = rng.integers(0, num_classes - 1, (3, 17, 23))  # class 4 is never predicted: no precision
    target[target == 3] = rng.choice([3, ignore], size=int((target == 3).sum()))
    target[target == 2] = 1 if seed == 2 else 2  # seed 2: class 2 only predicted, never labelled
    cm = ConfusionMatrix(num_classes, ignore)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    names = [f"c{i}" for i in range(num_classes)]
    for exclude, classes in (([], [0, 1, 2, 3, 4]), (["c0"], [1, 2, 3, 4]), ([1, "c3"], [0, 2, 4])):
        m = segmentation_metrics(cm.matrix, names, exclude=exclude)
        want = numpy_scores(pred, target, num_classes, ignore, classes)
        for key, ours in (("precision", "precision"), ("recall", "recall"), ("f1", "f1"), ("iou", "iou")):
            got = m[f"class_{ours}"]
            assert [np.nan if v is None else v for v in got] == pytest.approx(want["class"][key], nan_ok=True)
        assert m["mean_precision"] == pytest.approx(want["mean"]["precision"])
        assert m["mean_recall"] == pytest.approx(want["mean"]["recall"])
        assert m["mean_f1"] == pytest.approx(want["mean"]["f1"])
        assert m["mIoU"] == pytest.approx(want["mean"]["iou"])


def test_scores_of_shards_come_from_their_summed_matrix():
    """What torchrun does: each process counts its shard, the matrices are summed, then scored."""
    rng = np.random.default_rng(3)
    shards = [(rng.integers(0, 3, (2, 9, 9)), rng.integers(0, 3, (2, 9, 9))) for _ in range(2)]
    shards[1][1][:] = 0  # the second shard has only class 0 in its labels: shard averages would differ
    matrices = []
    for pred, target in shards:
        cm = ConfusionMatrix(3)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        matrices.append(cm.matrix)
    summed = segmentation_metrics(matrices[0] + matrices[1])
    pred = np.concatenate([p for p, _ in shards])
    target = np.concatenate([t for _, t in shards])
    want = numpy_scores(pred, target, 3, 255, [0, 1, 2])
    assert summed["mean_f1"] == pytest.approx(want["mean"]["f1"])
    assert summed["mean_precision"] == pytest.approx(want["mean"]["precision"])
    per_shard = [segmentation_metrics(m)["mean_f1"] for m in matrices]
    assert summed["mean_f1"] != pytest.approx(sum(per_shard) / 2)


def test_confusion_matrix_as_json():
    got = confusion_matrix_json(torch.tensor(THREE_CLASS), NAMES)
    assert got == {"class_names": NAMES, "rows": "ground truth", "columns": "prediction", "matrix": THREE_CLASS}
    assert all(type(v) is int for row in got["matrix"] for v in row)
    assert json.loads(json.dumps(got)) == got
    assert confusion_matrix_json(np.array(THREE_CLASS), NAMES) == got
    with pytest.raises(ValueError, match="3 class names"):
        confusion_matrix_json(np.zeros((2, 2)), NAMES)
