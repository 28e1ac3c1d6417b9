"""GCN (Peng et al. 2017): large-kernel global convolutions and boundary refinement."""
from __future__ import annotations

import math

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import BilinearUpsample, pad_to_multiple
from models.encoder_head import EncoderModel
from utils.registry import MODELS


class GlobalConv(nn.Module):
    """A ``k x k`` receptive field at the cost of ``2k``: (k x 1 then 1 x k) + (1 x k then k x 1).

    No BatchNorm and no ReLU, as in the paper.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.left = nn.Sequential(nn.Conv2d(in_channels, out_channels, (kernel_size, 1), padding=(pad, 0)),
                                  nn.Conv2d(out_channels, out_channels, (1, kernel_size), padding=(0, pad)))
        self.right = nn.Sequential(nn.Conv2d(in_channels, out_channels, (1, kernel_size), padding=(0, pad)),
                                   nn.Conv2d(out_channels, out_channels, (kernel_size, 1), padding=(pad, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """Residual refinement of score maps: ``x + conv3x3(relu(conv3x3(x)))``.

    Shape:
        ``(N, channels, H, W)`` -> ``(N, channels, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


@MODELS.register
class GCN(EncoderModel):
    """Encoder -> GCN + BR score maps on every feature at stride 4 or coarser -> coarse to fine:
    upsample (learned, bilinear at start), add the finer level's scores, BR -> two more
    upsample + BR steps from stride 4 to the input.

    The input is zero-padded to a multiple of the coarsest stride (so each
    upsampling is exactly 2x) and the scores are cropped back.

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone:
            the encoder arguments, see ``EncoderModel`` in models/encoder_head.py.
        kernel_size: ``k`` of the global convolutions (15 in the paper).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 32,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 kernel_size: int = 15, freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels)
        strides = self.backbone.strides
        self.first = feature_at_stride(self.backbone, 4, or_coarser=True)
        self.gcn = nn.ModuleList(GlobalConv(c, num_classes, kernel_size)
                                 for c in self.backbone.out_channels[self.first:])
        self.br = nn.ModuleList(BoundaryRefine(num_classes) for _ in self.gcn)
        self.fuse_br = nn.ModuleList(BoundaryRefine(num_classes) for _ in self.gcn[1:])
        # Between levels of equal stride (a dilated encoder) nothing is upsampled.
        self.up = nn.ModuleList(BilinearUpsample(num_classes, 2) if coarse > fine else nn.Identity()
                                for fine, coarse in zip(strides[self.first:-1], strides[self.first + 1:]))
        steps = int(math.log2(strides[self.first]))
        self.final = nn.ModuleList(nn.Sequential(BilinearUpsample(num_classes, 2), BoundaryRefine(num_classes))
                                   for _ in range(steps))
        self.apply_freezing(freeze_bn, freeze_backbone)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(pad_to_multiple(x, self.backbone.strides[-1]))[self.first:]
        scores = [br(gcn(f)) for gcn, br, f in zip(self.gcn, self.br, feats)]
        y = scores[-1]
        for index in range(len(scores) - 2, -1, -1):
            y = self.fuse_br[index](self.up[index](y) + scores[index])
        for step in self.final:
            y = step(y)
        return {"out": y[..., :height, :width]}
