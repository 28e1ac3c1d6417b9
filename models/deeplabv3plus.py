"""DeepLabV3+ (Chen et al. 2018): separable ASPP encoder plus a light decoder on low-level features."""
from __future__ import annotations

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import ConvBNReLU, SeparableASPP, SeparableConvBNReLU, aspp_rates
from models.encoder_head import EncoderModel
from utils.registry import MODELS


@MODELS.register
class DeepLabV3Plus(EncoderModel):
    """Encoder -> separable ASPP on the last feature -> fused with the stride-4 feature -> logits.

    The ASPP output is upsampled to the stride-4 feature, concatenated with it
    projected to 48 channels (few, so the low-level features do not outweigh the
    semantic ones), refined by two 3x3 convs and classified; the logits are
    upsampled to the input size. As in the paper, the ASPP's atrous branches and
    the decoder's 3x3 convs are depthwise separable (half the FLOPs of full ones).
    The ASPP rates follow the output stride (see :func:`models.blocks.aspp_rates`).

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone:
            the encoder arguments, see ``EncoderModel`` in models/encoder_head.py.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 16,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels)
        channels, strides = self.backbone.out_channels, self.backbone.strides
        self.low_index = feature_at_stride(self.backbone, 4)
        self.aspp = SeparableASPP(channels[-1], 256, aspp_rates(strides[-1]))
        self.low_level = ConvBNReLU(channels[self.low_index], 48, kernel_size=1)
        self.refine = nn.Sequential(SeparableConvBNReLU(256 + 48, 256), SeparableConvBNReLU(256, 256))
        self.classifier = nn.Conv2d(256, num_classes, kernel_size=1)
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        low = self.low_level(feats[self.low_index])
        high = self.resize_to(self.aspp(feats[-1]), low.shape[-2:])
        logits = self.classifier(self.refine(torch.cat([high, low], dim=1)))
        return {"out": self.resize_to(logits, x.shape[-2:])}
