"""FPN: the semantic segmentation branch of Panoptic FPN (Kirillov et al. 2019)."""
from __future__ import annotations

import math

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import ConvBNReLU, FPNNeck, pad_to_multiple
from models.encoder_head import EncoderModel
from utils.registry import MODELS


class ScaleBranch(nn.Sequential):
    """One pyramid level brought to stride 4: ``k`` times (3x3 ConvBNReLU, 2x bilinear upsampling).

    A stride-4 level (``k = 0``) gets the 3x3 conv alone, as in the paper.
    """

    def __init__(self, in_channels: int, channels: int, upsamplings: int) -> None:
        layers: list[nn.Module] = [ConvBNReLU(in_channels, channels)]
        for index in range(upsamplings):
            if index:
                layers.append(ConvBNReLU(channels, channels))
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        super().__init__(*layers)


@MODELS.register
class FPN(EncoderModel):
    """Encoder -> FPN (256 channels) on the stride 4 ... 32 features -> each level brought to
    stride 4 by 128-channel conv + 2x upsampling stages -> summed -> 1x1 classifier -> 4x upsampling.

    Where it departs from the paper: BatchNorm instead of GroupNorm (as the rest
    of the zoo), and the FPN's laterals are ConvBNReLU (the shared FPN neck). The
    input is zero-padded to a multiple of the coarsest stride so every level
    upsamples exactly 2x, and the logits are cropped back.

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone:
            the encoder arguments, see ``EncoderModel`` in models/encoder_head.py.
        pyramid_channels: channels of the FPN levels.
        segmentation_channels: channels of the semantic branch.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 32,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 pyramid_channels: int = 256, segmentation_channels: int = 128, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels)
        strides = self.backbone.strides
        self.first = feature_at_stride(self.backbone, 4, or_coarser=True)
        self.fpn = FPNNeck(self.backbone.out_channels[self.first:], pyramid_channels)
        self.branches = nn.ModuleList(
            ScaleBranch(pyramid_channels, segmentation_channels, int(math.log2(s // strides[self.first])))
            for s in strides[self.first:])
        self.classifier = nn.Conv2d(segmentation_channels, num_classes, kernel_size=1)
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(pad_to_multiple(x, self.backbone.strides[-1]))
        levels = self.fpn(feats[self.first:])
        semantic = sum(branch(level) for branch, level in zip(self.branches, levels))
        logits = self.classifier(semantic)
        size = [s * self.backbone.strides[self.first] for s in logits.shape[-2:]]
        return {"out": self.resize_to(logits, size)[..., :height, :width]}
