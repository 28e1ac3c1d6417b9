"""Hierarchical multi-scale attention (Tao et al. 2020) on HRNetV2 + OCR (MS-OCR)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from base.base_model import BaseModel
from models.blocks import ConvBNReLU
from models.hrnet import HRNetEncoder, HRNetWidth, concat_resolutions
from models.ocr import OCRHead, soft_region_head
from utils.registry import MODELS

TRAIN_SCALES = (0.5, 1.0)


@MODELS.register
class MSOCR(BaseModel):
    """HRNetV2 + OCR that also predicts a per-pixel attention, to combine predictions at several scales.

    The attention head (two 3x3 ConvBNReLU of 256 channels, a 1x1 conv and a
    sigmoid, on OCR's augmented representation) says, per pixel, how much a
    scale's prediction is trusted against the finer scales'. Scales are taken
    from the largest down; each new (coarser) prediction ``p`` with attention
    ``a`` updates the combination ``c`` as ``c = a * p + (1 - a) * c`` at the
    resolution of the finer of the two (``a * p`` and ``a`` are resized, as in
    the paper's code). Training uses the scales 0.5 and 1.0, as in the paper,
    and returns the combined soft object regions as ``"aux"``; evaluation uses
    ``scales`` (one scale unless told); :meth:`forward_scales` takes any list.

    The backbone, soft-region (``aux``) and OCR heads are named as in :class:`models.ocr.HRNetOCR`, so
    its weights load into this model (``strict=False``: the attention head is new).

    Args:
        num_classes: output channels (injected by the framework).
        width: 18, 32 or 48 (HRNetV2-W18 / W32 / W48).
        scales: the input scales of its evaluation forward pass, which validation during training
            uses (one scale by default; the paper's inference uses 0.5, 1.0 and 2.0: set them here, or
            use inference's multiscale mode, which combines its own scales with the attention).
        mid_channels: channels of the OCR pixel representation.
        key_channels: channels of the OCR attention.
        attention_channels: channels of the scale-attention head.
        pretrained: start the backbone from timm's ImageNet weights.
        weights_path: a local timm checkpoint to load instead of timm's cache.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).

    Shape:
        ``(N, 3, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (+ ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, width: HRNetWidth = 48, scales: Sequence[float] = (1.0,),
                 mid_channels: int = 512, key_channels: int = 256, attention_channels: int = 256,
                 pretrained: bool = False, weights_path: str | None = None, freeze_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scales = self._check_scales(scales)
        self.backbone = HRNetEncoder(width, pretrained, weights_path)
        channels = sum(self.backbone.out_channels)
        self.aux = soft_region_head(channels, num_classes)
        self.head = OCRHead(channels, num_classes, mid_channels, key_channels)
        self.attention = nn.Sequential(ConvBNReLU(mid_channels, attention_channels, 3),
                                       ConvBNReLU(attention_channels, attention_channels, 3),
                                       nn.Conv2d(attention_channels, 1, 1, bias=False), nn.Sigmoid())
        self.apply_freezing(freeze_bn)

    @staticmethod
    def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        return tuple(float(s) for s in scales)

    def at_scale(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, soft object regions and attention of ``x`` resized by ``scale``, at that resized size.

        Shape:
            ``(N, 3, H, W)`` -> ``(N, K, h, w)``, ``(N, K, h, w)``, ``(N, 1, h, w)`` with ``h = floor(H * scale)``.
        """
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        feats = concat_resolutions(self.backbone(x))
        soft_regions = self.aux(feats)
        logits, augmented = self.head(feats, soft_regions)
        size = x.shape[-2:]
        return self.resize_to(logits, size), self.resize_to(soft_regions, size), \
            self.resize_to(self.attention(augmented), size)

    def forward_scales(self, x: torch.Tensor, scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """The hierarchical combination of the predictions at ``scales``, at the input size.

        Returns ``{"out"}``, plus ``"aux"`` (the soft regions combined alike) in training mode.
        """
        combined: list[torch.Tensor] | None = None
        for scale in sorted(self._check_scales(scales), reverse=True):
            logits, soft_regions, attention = self.at_scale(x, scale)
            if combined is None:
                combined = [logits, soft_regions]
                continue
            size = (logits if scale >= 1.0 else combined[0]).shape[-2:]
            keep = 1 - self.resize_to(attention, size)
            combined = [self.resize_to(attention * new, size) + keep * self.resize_to(old, size)
                        for new, old in zip((logits, soft_regions), combined)]
        out = {"out": self.resize_to(combined[0], x.shape[-2:])}
        if self.training:
            out["aux"] = self.resize_to(combined[1], x.shape[-2:])
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_scales(x, TRAIN_SCALES if self.training else self.scales)
