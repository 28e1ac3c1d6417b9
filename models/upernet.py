"""UPerNet (Xiao et al. 2018): a PPM on the last feature, an FPN over the others, all fused."""
from __future__ import annotations

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import FPNNeck, PPM, ConvBNReLU
from models.blocks import aux_head as make_aux_head
from models.encoder_head import EncoderModel
from utils.registry import MODELS


@MODELS.register
class UPerNet(EncoderModel):
    """Encoder -> PPM on the last feature as the FPN's top level -> every level upsampled to
    stride 4, concatenated, fused by a 3x3 conv -> classifier -> upsampling.

    The features at stride 4 and coarser take part (the stem's stride-2 map does
    not, as in the paper). Channel widths follow mmseg's UPerHead (512).

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone:
            the encoder arguments, see ``EncoderModel`` in models/encoder_head.py.
        channels: channels of the PPM branches, the FPN and the fused map.
        aux_head: add an FCN head on the second-to-last feature (stride 16 stage), output ``aux`` in training.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (and ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 32,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 channels: int = 512, aux_head: bool = True, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels)
        encoder_channels = self.backbone.out_channels
        self.first = feature_at_stride(self.backbone, 4, or_coarser=True)
        ppm = PPM(encoder_channels[-1], channels)
        self.top = nn.Sequential(ppm, ConvBNReLU(ppm.out_channels, channels))
        self.fpn = FPNNeck(encoder_channels[self.first:-1], channels)
        levels = len(encoder_channels) - self.first
        self.fuse = ConvBNReLU(levels * channels, channels)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(channels, num_classes, kernel_size=1))
        self.aux = make_aux_head(encoder_channels[-2], num_classes) if aux_head else None
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        levels = self.fpn(feats[self.first:-1], top=self.top(feats[-1]))
        size = levels[0].shape[-2:]
        fused = self.fuse(torch.cat([self.resize_to(level, size) for level in levels], dim=1))
        out = {"out": self.resize_to(self.classifier(fused), x.shape[-2:])}
        if self.aux is not None and self.training:
            out["aux"] = self.resize_to(self.aux(feats[-2]), x.shape[-2:])
        return out
