"""DeepLabV3+ (Chen et al. 2018): ASPP encoder plus a light decoder on low-level features."""
from __future__ import annotations

import torch
from torch import nn

from base.base_model import BaseModel
from models.backbones import BackboneName, build_backbone
from models.blocks import ASPP, ConvBNReLU, aspp_rates
from utils.registry import MODELS


@MODELS.register
class DeepLabV3Plus(BaseModel):
    """ResNet backbone -> ASPP on layer4 -> fused with layer1 -> upsampled logits.

    The ASPP output (stride ``output_stride``) is upsampled to layer1 (stride 4),
    concatenated with layer1 projected to 48 channels (few, so the low-level
    features do not outweigh the semantic ones), refined by two 3x3 convs and
    classified; the logits are upsampled to the input size.

    Args:
        num_classes: output channels (injected by the framework).
        backbone: a registered backbone name (``resnet18`` ... ``resnet152``).
        output_stride: 8, 16 or 32; the ASPP rates follow it (see :func:`aspp_rates`).
        pretrained: load ImageNet weights into the backbone (never downloaded).
        weights_path: backbone weights file; default is the torch hub cache.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).

    Shape:
        ``(N, 3, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: BackboneName = "resnet50", output_stride: int = 16,
                 pretrained: bool = False, weights_path: str | None = None, freeze_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bn_frozen = freeze_bn
        self.backbone = build_backbone(backbone, output_stride, pretrained, weights_path)
        channels = self.backbone.out_channels
        self.aspp = ASPP(channels["layer4"], 256, aspp_rates(output_stride))
        self.low_level = ConvBNReLU(channels["layer1"], 48, kernel_size=1)
        self.refine = nn.Sequential(ConvBNReLU(256 + 48, 256), ConvBNReLU(256, 256))
        self.classifier = nn.Conv2d(256, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        low = self.low_level(feats["layer1"])
        high = self.resize_to(self.aspp(feats["layer4"]), low.shape[-2:])
        logits = self.classifier(self.refine(torch.cat([high, low], dim=1)))
        return {"out": self.resize_to(logits, x.shape[-2:])}
