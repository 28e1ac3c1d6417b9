"""Each loss against numbers worked out by hand (or by a separate, naive formula) on tiny tensors."""
import math

import numpy as np
import pytest
import torch

from models.losses.cross_entropy import CrossEntropyLoss
from models.losses.dice import DiceCrossEntropyLoss, SoftDiceLoss
from models.losses.focal import FocalLoss
from models.losses.lovasz import LovaszSoftmaxLoss
from models.losses.ohem import OhemCrossEntropyLoss
from models.losses.rmi import RMILoss
from utils.registry import LOSSES


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def logit(p):
    return math.log(p / (1 - p))


def two_class_logits(p0, extra=()):
    """Logits ``(1, 2, 1, P)`` whose softmax gives class 0 the probabilities ``p0``: (logit(p), 0)."""
    values = [logit(p) for p in p0] + list(extra)
    return torch.tensor([[[values], [[0.0] * len(values)]]])


# Two pixels, two classes, as in test_losses: pixel A logits (2, 0) target 0; pixel B (0.5, -1) target 1.
LOGITS = torch.tensor([[[[2.0, 0.5]], [[0.0, -1.0]]]])
TARGET = torch.tensor([[[0, 1]]])
P_A = sigmoid(2.0)          # softmax probability of class 0 at pixel A (its target)
P_B = 1 - sigmoid(1.5)      # softmax probability of class 1 at pixel B (its target)


def with_void_pixels(logits, target, void_logits=((7.0, -3.0), (-5.0, 4.0))):
    """Append pixels labelled 255 with the given logits."""
    extra = torch.tensor(void_logits).T.reshape(1, 2, 1, -1)
    return torch.cat([logits, extra], dim=3), torch.cat([target, torch.full((1, 1, len(void_logits)), 255)], dim=2)


# --- focal ----------------------------------------------------------------------------------

def test_focal_hand_computed_with_alpha():
    # -alpha_t (1 - p_t)^2 log p_t, averaged over the 2 valid pixels (not over the alphas).
    expected = (0.25 * (1 - P_A) ** 2 * -math.log(P_A) + 0.75 * (1 - P_B) ** 2 * -math.log(P_B)) / 2
    logits, target = with_void_pixels(LOGITS, TARGET)
    loss = FocalLoss(gamma=2.0, alpha=[0.25, 0.75], num_classes=2)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    expected = (-math.log(P_A) - math.log(P_B)) / 2
    assert FocalLoss(gamma=0.0, num_classes=2)(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_focal_fractional_gamma_has_finite_gradients_at_void_and_certain_pixels():
    # (1 - p)^0.5 has an infinite slope at p = 1: void pixels (read as p = 1) and a pixel
    # the model is certain of must still give finite gradients.
    logits = torch.tensor([[[[60.0, 0.3, 1.0]], [[0.0, 0.0, 2.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 1, 255]]])
    loss = FocalLoss(gamma=0.5, num_classes=2)(logits, target)
    loss.backward()
    p = 1 - sigmoid(0.3)
    assert loss.item() == pytest.approx((1 - p) ** 0.5 * -math.log(p) / 2, rel=1e-5)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[..., 2].abs().sum() == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": -1.0}, "gamma must be >= 0"),
    ({"alpha": [1.0]}, "got 1 alpha values for 2 classes"),
    ({"alpha": [1.0, -0.5]}, "alpha must not be negative"),
])
def test_focal_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(num_classes=2, **kwargs)


# --- soft Dice ------------------------------------------------------------------------------

def dice_by_hand(smooth):
    # softmax probabilities: pixel A (sigma(2), 1 - sigma(2)), pixel B (sigma(1.5), 1 - sigma(1.5))
    a0, b0 = sigmoid(2.0), sigmoid(1.5)
    a1, b1 = 1 - a0, 1 - b0
    dice0 = (2 * a0 + smooth) / (a0 + b0 + 1 + smooth)   # class 0: only pixel A is class 0
    dice1 = (2 * b1 + smooth) / (a1 + b1 + 1 + smooth)   # class 1: only pixel B is class 1
    return 1 - (dice0 + dice1) / 2


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_soft_dice_hand_computed_without_void_pixels(smooth):
    logits, target = with_void_pixels(LOGITS, TARGET)
    loss = SoftDiceLoss(smooth=smooth)(logits, target)
    assert loss.item() == pytest.approx(dice_by_hand(smooth), rel=1e-6)


def test_soft_dice_counts_absent_classes():
    # A third class absent from the target: with smooth 1 it scores 1 / (sum of its probabilities + 1).
    logits = torch.tensor([[[[2.0, 0.5]], [[0.0, -1.0]], [[-1.0, -1.0]]]])
    probs = logits.softmax(1)[0, :, 0].tolist()
    dices = [(2 * probs[0][0] + 1) / (sum(probs[0]) + 1 + 1),
             (2 * probs[1][1] + 1) / (sum(probs[1]) + 1 + 1),
             1 / (sum(probs[2]) + 1)]
    assert SoftDiceLoss()(logits, TARGET).item() == pytest.approx(1 - sum(dices) / 3, rel=1e-6)


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_soft_dice_of_an_all_void_batch_is_zero_with_zero_gradient(smooth):
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = SoftDiceLoss(smooth=smooth)(logits, torch.full((2, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_cross_entropy_is_the_weighted_sum():
    expected = 0.3 * (-math.log(P_A) - math.log(P_B)) / 2 + 2.0 * dice_by_hand(0.5)
    logits, target = with_void_pixels(LOGITS, TARGET)
    loss = DiceCrossEntropyLoss(ce_weight=0.3, dice_weight=2.0, smooth=0.5)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- Lovász-softmax ---------------------------------------------------------------------------

def lovasz_by_sets(errors, is_class):
    """The Lovász extension from its definition: sum over decreasing errors of error x the Jaccard
    loss gained by adding that pixel to the mistakes, Jaccard loss(M) = |M| / |G u M|."""
    truth = {i for i, fg in enumerate(is_class) if fg}
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    total, previous, mistakes = 0.0, 0.0, set()
    for i in order:
        mistakes.add(i)
        current = len(mistakes) / len(truth | mistakes)
        total += errors[i] * (current - previous)
        previous = current
    return total


def test_lovasz_hand_computed():
    # Three pixels, targets [0, 0, 1], class-0 probabilities [0.9, 0.6, 0.3].
    # Class 0: errors [0.1, 0.4, 0.3], G = {0, 1}; in decreasing order pixel 1 -> J = 1/2,
    #   pixel 2 -> J = 2/3, pixel 0 -> J = 1: 0.4 * 1/2 + 0.3 * 1/6 + 0.1 * 1/3 = 17/60.
    # Class 1: errors [0.1, 0.4, 0.3], G = {2}; pixel 1 -> 1/2, pixel 2 -> 1, pixel 0 -> 1:
    #   0.4 * 1/2 + 0.3 * 1/2 + 0 = 21/60.  Mean over the two present classes: 19/60.
    logits = two_class_logits([0.9, 0.6, 0.3])
    target = torch.tensor([[[0, 0, 1]]])
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(19 / 60, rel=1e-5)
    assert lovasz_by_sets([0.1, 0.4, 0.3], [1, 1, 0]) == pytest.approx(17 / 60)
    assert lovasz_by_sets([0.1, 0.4, 0.3], [0, 0, 1]) == pytest.approx(21 / 60)


def test_lovasz_leaves_void_pixels_and_absent_classes_out():
    logits = two_class_logits([0.9, 0.6, 0.3], extra=[3.0, -2.0])
    logits = torch.cat([logits, torch.full((1, 1, 1, 5), -0.5)], dim=1)  # a third class, never a target
    target = torch.tensor([[[0, 0, 1, 255, 255]]])
    probs = logits.softmax(1)[0, :, 0, :3].tolist()
    fg = [[1, 1, 0], [0, 0, 1]]
    per_class = [lovasz_by_sets([abs(f - p) for f, p in zip(fg[c], probs[c])], fg[c]) for c in (0, 1)]
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(sum(per_class) / 2, rel=1e-5)
    # "all" counts the absent class too: with G empty each step adds to J until J = 1 at the
    # first pixel, so its loss is its largest probability.
    expected_all = (sum(per_class) + max(probs[2])) / 3
    assert LovaszSoftmaxLoss(classes="all")(logits, target).item() == pytest.approx(expected_all, rel=1e-5)


def test_lovasz_per_image_averages_images_with_valid_pixels():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 2]], [[255, 255], [255, 255]], [[1, 1], [0, 255]]])
    loss_fn = LovaszSoftmaxLoss(per_image=True)
    each = [loss_fn(logits[i:i + 1], target[i:i + 1]).item() for i in (0, 2)]
    assert loss_fn(logits, target).item() == pytest.approx(sum(each) / 2, rel=1e-5)
    # Per batch: all pixels together, as one image of the batch side by side.
    side_by_side = logits.permute(1, 2, 0, 3).reshape(1, 3, 2, 6)
    target_side_by_side = target.permute(1, 0, 2).reshape(1, 2, 6)
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(
        LovaszSoftmaxLoss()(side_by_side, target_side_by_side).item(), rel=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_all_void_batch_gives_zero_loss_and_zero_gradient(per_image):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = LovaszSoftmaxLoss(per_image=per_image)(logits, torch.full((2, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_lovasz_perfect_prediction_is_zero():
    logits = torch.tensor([[[[30.0, -30.0]], [[-30.0, 30.0]]]])
    assert LovaszSoftmaxLoss()(logits, TARGET).item() == pytest.approx(0.0, abs=1e-6)


# --- OHEM cross-entropy ---------------------------------------------------------------------

# Target probabilities of four valid pixels, all labelled 0, and one void pixel that would be hardest.
OHEM_PROBS = [0.9, 0.6, 0.3, 0.8]
OHEM_LOGITS = two_class_logits(OHEM_PROBS, extra=[logit(0.1)])
OHEM_TARGET = torch.tensor([[[0, 0, 0, 0, 255]]])


def mean_nll(probs):
    return sum(-math.log(p) for p in probs) / len(probs)


@pytest.mark.parametrize("min_kept, kept", [
    (0, [0.6, 0.3]),              # below the threshold 0.7 only
    (1, [0.6, 0.3]),              # the hardest pixel is below the threshold anyway
    (3, [0.6, 0.3, 0.8]),         # the three hardest, although 0.8 is above the threshold
    (100, OHEM_PROBS),            # more than there are valid pixels: all of them
])
def test_ohem_keeps_pixels_below_threshold_and_at_least_min_kept(min_kept, kept):
    loss = OhemCrossEntropyLoss(thresh=0.7, min_kept=min_kept)(OHEM_LOGITS, OHEM_TARGET)
    assert loss.item() == pytest.approx(mean_nll(kept), rel=1e-5)


def test_ohem_with_nothing_hard_and_no_minimum_is_zero():
    loss = OhemCrossEntropyLoss(thresh=0.2, min_kept=0)(OHEM_LOGITS, OHEM_TARGET)
    assert loss.item() == 0.0


def test_ohem_gradient_only_reaches_kept_pixels():
    logits = OHEM_LOGITS.clone().requires_grad_(True)
    OhemCrossEntropyLoss(thresh=0.7, min_kept=0)(logits, OHEM_TARGET).backward()
    touched = logits.grad.abs().sum(dim=(0, 1, 2)) > 0
    assert touched.tolist() == [False, True, True, False, False]


# --- RMI --------------------------------------------------------------------------------------

def rmi_radius_one_by_hand(logits, target, bce_weight, epsilon=5e-4):
    """RMI with 1x1 regions and no pooling for one image, written with scalars.

    Per class: y, p over the pixels (p = sigmoid, 0 at void, + 1e-6); with centred sums
    s_yy, s_pp, s_yp the unexplained variance is s_yy - s_yp^2 / (s_pp + eps), and the term
    is 0.5 log(that + eps), summed over classes. BCE: summed over classes, mean over valid pixels.
    """
    num_classes, num_pixels = len(logits), len(target)
    valid = [t != 255 for t in target]
    bce, rmi = 0.0, 0.0
    for c in range(num_classes):
        y = [1.0 if t == c else 0.0 for t in target]
        p = [sigmoid(logits[c][i]) * valid[i] + 1e-6 for i in range(num_pixels)]
        bce += sum(-(y[i] * math.log(sigmoid(logits[c][i])) + (1 - y[i]) * math.log(1 - sigmoid(logits[c][i])))
                   for i in range(num_pixels) if valid[i])
        y_mean, p_mean = sum(y) / num_pixels, sum(p) / num_pixels
        s_yy = sum((v - y_mean) ** 2 for v in y)
        s_pp = sum((v - p_mean) ** 2 for v in p)
        s_yp = sum((a - y_mean) * (b - p_mean) for a, b in zip(y, p))
        rmi += 0.5 * math.log(s_yy - s_yp ** 2 / (s_pp + epsilon) + epsilon)
    return bce_weight * bce / (sum(valid) + 1) + (1 - bce_weight) * rmi  # N + 1: the authors' divisor


def test_rmi_with_one_pixel_regions_hand_computed():
    values = [[1.5, -0.5, 0.2, 2.0, -1.0], [-1.0, 0.7, 0.1, -2.0, 3.0]]
    target = [0, 1, 1, 0, 255]
    logits = torch.tensor(values, dtype=torch.float64).view(1, 2, 1, 5)
    loss = RMILoss(radius=1, pool_size=1, bce_weight=0.3)(logits, torch.tensor(target).view(1, 1, 5))
    assert loss.item() == pytest.approx(rmi_radius_one_by_hand(values, target, 0.3), rel=1e-9)


def rmi_term_numpy(one_hot, probs, radius, pool_size, epsilon=5e-4):
    """The RMI term with loops, zero-padded average pooling, an explicit inverse and slogdet."""
    n, c, h, w = one_hot.shape

    def avg_pool(x):
        pad = pool_size // 2
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        out_h, out_w = (h + 2 * pad - pool_size) // pool_size + 1, (w + 2 * pad - pool_size) // pool_size + 1
        out = np.zeros((n, c, out_h, out_w))
        for i in range(out_h):
            for j in range(out_w):
                window = padded[:, :, i * pool_size:i * pool_size + pool_size, j * pool_size:j * pool_size + pool_size]
                out[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size ** 2
        return out

    y_maps, p_maps = avg_pool(one_hot), avg_pool(probs)
    rows, cols = y_maps.shape[2] - radius + 1, y_maps.shape[3] - radius + 1
    total = 0.0
    for image in range(n):
        for cls in range(c):
            def vectors(maps):
                return np.array([[maps[image, cls, i + dy, j + dx] for dy in range(radius) for dx in range(radius)]
                                 for i in range(rows) for j in range(cols)]).T   # (d, points)
            y, p = vectors(y_maps), vectors(p_maps)
            y = y - y.mean(axis=1, keepdims=True)
            p = p - p.mean(axis=1, keepdims=True)
            eye = epsilon * np.eye(radius * radius)
            conditional = y @ y.T - (y @ p.T) @ np.linalg.inv(p @ p.T + eye) @ (y @ p.T).T
            sign, logdet = np.linalg.slogdet(conditional + eye)
            assert sign > 0
            total += 0.5 * logdet / n
    return total / radius ** 2


def test_rmi_term_matches_a_naive_computation():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 14, 13, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 14, 13))
    target[0, :4, :5] = 255
    valid = (target != 255).numpy()[:, None]                       # (N, 1, H, W)
    one_hot = np.stack([target.numpy() == c for c in range(3)], axis=1) * valid
    sig = 1 / (1 + np.exp(-logits.numpy()))
    bce_per_entry = -(one_hot * np.log(sig) + (1 - one_hot) * np.log(1 - sig))
    bce = (bce_per_entry * valid).sum() / (valid.sum() + 1)  # the authors divide by N + 1
    expected = 0.5 * bce + 0.5 * rmi_term_numpy(one_hot.astype(np.float64), sig * valid + 1e-6, 3, 3)
    loss = RMILoss(radius=3, pool_size=3, pool="avg")(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-7)


def test_rmi_rejects_maps_smaller_than_the_region():
    with pytest.raises(ValueError, match=r"the 2x2 map \(after downsampling by 3\) is smaller than the 3x3 region"):
        RMILoss()(torch.randn(1, 2, 6, 6), torch.zeros(1, 6, 6, dtype=torch.int64))


def test_rmi_of_a_perfect_prediction_is_lower_than_of_a_poor_one():
    target = torch.zeros(1, 12, 12, dtype=torch.int64)
    target[:, 3:9, 2:7] = 1
    good = torch.stack([torch.where(target == 0, 6.0, -6.0), torch.where(target == 1, 6.0, -6.0)], dim=1)
    poor = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    loss_fn = RMILoss(pool_size=1, bce_weight=0.0)
    assert loss_fn(good, target).item() < loss_fn(poor, target).item() - 1.0


# --- weighted sum -----------------------------------------------------------------------------

def test_weighted_sum_adds_the_weighted_terms_with_injected_arguments():
    terms = [{"loss": "CrossEntropyLoss", "weight": 0.5},
             {"loss": {"type": "FocalLoss", "args": {"gamma": 2.0, "alpha": [0.25, 0.75]}}},
             {"loss": {"type": "SoftDiceLoss", "args": {"smooth": 0.0}}, "weight": 3.0}]
    loss_fn = LOSSES.build({"type": "WeightedSumLoss", "args": {"terms": terms}}, "loss", ignore_index=255,
                           num_classes=2, train_dataset=None, cache_dir=None)
    cross_entropy = (-math.log(P_A) - math.log(P_B)) / 2
    focal = (0.25 * (1 - P_A) ** 2 * -math.log(P_A) + 0.75 * (1 - P_B) ** 2 * -math.log(P_B)) / 2
    expected = 0.5 * cross_entropy + 1.0 * focal + 3.0 * dice_by_hand(0.0)
    logits, target = with_void_pixels(LOGITS, TARGET)
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_sum_passes_ignore_index_on():
    loss_fn = LOSSES.build({"type": "WeightedSumLoss", "args": {"terms": [{"loss": "CrossEntropyLoss"}]}},
                           "loss", ignore_index=7, num_classes=2, train_dataset=None, cache_dir=None)
    target = torch.tensor([[[0, 1, 7]]])
    logits = torch.cat([LOGITS, torch.tensor([[[[5.0]], [[-5.0]]]])], dim=3)
    assert loss_fn(logits, target).item() == pytest.approx(CrossEntropyLoss()(LOGITS, TARGET).item(), rel=1e-6)
