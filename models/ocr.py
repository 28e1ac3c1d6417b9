"""OCR (Yuan et al. 2020): object-contextual representations, here on HRNetV2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from base.base_model import BaseModel
from models.blocks import ConvBNReLU
from models.hrnet import HRNetEncoder, HRNetWidth, concat_resolutions
from utils.registry import MODELS


def object_regions(pixels: torch.Tensor, soft_regions: torch.Tensor) -> torch.Tensor:
    """Object region representations: the pixels averaged under each class's spatial softmax.

    Shape:
        pixels ``(N, C, H, W)``, soft_regions ``(N, K, H, W)`` -> ``(N, C, K, 1)``
        (one column per class, so 1x1 convolutions and batch norm apply to it).
    """
    weights = soft_regions.flatten(2).softmax(dim=2)                      # (N, K, HW)
    return torch.bmm(pixels.flatten(2), weights.transpose(1, 2)).unsqueeze(-1)  # (N, C, K, 1)


class ObjectAttention(nn.Module):
    """Pixel-region relation and object context: each pixel attends over the K region representations.

    Queries come from the pixels, keys and values from the regions, each
    through ConvBNReLU transforms to ``key_channels`` (two for queries and
    keys, one for values, as in the paper's code); the context is projected
    back to ``channels``.

    Shape:
        pixels ``(N, channels, H, W)``, regions ``(N, channels, K, 1)`` -> ``(N, channels, H, W)``.
    """

    def __init__(self, channels: int, key_channels: int) -> None:
        super().__init__()
        self.query = nn.Sequential(ConvBNReLU(channels, key_channels, 1), ConvBNReLU(key_channels, key_channels, 1))
        self.key = nn.Sequential(ConvBNReLU(channels, key_channels, 1), ConvBNReLU(key_channels, key_channels, 1))
        self.value = ConvBNReLU(channels, key_channels, 1)
        self.out = ConvBNReLU(key_channels, channels, 1)

    def forward(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        n, _, height, width = pixels.shape
        query = self.query(pixels).flatten(2).transpose(1, 2)  # (N, HW, key)
        key = self.key(regions).flatten(2).transpose(1, 2)      # (N, K, key)
        value = self.value(regions).flatten(2).transpose(1, 2)  # (N, K, key)
        # softmax(q k^T / sqrt(key_channels)) v, the paper's relation and context.
        context = F.scaled_dot_product_attention(query, key, value)
        return self.out(context.transpose(1, 2).reshape(n, -1, height, width))


def soft_region_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """The auxiliary classifier whose logits are OCR's soft object regions: 1x1 ConvBNReLU + 1x1 conv."""
    return nn.Sequential(ConvBNReLU(in_channels, in_channels, 1), nn.Conv2d(in_channels, num_classes, 1))


class OCRHead(nn.Module):
    """Object context from the soft object regions, the augmented representation, the classifier.

    Args:
        in_channels: channels of the backbone representation.
        num_classes: classes (also the number of object regions).
        mid_channels: channels of the pixel representation (512 in the paper).
        key_channels: channels of the attention's queries and keys (256).
        dropout: spatial dropout of the augmented representation (0.05).

    Shape:
        features ``(N, in_channels, H, W)`` and soft regions ``(N, num_classes, H, W)`` (the
        logits of :func:`soft_region_head`) -> logits ``(N, num_classes, H, W)`` and the
        augmented representation ``(N, mid_channels, H, W)``.
    """

    def __init__(self, in_channels: int, num_classes: int, mid_channels: int = 512, key_channels: int = 256,
                 dropout: float = 0.05) -> None:
        super().__init__()
        self.pixels = ConvBNReLU(in_channels, mid_channels, 3)
        self.attention = ObjectAttention(mid_channels, key_channels)
        self.augment = nn.Sequential(ConvBNReLU(2 * mid_channels, mid_channels, 1), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, feats: torch.Tensor, soft_regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.pixels(feats)
        context = self.attention(pixels, object_regions(pixels, soft_regions))
        augmented = self.augment(torch.cat([context, pixels], dim=1))
        return self.classifier(augmented), augmented


@MODELS.register
class HRNetOCR(BaseModel):
    """HRNetV2 + OCR: the OCR head on HRNetV2's concatenated stride-4 representation.

    In training the soft object regions are returned as ``"aux"`` (the paper
    supervises them with weight 0.4, the trainer's default ``aux_loss_weight``).
    HRNetV2-W48 + OCR has 70.3 M parameters with 19 classes, as published.

    Args:
        num_classes: output channels (injected by the framework).
        width: 18, 32 or 48 (HRNetV2-W18 / W32 / W48).
        mid_channels: channels of the OCR pixel representation.
        key_channels: channels of the OCR attention.
        pretrained: start the backbone from timm's ImageNet weights.
        weights_path: a local timm checkpoint to load instead of timm's cache.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).

    Shape:
        ``(N, 3, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (+ ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, width: HRNetWidth = 48, mid_channels: int = 512, key_channels: int = 256,
                 pretrained: bool = False, weights_path: str | None = None, freeze_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = HRNetEncoder(width, pretrained, weights_path)
        channels = sum(self.backbone.out_channels)
        self.aux = soft_region_head(channels, num_classes)
        self.head = OCRHead(channels, num_classes, mid_channels, key_channels)
        self.apply_freezing(freeze_bn)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = concat_resolutions(self.backbone(x))
        soft_regions = self.aux(feats)
        logits, _ = self.head(feats, soft_regions)
        out = {"out": self.resize_to(logits, x.shape[-2:])}
        if self.training:
            out["aux"] = self.resize_to(soft_regions, x.shape[-2:])
        return out
