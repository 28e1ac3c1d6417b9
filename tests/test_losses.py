import json
import math

import numpy as np
import pytest
import torch

from base.base_dataset import BaseDataSet
from utils.errors import ConfigError
from models.losses.class_weights import class_pixel_counts, enet_weights, median_frequency_weights
from models.losses.cross_entropy import CrossEntropyLoss, WeightedCrossEntropyLoss
from utils.registry import LOSSES


def nll(logits, label):
    """-log softmax(logits)[label], written out."""
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


# Two pixels, two classes: logits (1, 2, 1, 2), targets [0, 1].
PIXEL_A, PIXEL_B = (2.0, 0.0), (0.5, -1.0)
LOSS_A = nll(PIXEL_A, 0)   # log(1 + e^-2)
LOSS_B = nll(PIXEL_B, 1)   # log(1 + e^1.5)


def two_pixels(extra_logits=(), extra_targets=()):
    columns = [PIXEL_A, PIXEL_B, *extra_logits]
    logits = torch.tensor([[[list(c) for c in columns]]]).permute(0, 3, 1, 2)
    target = torch.tensor([[[0, 1, *extra_targets]]])
    return logits, target


def test_hand_values_are_what_they_claim():
    assert LOSS_A == pytest.approx(math.log(1 + math.exp(-2)))
    assert LOSS_B == pytest.approx(math.log(1 + math.exp(1.5)))


def test_cross_entropy_hand_computed():
    logits, target = two_pixels()
    assert logits.shape == (1, 2, 1, 2)
    loss = CrossEntropyLoss()(logits, target)
    assert loss.item() == pytest.approx((LOSS_A + LOSS_B) / 2, rel=1e-6)


def test_ignored_pixels_do_not_contribute():
    logits, target = two_pixels(extra_logits=[(9.0, -9.0), (-4.0, 4.0)], extra_targets=[255, 255])
    loss = CrossEntropyLoss(ignore_index=255)(logits, target)
    assert loss.item() == pytest.approx((LOSS_A + LOSS_B) / 2, rel=1e-6)


def test_label_smoothing_hand_computed():
    # (1 - eps) * nll(target) + eps * mean over classes of nll(c)
    logits, target = two_pixels()
    eps = 0.2
    smooth_a = (nll(PIXEL_A, 0) + nll(PIXEL_A, 1)) / 2
    smooth_b = (nll(PIXEL_B, 0) + nll(PIXEL_B, 1)) / 2
    expected = ((1 - eps) * LOSS_A + eps * smooth_a + (1 - eps) * LOSS_B + eps * smooth_b) / 2
    loss = CrossEntropyLoss(label_smoothing=eps)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_all_void_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    for loss_fn in (CrossEntropyLoss(), WeightedCrossEntropyLoss(weights=[1.0, 2.0, 3.0], num_classes=3)):
        loss = loss_fn(logits, target)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_weighted_cross_entropy_with_listed_weights():
    # PyTorch's weighted mean: sum w_y * nll / sum w_y over valid pixels.
    logits, target = two_pixels(extra_logits=[(1.0, 1.0)], extra_targets=[255])
    loss = WeightedCrossEntropyLoss(weights=[0.25, 2.0], num_classes=2)(logits, target)
    expected = (0.25 * LOSS_A + 2.0 * LOSS_B) / (0.25 + 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn", [
    CrossEntropyLoss(label_smoothing=0.1),
    WeightedCrossEntropyLoss(weights=[0.5, 1.0, 2.0], num_classes=3, label_smoothing=0.1),
])
def test_target_is_not_modified(loss_fn):
    target = torch.tensor([[[0, 255, 2], [1, 255, 0]]])
    before = target.clone()
    loss_fn(torch.randn(1, 3, 2, 3), target)
    assert torch.equal(target, before)


def test_wrong_number_of_weights_names_both_lengths():
    with pytest.raises(ValueError, match="got 2 class weights for 4 classes"):
        WeightedCrossEntropyLoss(weights=[1.0, 2.0], num_classes=4)


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="negative"):
        WeightedCrossEntropyLoss(weights=[1.0, -2.0], num_classes=2)


# --- class weights from the training labels ---------------------------------------

# Counts per class over the three images below (255 = void):
#   image 0: class 0 x4, class 1 x1           -> 5 labelled pixels
#   image 1: class 0 x2, class 3 x4           -> 6 labelled pixels
#   image 2: class 1 x1                        -> 1 labelled pixel
#   counts         = [4+2, 1+1, 0, 4]   = [6, 2, 0, 4]
#   present_counts = [5+6, 5+1, 0, 6]   = [11, 6, 0, 6]
LABELS = [
    np.array([[0, 0, 0], [0, 1, 255]], dtype=np.uint8),
    np.array([[0, 0, 3], [3, 3, 3]], dtype=np.uint8),
    np.array([[1, 255]], dtype=np.uint8),
]
# freq = counts / present_counts = [6/11, 1/3, -, 2/3]; median of (1/3, 6/11, 2/3) = 6/11
# weight = (6/11) / freq = [1, 18/11, 0 (never occurs), 9/11]
MEDIAN_FREQUENCY = [1.0, 18 / 11, 0.0, 9 / 11]
# p = counts / 12 = [1/2, 1/6, 0, 1/3]; weight = 1 / ln(1.02 + p), 0 for the absent class
ENET = [1 / math.log(1.02 + 1 / 2), 1 / math.log(1.02 + 1 / 6), 0.0, 1 / math.log(1.02 + 1 / 3)]


class TinyDataSet(BaseDataSet):
    class_names = ("a", "b", "c", "d")
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255))
    label_map = {0: 0, 1: 1, 2: 2, 3: 3, 255: None}

    def __init__(self, split: str = "train", labels=LABELS) -> None:
        self.labels = labels
        self.label_loads = 0
        super().__init__(split)

    def _list_samples(self):
        return [(f"{self.split}/img{i}.png", f"{self.split}/lbl{i}.png") for i in range(len(self.labels))]

    def load_image(self, index):
        return np.zeros((*self.labels[index].shape, 3), dtype=np.uint8)

    def load_label(self, index):
        self.label_loads += 1
        return self.labels[index].copy()


def test_class_pixel_counts():
    counts, present_counts = class_pixel_counts(TinyDataSet())
    assert counts.tolist() == [6, 2, 0, 4]
    assert present_counts.tolist() == [11, 6, 0, 6]


def test_median_frequency_weights_by_hand():
    assert median_frequency_weights(np.array([6, 2, 0, 4]), np.array([11, 6, 0, 6])) == \
        pytest.approx(MEDIAN_FREQUENCY)


def test_median_frequency_with_an_even_number_of_classes():
    # freq = [1/4, 3/4], median = 1/2 -> weights [2, 2/3]
    assert median_frequency_weights([1, 3], [4, 4]) == pytest.approx([2.0, 2 / 3])


def test_enet_weights_by_hand():
    assert enet_weights(np.array([6, 2, 0, 4])) == pytest.approx(ENET)


def test_weights_need_some_labelled_pixel():
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights([0, 0], [0, 0])
    with pytest.raises(ValueError, match="no labelled pixel"):
        enet_weights([0, 0])


@pytest.mark.parametrize("method, expected", [("median_frequency", MEDIAN_FREQUENCY), ("enet", ENET)])
def test_computed_weights_are_used_by_the_loss(method, expected, tmp_path):
    loss = WeightedCrossEntropyLoss(weights=method, num_classes=4, train_dataset=TinyDataSet(),
                                    cache_dir=str(tmp_path))
    assert loss.weight.tolist() == pytest.approx(expected, rel=1e-6)


def test_weights_are_cached_and_reused(tmp_path):
    first = TinyDataSet()
    WeightedCrossEntropyLoss(num_classes=4, train_dataset=first, cache_dir=str(tmp_path))
    assert first.label_loads == 3
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    content = json.loads(files[0].read_text())
    assert content["weights"] == pytest.approx(MEDIAN_FREQUENCY)
    assert content["counts"] == [6, 2, 0, 4]

    # Tamper with the cache: the second loss must take its weights from the file.
    content["weights"] = [0.5, 1.5, 2.5, 3.5]
    files[0].write_text(json.dumps(content))
    second = TinyDataSet()
    loss = WeightedCrossEntropyLoss(num_classes=4, train_dataset=second, cache_dir=str(tmp_path))
    assert second.label_loads == 0
    assert loss.weight.tolist() == [0.5, 1.5, 2.5, 3.5]


def test_cache_key_depends_on_method_and_label_sources(tmp_path):
    WeightedCrossEntropyLoss(num_classes=4, train_dataset=TinyDataSet(), cache_dir=str(tmp_path))
    WeightedCrossEntropyLoss(weights="enet", num_classes=4, train_dataset=TinyDataSet(),
                             cache_dir=str(tmp_path))
    other_split = TinyDataSet(split="trainval")
    WeightedCrossEntropyLoss(num_classes=4, train_dataset=other_split, cache_dir=str(tmp_path))
    assert other_split.label_loads == 3
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_unreadable_cache_is_recomputed(tmp_path):
    WeightedCrossEntropyLoss(num_classes=4, train_dataset=TinyDataSet(), cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text("{not json")
    dataset = TinyDataSet()
    loss = WeightedCrossEntropyLoss(num_classes=4, train_dataset=dataset, cache_dir=str(tmp_path))
    assert dataset.label_loads == 3
    assert loss.weight.tolist() == pytest.approx(MEDIAN_FREQUENCY)
    assert json.loads(cache_file.read_text())["weights"] == pytest.approx(MEDIAN_FREQUENCY)


def test_computed_weights_need_the_dataset():
    with pytest.raises(ValueError, match="training dataset"):
        WeightedCrossEntropyLoss(weights="enet", num_classes=4)


# --- through the registry --------------------------------------------------------------

def test_registry_builds_weighted_loss_with_injected_arguments(tmp_path):
    loss = LOSSES.build({"type": "WeightedCrossEntropyLoss", "args": {"weights": "enet"}}, "loss",
                        ignore_index=255, num_classes=4, train_dataset=TinyDataSet(),
                        cache_dir=str(tmp_path))
    assert loss.weight.tolist() == pytest.approx(ENET, rel=1e-6)


def test_registry_reports_bad_weights_with_the_config_path():
    with pytest.raises(ConfigError, match=r"loss \(WeightedCrossEntropyLoss\): got 2 class weights for 4"):
        LOSSES.build({"type": "WeightedCrossEntropyLoss", "args": {"weights": [1.0, 2.0]}}, "loss",
                     ignore_index=255, num_classes=4, train_dataset=None, cache_dir="unused")
    with pytest.raises(ConfigError, match="loss.args.weights"):
        LOSSES.validate({"type": "WeightedCrossEntropyLoss", "args": {"weights": "median"}}, "loss",
                        injected=["ignore_index", "num_classes", "train_dataset", "cache_dir"])


def test_registry_builds_cross_entropy():
    loss = LOSSES.build({"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.1}}, "loss",
                        ignore_index=255)
    assert isinstance(loss, CrossEntropyLoss)
    assert loss.label_smoothing == 0.1


# --- label smoothing ---------------------------------------------------------------------

def test_weighted_label_smoothing_hand_computed():
    # PyTorch's weighted smoothing, whose mean divides by the summed target weights:
    # [sum_i (1 - eps) w_y nll_i(y) + eps / C sum_i sum_c w_c nll_i(c)] / sum_i w_y
    logits, target = two_pixels(extra_logits=[(3.0, -3.0)], extra_targets=[255])
    eps, weights = 0.3, (0.25, 2.0)
    hard = weights[0] * nll(PIXEL_A, 0) + weights[1] * nll(PIXEL_B, 1)
    smooth = sum(weights[c] * nll(pixel, c) for pixel in (PIXEL_A, PIXEL_B) for c in (0, 1)) / 2
    expected = ((1 - eps) * hard + eps * smooth) / (weights[0] + weights[1])
    loss = WeightedCrossEntropyLoss(weights=list(weights), num_classes=2, label_smoothing=eps)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_leaves_void_pixels_out():
    logits, target = two_pixels(extra_logits=[(9.0, -9.0)], extra_targets=[255])
    plain_logits, plain_target = two_pixels()
    loss_fn = CrossEntropyLoss(label_smoothing=0.2)
    assert loss_fn(logits, target).item() == pytest.approx(loss_fn(plain_logits, plain_target).item(), rel=1e-6)


def test_label_smoothing_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        CrossEntropyLoss(label_smoothing=1.5)


def test_weighted_sum_passes_the_training_data_on_to_computed_weights(tmp_path):
    spec = {"type": "WeightedSumLoss", "args": {"terms": [
        {"loss": {"type": "WeightedCrossEntropyLoss", "args": {"weights": "enet"}}, "weight": 0.5}]}}
    loss = LOSSES.build(spec, "loss", ignore_index=255, num_classes=4, train_dataset=TinyDataSet(),
                        cache_dir=str(tmp_path))
    assert loss.losses[0].weight.tolist() == pytest.approx(ENET, rel=1e-6)
    assert len(list(tmp_path.glob("*.json"))) == 1
