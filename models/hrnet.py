"""HRNetV2 (Wang et al. 2019): parallel multi-resolution branches, fused repeatedly, all kept to the end.

The network itself is timm's HRNet (``hrnet_w18`` / ``hrnet_w32`` / ``hrnet_w48``: the stem,
four stages of parallel branches and the exchange units between them, with its ImageNet
weights), taken before timm's classification head: its four branch outputs at strides 4,
8, 16 and 32 are HRNetV2's representation. :class:`HRNetEncoder` gives them the encoder
interface of ``models.backbones``, so every decoder can use it (``"backbone": "hrnet_w48"``),
and :class:`HRNetV2` adds the paper's segmentation head.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from base.base_model import BaseModel
from models.backbones import create_timm_features
from models.blocks import ConvBNReLU, pad_to_multiple
from utils.errors import ConfigError
from utils.registry import BACKBONES, MODELS

HRNetWidth = Literal[18, 32, 48]
WIDTHS = (18, 32, 48)


class HRNetEncoder(nn.Module):
    """HRNetV2's four parallel branches as an encoder: features at strides 4, 8, 16 and 32.

    Inputs of any size are zero-padded to a multiple of 32,
    which the fusion's exact 2x upsamplings need, and every feature is cropped
    back to ``ceil(size / stride)``, so decoders see the features of the input itself.

    Args:
        width: channels of the highest-resolution branch (the ``W`` of HRNetV2-W48);
            the branches have ``width * (1, 2, 4, 8)``.
        pretrained: load timm's ImageNet weights (from timm's Hugging Face cache,
            downloaded into it when online).
        weights_path: a local timm checkpoint of ``hrnet_w<width>`` to load instead (a training
            checkpoint and wrapper prefixes are unwrapped; a file without every tensor of the
            encoder is refused, see :func:`models.backbones.create_timm_features`).
        in_channels: image channels; timm adapts the stem's first convolution.

    Shape:
        ``(N, in_channels, H, W)`` -> four ``(N, width * 2**i, ceil(H / 4 / 2**i), ceil(W / 4 / 2**i))``.
    """

    STRIDE = 32

    def __init__(self, width: HRNetWidth = 48, pretrained: bool = False, weights_path: str | None = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        if width not in WIDTHS:
            raise ConfigError(f"HRNet width must be one of {WIDTHS}, got {width}")
        if weights_path is not None and not pretrained:
            raise ConfigError("weights_path is set but pretrained is false; set pretrained to true to load "
                              "it, or remove weights_path")
        name = f"hrnet_w{width}"
        # feature_location "" skips timm's "incre" classification blocks: the raw branch outputs.
        self.net = create_timm_features(self, name, pretrained, weights_path, in_channels,
                                        feature_location="", out_indices=(1, 2, 3, 4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.net(pad_to_multiple(x, self.STRIDE))
        return [f[..., :math.ceil(height / s), :math.ceil(width / s)] for f, s in zip(feats, self.strides)]


def _register_encoder(width: int) -> None:
    def build(output_stride: int = 32, pretrained: bool = False, weights_path: str | None = None,
              in_channels: int = 3) -> HRNetEncoder:
        # HRNet keeps a stride-4 branch to the end: a smaller output stride has no meaning for it.
        if output_stride != 32:
            raise ConfigError(f"output_stride {output_stride} is not available for hrnet_w{width}: its "
                              "features already span strides 4 to 32; choose 32")
        return HRNetEncoder(width, pretrained, weights_path, in_channels)

    build.__name__ = f"hrnet_w{width}"
    build.__doc__ = f"HRNetV2-W{width} as an encoder (see :class:`HRNetEncoder`)."
    BACKBONES.register(build, name=build.__name__)


for _width in WIDTHS:
    _register_encoder(_width)


def concat_resolutions(feats: list[torch.Tensor]) -> torch.Tensor:
    """HRNetV2's representation: every branch upsampled (bilinear) to the first's size, concatenated.

    Shape:
        ``[(N, C_i, H / 2**i, W / 2**i)]`` -> ``(N, sum C_i, H, W)``.
    """
    size = feats[0].shape[-2:]
    return torch.cat([feats[0]] + [BaseModel.resize_to(f, size) for f in feats[1:]], dim=1)


@MODELS.register
class HRNetV2(BaseModel):
    """HRNetV2 for segmentation: the concatenated branches, a 1x1 ConvBNReLU and a 1x1 classifier.

    The head works at stride 4 on ``15 * width`` channels (720 for W48, as
    published); the logits are upsampled to the input size. W48 has 65.9 M
    parameters with a 19-class head, as in the paper's Cityscapes table.

    Args:
        num_classes: output channels (injected by the framework).
        width: 18, 32 or 48 (HRNetV2-W18 / W32 / W48).
        pretrained: start the backbone from timm's ImageNet weights.
        weights_path: a local timm checkpoint to load instead of timm's cache.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).

    Shape:
        ``(N, 3, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, width: HRNetWidth = 48, pretrained: bool = False,
                 weights_path: str | None = None, freeze_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = HRNetEncoder(width, pretrained, weights_path)
        channels = sum(self.backbone.out_channels)
        self.head = nn.Sequential(ConvBNReLU(channels, channels, kernel_size=1),
                                  nn.Conv2d(channels, num_classes, kernel_size=1))
        self.apply_freezing(freeze_bn)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(concat_resolutions(self.backbone(x)))
        return {"out": self.resize_to(logits, x.shape[-2:])}
