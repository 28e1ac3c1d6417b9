"""Building blocks shared by several models (written once, used everywhere)."""
from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias, BatchNorm follows) + BatchNorm2d + ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        dilation: convolution dilation.
        padding: default ``dilation * (kernel_size - 1) // 2`` keeps the size
            (for odd kernels at stride 1).

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, padding: int | None = None) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP atrous rates for a backbone's output stride (DeepLabV3, Chen et al. 2017).

    The paper uses (6, 12, 18) at output stride 16 and doubles them at 8; the
    rates scale inversely with the stride so they cover the same image area,
    which gives (3, 6, 9) at 32.
    """
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3) with an image-pooling branch.

    Parallel branches (a 1x1 conv, one dilated 3x3 conv per rate and a global
    average pool + 1x1 conv broadcast back to the map) are concatenated and
    projected by a 1x1 conv, followed by dropout.

    The pooling branch normalises a 1x1 map, so training needs batches of at
    least 2 (BatchNorm cannot normalise a single value per channel).

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of every branch and of the output.
        rates: dilation rates of the 3x3 branches, see :func:`aspp_rates`.
        dropout: dropout probability after the projection.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int = 256,
                 rates: tuple[int, ...] = (6, 12, 18), dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, out_channels, kernel_size=1)]
            + [ConvBNReLU(in_channels, out_channels, dilation=rate) for rate in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        ConvBNReLU(in_channels, out_channels, kernel_size=1))
        self.project = nn.Sequential(
            ConvBNReLU(out_channels * (len(rates) + 2), out_channels, kernel_size=1),
            nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upsampling a 1x1 map gives a constant map, so broadcasting it is exact.
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))
