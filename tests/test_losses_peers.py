"""The losses that segmentation_models_pytorch also has give its numbers (skipped without it)."""
import pytest
import torch

from models.losses.dice import SoftDiceLoss
from models.losses.lovasz import LovaszSoftmaxLoss

smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")


def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, 9, generator=generator)
    target = torch.randint(0, 4, (3, 7, 9), generator=generator)
    target[0, :3] = 255
    target[1, 2:] = 255  # smp's per-image mean fails on an image without valid pixels: keep some
    return logits, target


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_matches_smp(per_image):
    logits, target = batch()
    ours = LovaszSoftmaxLoss(per_image=per_image)(logits, target)
    theirs = smp_losses.LovaszLoss("multiclass", per_image=per_image, ignore_index=255)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_soft_dice_matches_smp_when_every_class_is_present():
    # smp scores absent classes 0 instead of by their false positives; here all four occur.
    logits, target = batch()
    assert set(target[target != 255].tolist()) == {0, 1, 2, 3}
    ours = SoftDiceLoss(smooth=0.0)(logits, target)
    theirs = smp_losses.DiceLoss("multiclass", ignore_index=255, smooth=0.0)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
