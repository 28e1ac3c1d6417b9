"""ENet (Paszke et al. 2016): a real-time encoder-decoder of bottleneck blocks, trained from scratch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from base.base_model import BaseModel
from models.blocks import MaxUnpool2x, pad_to_multiple
from utils.registry import MODELS


def conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1, stride: int = 1,
            padding: int | tuple[int, int] = 0, dilation: int = 1) -> nn.Sequential:
    """Conv2d without bias (BatchNorm follows) + BatchNorm2d; the activation is up to the caller."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels, eps=1e-3))


def activation(channels: int, relu: bool) -> nn.Module:
    """PReLU with one slope per channel (encoder, as in the paper's code) or ReLU (decoder)."""
    return nn.ReLU(inplace=True) if relu else nn.PReLU(channels)


class SpatialDropout(nn.Module):
    """Residual add with spatial dropout on the branch: ``shortcut + dropout2d(branch)``.

    The same distribution as ``nn.Dropout2d(p)`` on the branch (whole channels
    zeroed with probability ``p``, survivors scaled by ``1 / (1 - p)``), but the
    per-channel mask is applied by the add itself (``addcmul``): one pass over
    the activation instead of two, which matters in a network this memory-bound.
    A shortcut with fewer channels than the branch stands for one zero-padded
    to the branch's width (ENet's downsampling); the zeros are not materialised.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Shape: shortcut ``(N, c, H, W)``, branch ``(N, C, H, W)`` with ``c <= C`` -> ``(N, C, H, W)``."""
        channels = shortcut.shape[1]
        if self.training and self.p > 0.0:
            keep = torch.empty(*branch.shape[:2], 1, 1, device=branch.device, dtype=branch.dtype)
            keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
            if channels == branch.shape[1]:
                return torch.addcmul(shortcut, branch, keep)
            return torch.cat([torch.addcmul(shortcut, branch[:, :channels], keep[:, :channels]),
                              branch[:, channels:] * keep[:, channels:]], dim=1)
        if channels == branch.shape[1]:
            return shortcut + branch
        return torch.cat([shortcut + branch[:, :channels], branch[:, channels:]], dim=1)


class InitialBlock(nn.Module):
    """3x3 stride-2 conv (``out_channels - in_channels`` filters) beside a 3x3 stride-2 max pool, concatenated.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class Bottleneck(nn.Module):
    """Regular, dilated or asymmetric bottleneck: ``act(x + dropout(expand(conv(project(x)))))``.

    Args:
        channels: input and output channels.
        kind: ``"regular"`` (3x3), ``"dilated"`` (3x3 with ``dilation``) or
            ``"asymmetric"`` (5x1 then 1x5).
        dilation: the rate of a dilated bottleneck.
        dropout: spatial dropout probability.
        relu: ReLU (decoder) instead of PReLU (encoder).
        ratio: channel reduction of the projection.
    """

    def __init__(self, channels: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1,
                 relu: bool = False, ratio: int = 4) -> None:
        super().__init__()
        inner = channels // ratio
        if kind == "asymmetric":
            middle = [conv_bn(inner, inner, (5, 1), padding=(2, 0)), activation(inner, relu),
                      conv_bn(inner, inner, (1, 5), padding=(0, 2))]
        else:
            middle = [conv_bn(inner, inner, 3, padding=dilation, dilation=dilation)]
        self.branch = nn.Sequential(conv_bn(channels, inner), activation(inner, relu),
                                    *middle, activation(inner, relu), conv_bn(inner, channels))
        self.add = SpatialDropout(dropout)
        self.act = activation(channels, relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.add(x, self.branch(x)))


class DownsamplingBottleneck(nn.Module):
    """Halves the size: a 2x2 max pool (indices kept for the decoder) beside a branch led by a 2x2 stride-2 conv.

    The pooled input, zero-padded to ``out_channels`` as in the paper, is the
    shortcut (see :class:`SpatialDropout`: the zeros are never added).

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H // 2, W // 2)`` and the pool indices.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, ratio: int = 4) -> None:
        super().__init__()
        inner = in_channels // ratio
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.branch = nn.Sequential(conv_bn(in_channels, inner, 2, stride=2), nn.PReLU(inner),
                                    conv_bn(inner, inner, 3, padding=1), nn.PReLU(inner),
                                    conv_bn(inner, out_channels))
        self.add = SpatialDropout(dropout)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, indices = self.pool(x)
        return self.act(self.add(pooled, self.branch(x))), indices


class UpsamplingBottleneck(nn.Module):
    """Doubles the size: max-unpooling with the encoder's indices beside a transposed-conv branch.

    The shortcut's 1x1 conv (to ``out_channels``) and the branch's 1x1
    projection read the same input, so they are one convolution and one batch
    norm whose output channels are split (the same function as two, in one pass).

    Shape:
        ``(N, in_channels, h, w)`` + indices of the matching pool -> ``(N, out_channels, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, ratio: int = 4) -> None:
        super().__init__()
        inner = in_channels // ratio
        self.split = [out_channels, inner]
        self.project = conv_bn(in_channels, out_channels + inner)
        self.unpool = MaxUnpool2x()
        self.up = nn.ConvTranspose2d(inner, inner, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.branch = nn.Sequential(nn.BatchNorm2d(inner, eps=1e-3), nn.ReLU(inplace=True),
                                    conv_bn(inner, out_channels))
        self.add = SpatialDropout(dropout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        shortcut, branch = self.project(x).split(self.split, dim=1)
        return self.act(self.add(self.unpool(shortcut, indices), self.branch(self.up(F.relu(branch)))))


@MODELS.register
class ENet(BaseModel):
    """ENet: initial block, three encoder stages of bottlenecks, two decoder stages, a transposed conv.

    Follows the paper's table 1: stage 1 is a downsampling bottleneck to 64
    channels and four regular ones (dropout 0.01); stages 2 and 3 work at 128
    channels (stage 2 starts by downsampling) and interleave regular, dilated
    (2, 4, 8, 16) and asymmetric 5x1/1x5 bottlenecks (dropout 0.1); stages 4
    and 5 upsample by max-unpooling with the indices of stages 2 and 1.
    PReLU in the encoder (one slope per channel), ReLU in the decoder.

    Args:
        num_classes: output channels (injected by the framework).
        in_channels: image channels.
        dropout: spatial dropout of the bottlenecks after stage 1 (the paper's 0.1).
        channels_last: keep weights and activations in the ``channels_last``
            memory format: faster on the CPU, fastest with ``"amp": true``
            (bf16), where oneDNN then needs no layout reorders (tools/bench/enet.py).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``; other
        sizes than multiples of 8 are zero-padded, then the logits cropped.
    """

    STRIDE = 8  # three halvings, each undone exactly by its unpooling

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.1,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.initial = InitialBlock(in_channels, 16)
        self.down1 = DownsamplingBottleneck(16, 64, dropout=0.01)
        self.stage1 = nn.Sequential(*(Bottleneck(64, dropout=0.01) for _ in range(4)))
        self.down2 = DownsamplingBottleneck(64, 128, dropout=dropout)
        self.stage2 = self._stage(128, dropout)
        self.stage3 = self._stage(128, dropout)
        self.up4 = UpsamplingBottleneck(128, 64, dropout=dropout)
        self.stage4 = nn.Sequential(*(Bottleneck(64, dropout=dropout, relu=True) for _ in range(2)))
        self.up5 = UpsamplingBottleneck(64, 16, dropout=dropout)
        self.stage5 = Bottleneck(16, dropout=dropout, relu=True)
        self.classifier = nn.ConvTranspose2d(16, num_classes, 2, stride=2)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @staticmethod
    def _stage(channels: int, dropout: float) -> nn.Sequential:
        """Bottlenecks x.1 - x.8 of stages 2 and 3."""
        def block(kind: str, dilation: int = 1) -> Bottleneck:
            return Bottleneck(channels, kind, dilation, dropout)
        return nn.Sequential(block("regular"), block("dilated", 2), block("asymmetric"), block("dilated", 4),
                             block("regular"), block("dilated", 8), block("asymmetric"), block("dilated", 16))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        x = self.initial(pad_to_multiple(x, self.STRIDE).contiguous(memory_format=self.memory_format))
        x, indices1 = self.down1(x)
        x, indices2 = self.down2(self.stage1(x))
        x = self.stage4(self.up4(self.stage3(self.stage2(x)), indices2))
        x = self.stage5(self.up5(x, indices1))
        return {"out": self.classifier(x)[..., :height, :width]}
