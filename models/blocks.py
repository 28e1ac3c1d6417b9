"""Building blocks shared by several models (written once, used everywhere)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from base.base_model import BaseModel


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of ``x`` so both sides are multiples of ``multiple``.

    Decoders that add or concatenate features of several strides need every
    stride to divide the input exactly; the model crops its logits back with
    ``logits[..., :H, :W]``. Zero is the mean of a normalised image.

    While tracing (ONNX and TorchScript export) it pads even by zero pixels, so
    that the tracer records the pad computed from the input's size: the file
    then takes any size, not only the example's multiples.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    return nn.functional.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w or torch.jit.is_tracing() else x


def max_unpool2x(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``F.max_unpool2d(x, indices, 2)``: each value back where a 2x2/stride-2 max pool found it.

    PyTorch's ONNX exporter has no ``max_unpool2d`` (and ONNX's MaxUnpool counts its
    indices over the whole tensor, not per channel), so while exporting to ONNX the
    same values are written with a scatter into a zero map, which ONNX has
    (ScatterElements) and which keeps the sizes dynamic. The indices of a 2x2
    pool with stride 2 never repeat within a channel, so the two agree exactly.
    """
    if not torch.onnx.is_in_onnx_export():
        return nn.functional.max_unpool2d(x, indices, kernel_size=2, stride=2)
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, 4 * h * w)
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view(n, c, 2 * h, 2 * w)


class MaxUnpool2x(nn.Module):
    """:func:`max_unpool2x` as a layer (``nn.MaxUnpool2d(2)`` that also exports to ONNX)."""

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return max_unpool2x(x, indices)


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
        groups: convolution groups (``in_channels`` for a depthwise convolution).

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, padding: int | None = None, groups: int = 1) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise-separable 3x3 convolution: depthwise ConvBNReLU, then pointwise ConvBNReLU.

    DeepLabV3+'s "atrous separable convolution" (Chen et al. 2018): about
    ``9 / out_channels + 1 / 9`` of a full 3x3 convolution's cost.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__(ConvBNReLU(in_channels, in_channels, dilation=dilation, groups=in_channels),
                         ConvBNReLU(in_channels, out_channels, kernel_size=1))


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP atrous rates for a backbone's output stride (DeepLabV3, Chen et al. 2017).

    The paper uses (6, 12, 18) at output stride 16 and doubles them at 8; the
    rates scale inversely with the stride so they cover the same image area,
    which gives (3, 6, 9) at 32.
    """
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


class SeparableASPP(nn.Module):
    """DeepLabV3+'s atrous spatial pyramid pooling, with depthwise-separable atrous branches.

    Parallel branches (a 1x1 conv, one separable dilated 3x3 conv per rate and a
    global average pool + 1x1 conv broadcast back to the map) are concatenated and
    projected by a 1x1 conv, followed by dropout. (DeepLabV3 uses torchvision's
    ``ASPP``, whose atrous branches are full 3x3 convolutions.)

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
            + [SeparableConvBNReLU(in_channels, out_channels, dilation=rate) for rate in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        ConvBNReLU(in_channels, out_channels, kernel_size=1))
        self.project = nn.Sequential(
            ConvBNReLU(out_channels * (len(rates) + 2), out_channels, kernel_size=1),
            nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upsampling a 1x1 map gives a constant map, so broadcasting it is exact.
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet, Zhao et al. 2017).

    The map is average-pooled to ``b x b`` for every bin size ``b``, reduced by a
    1x1 ConvBNReLU, upsampled back and concatenated with the input.

    Args:
        in_channels: channels of the input map.
        channels: channels of each pooled branch.
        bins: output sizes of the pooling branches.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)`` with
        ``out_channels = in_channels + len(bins) * channels``.
    """

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, channels, 1))
                                      for b in bins)
        self.out_channels = in_channels + len(bins) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [BaseModel.resize_to(branch(x), x.shape[-2:]) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class FPNNeck(nn.Module):
    """Feature pyramid (Lin et al. 2017): lateral 1x1 convs, top-down sum, 3x3 smoothing.

    Laterals and smoothing convs are ConvBNReLU (as UPerNet's FPN); the top-down
    path upsamples bilinearly. ``forward(feats, top)`` can take an already
    projected top level (UPerNet's PPM output), which joins the top-down path
    as is, without a lateral or smoothing conv of its own.

    Args:
        in_channels: channels of the input levels, highest resolution first.
        channels: channels of every output level.

    Shape:
        levels ``(N, in_channels[i], H_i, W_i)`` (and ``top`` ``(N, channels, h, w)``)
        -> one ``(N, channels, H_i, W_i)`` per level (and ``top``'s).
    """

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, kernel_size=1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBNReLU(channels, channels) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor], top: torch.Tensor | None = None) -> list[torch.Tensor]:
        levels = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        if top is not None:
            levels.append(top)
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + BaseModel.resize_to(levels[i], levels[i - 1].shape[-2:])
        return [smooth(level) for smooth, level in zip(self.smooth, levels)] + levels[len(self.smooth):]


def aux_head(in_channels: int, num_classes: int) -> nn.Module:
    """The auxiliary classifier on the stride-16 stage: torchvision's ``FCNHead``.

    A 3x3 ConvBNReLU to ``in_channels // 4``, dropout 0.1 and a 1x1 classifier, as in
    torchvision's DeepLabV3/FCN (and PSPNet's and mmseg's auxiliary heads, 256
    channels on ResNet-50's 1024).
    """
    return FCNHead(in_channels, num_classes)


class BilinearUpsample(nn.ConvTranspose2d):
    """A learned ``factor``x upsampling started as bilinear interpolation (FCN, Long et al. 2015).

    A transposed convolution per channel (kernel ``2 * factor``, stride ``factor``,
    padding ``factor // 2``) whose kernel starts as the bilinear one, so an
    ``(h, w)`` map becomes exactly ``(factor * h, factor * w)``.

    Shape:
        ``(N, channels, h, w)`` -> ``(N, channels, factor * h, factor * w)``.
    """

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__(channels, channels, 2 * factor, stride=factor, padding=factor // 2,
                         groups=channels, bias=False)
        # Bilinear weights of a 2*factor tap kernel centred between its middle taps.
        taps = (torch.arange(2 * factor, dtype=torch.float32) - (2 * factor - 1) / 2).abs()
        profile = 1 - taps / factor
        with torch.no_grad():
            self.weight.copy_((profile[:, None] * profile[None, :]).expand_as(self.weight))
