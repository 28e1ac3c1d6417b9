"""DUC-HDC (Wang et al. 2018): hybrid dilated ResNet stages and dense upsampling convolution."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones import EncoderName, ResNetEncoder, set_dilation
from models.blocks import pad_to_multiple
from models.encoder_head import EncoderModel
from utils.registry import MODELS


@MODELS.register
class DUCHDC(EncoderModel):
    """ResNet at output stride 8 with hybrid dilation -> DUC: a 3x3 conv to ``8 * 8 * num_classes``
    channels, rearranged (pixel shuffle) into full-resolution scores.

    Hybrid dilated convolution (HDC) gives the blocks of a dilated stage rates
    that cycle through a group without a common factor (1, 2, 5, 9 in layer3;
    5, 9, 17 in layer4: the paper's "RF-bigger" setting), so the dilated
    kernels cover every pixel instead of a grid. DUC learns the upsampling:
    each pixel of the stride-8 map predicts the scores of its 8x8 block. The
    input is zero-padded to a multiple of 8 and the scores cropped back.

    Args:
        backbone: a ResNet or ResNeXt encoder (HDC sets the rates of its blocks).
        pretrained, weights_path, in_channels, freeze_bn, freeze_backbone: the encoder arguments
            (at output stride 8), see ``EncoderModel`` in models/encoder_head.py.
        layer3_rates: the dilation rates the blocks of layer3 cycle through.
        layer4_rates: the dilation rates the blocks of layer4 cycle through.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet101", pretrained: bool = False,
                 weights_path: str | None = None, in_channels: int = 3,
                 layer3_rates: Sequence[int] = (1, 2, 5, 9), layer4_rates: Sequence[int] = (5, 9, 17),
                 freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, 8, pretrained, weights_path, in_channels)
        if not isinstance(self.backbone, ResNetEncoder):
            raise ValueError(f"backbone must be a ResNet or ResNeXt (HDC sets the rates of its residual "
                             f"blocks), got {backbone!r}")
        if not layer3_rates or not layer4_rates or min(*layer3_rates, *layer4_rates) < 1:
            raise ValueError("layer3_rates and layer4_rates must be non-empty lists of positive rates")
        for layer, rates in ((self.backbone.layer3, layer3_rates), (self.backbone.layer4, layer4_rates)):
            for index, block in enumerate(layer):
                set_dilation(block, rates[index % len(rates)])
        self.scale = self.backbone.strides[-1]
        self.duc = nn.Sequential(nn.Conv2d(self.backbone.out_channels[-1], num_classes * self.scale ** 2,
                                           kernel_size=3, padding=1),
                                 nn.PixelShuffle(self.scale))
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        logits = self.duc(self.backbone(pad_to_multiple(x, self.scale))[-1])
        return {"out": logits[..., :height, :width]}
