"""FCN-8s (Long et al. 2015): VGG16 scores fused with pool4's and pool3's, learned upsampling."""
from __future__ import annotations

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import BilinearUpsample, pad_to_multiple
from models.encoder_head import EncoderModel
from utils.registry import MODELS


@MODELS.register
class FCN8s(EncoderModel):
    """Encoder (stride 32) -> fc6 (7x7) and fc7 (1x1) as convolutions -> scores, upsampled 2x and
    summed with the stride-16 feature's scores, again 2x with the stride-8 feature's, then 8x.

    Where it departs from the paper: the encoder is VGG16 with BatchNorm
    (``vgg16_bn``, or any stride-32 encoder), and instead of padding the input by
    100 pixels and cropping every skip, the input is zero-padded to a multiple of
    32 so each upsampling is exact (transposed convolutions started as bilinear
    interpolation, one per class); the scores are cropped back. The skip score
    layers start at zero, as in the paper, so training starts from the
    stride-32 prediction.

    Args:
        backbone, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone: the encoder
            arguments (at output stride 32), see ``EncoderModel`` in models/encoder_head.py.
        fc_channels: channels of fc6 and fc7 (4096 in the paper).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "vgg16_bn", pretrained: bool = False,
                 weights_path: str | None = None, in_channels: int = 3, fc_channels: int = 4096,
                 freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, 32, pretrained, weights_path, in_channels)
        channels = self.backbone.out_channels
        self.skips = (feature_at_stride(self.backbone, 16), feature_at_stride(self.backbone, 8))
        self.head = nn.Sequential(
            nn.Conv2d(channels[-1], fc_channels, kernel_size=7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(),
            nn.Conv2d(fc_channels, fc_channels, kernel_size=1), nn.ReLU(inplace=True), nn.Dropout2d(),
            nn.Conv2d(fc_channels, num_classes, kernel_size=1))
        self.skip_scores = nn.ModuleList(nn.Conv2d(channels[i], num_classes, kernel_size=1) for i in self.skips)
        for score in self.skip_scores:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.up2 = nn.ModuleList(BilinearUpsample(num_classes, 2) for _ in self.skips)
        self.up8 = BilinearUpsample(num_classes, 8)
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(pad_to_multiple(x, 32))
        y = self.head(feats[-1])
        for index, score, up in zip(self.skips, self.skip_scores, self.up2):
            y = up(y) + score(feats[index])
        return {"out": self.up8(y)[..., :height, :width]}
