"""UNet (Ronneberger et al. 2015), trained from scratch: no backbone."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from base.base_model import BaseModel
from models.blocks import ConvBNReLU
from utils.registry import MODELS


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two padded 3x3 ConvBNReLU: the unit of every UNet level (keeps H, W)."""
    return nn.Sequential(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class UpBlock(nn.Module):
    """Halve the channels, upsample to the skip's size, concatenate the skip, double conv.

    With ``"transpose"`` a learned 2x2 stride-2 transposed conv upsamples (as in
    the paper); with ``"bilinear"`` a 1x1 conv halves the channels and bilinear
    interpolation upsamples. Either way the result is resized to the skip's
    size, which differs by one pixel when max-pooling floored an odd size.

    Shape:
        ``(N, in_channels, h, w)`` and skip ``(N, out_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, upsampling: str) -> None:
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv = double_conv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = BaseModel.resize_to(self.up(x), skip.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


@MODELS.register
class UNet(BaseModel):
    """Encoder of double convs and max-pools, decoder of upsampling + skip concatenation.

    Convolutions are padded (the paper's are not), so the logits come out at the
    input size without cropping, for any input of at least ``2**depth`` pixels a side.

    Args:
        num_classes: output channels (injected by the framework).
        in_channels: image channels.
        base_channels: channels of the first level; doubled at every downsampling.
        depth: number of downsamplings.
        upsampling: ``"bilinear"`` or ``"transpose"`` (learned), see :class:`UpBlock`.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, base_channels: int = 64, depth: int = 4,
                 upsampling: Literal["bilinear", "transpose"] = "bilinear") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be at least 1, got {base_channels}")
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")
        self.num_classes = num_classes
        self.depth = depth
        widths = [base_channels * 2 ** level for level in range(depth + 1)]
        self.inc = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(widths[i], widths[i + 1]))
                                  for i in range(depth))
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i], upsampling) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        smallest = 2 ** self.depth  # every pooling level needs at least one pixel
        if height < smallest or width < smallest:
            x = nn.functional.pad(x, (0, max(smallest - width, 0), 0, max(smallest - height, 0)),
                                  mode="replicate")
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.up:
            y = up(y, skips.pop())
        return {"out": self.head(y)[..., :height, :width]}
