"""UNet (Ronneberger et al. 2015): the paper's encoder trained from scratch, or any encoder."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from base.base_model import BaseModel
from models.backbones import OptionalEncoderName, build_encoder
from models.blocks import ConvBNReLU
from utils.registry import MODELS


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two padded 3x3 ConvBNReLU: the unit of every UNet level (keeps H, W)."""
    return nn.Sequential(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class UpBlock(nn.Module):
    """Map to ``out_channels``, upsample to the skip's size, concatenate the skip, double conv.

    With ``"transpose"`` a learned 2x2 stride-2 transposed conv upsamples (as in
    the paper); with ``"bilinear"`` a 1x1 conv maps the channels and bilinear
    interpolation upsamples. Either way the result is resized to the skip's
    size, which differs by one pixel when pooling floored an odd size. Without a
    skip (the last block of an encoder whose first feature is at stride 2) it
    upsamples 2x.

    Shape:
        ``(N, in_channels, h, w)`` and skip ``(N, skip_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, upsampling: str) -> None:
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv = double_conv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else [2 * s for s in x.shape[-2:]]
        x = BaseModel.resize_to(self.up(x), size)
        return self.conv(x if skip is None else torch.cat([skip, x], dim=1))


class UNetEncoder(nn.Module):
    """The paper's contracting path: double convs, each level after a 2x2 max-pool.

    Shape:
        ``(N, in_channels, H, W)`` -> ``depth + 1`` maps, ``base_channels * 2**i`` channels at stride ``2**i``.
    """

    def __init__(self, in_channels: int, base_channels: int, depth: int) -> None:
        super().__init__()
        self.out_channels = tuple(base_channels * 2 ** level for level in range(depth + 1))
        self.strides = tuple(2 ** level for level in range(depth + 1))
        widths = self.out_channels
        self.inc = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(widths[i], widths[i + 1]))
                                  for i in range(depth))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.inc(x)]
        for down in self.down:
            feats.append(down(feats[-1]))
        return feats


@MODELS.register
class UNet(BaseModel):
    """Contracting encoder, expanding decoder of upsampling + skip concatenation.

    With ``backbone`` null the encoder is the paper's (double convs and max-pools,
    ``base_channels`` wide, ``depth`` deep) and every decoder level mirrors one
    encoder level. With a ``backbone`` each of its features but the last is a skip
    and ``decoder_channels`` sets the widths of the decoder blocks (as
    segmentation_models.pytorch's Unet); a last block without skip reaches
    stride 1 when the encoder's first feature is at stride 2.

    Convolutions are padded (the paper's are not), so the logits come out at the
    input size without cropping; inputs smaller than the coarsest stride are padded.

    Args:
        num_classes: output channels (injected by the framework).
        backbone: null for the paper's encoder, or an encoder name (see
            ``build_encoder`` in models/backbones.py).
        in_channels: image channels.
        base_channels: channels of the paper's encoder's first level (default 64);
            doubled at every downsampling. Only without ``backbone``.
        depth: number of downsamplings of the paper's encoder (default 4). Only without ``backbone``.
        decoder_channels: widths of the decoder blocks, coarsest first (default
            ``[256, 128, 64, 32, 16]``); the first as many as the decoder has blocks are used.
            Only with ``backbone``.
        upsampling: ``"bilinear"`` or ``"transpose"`` (learned), see :class:`UpBlock`.
        output_stride, pretrained, weights_path: the encoder's, see
            ``build_encoder`` in models/backbones.py. Only with ``backbone``.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).
        freeze_backbone: fix the encoder's weights (and its batch-norm statistics). Only with ``backbone``.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: OptionalEncoderName = None, in_channels: int = 3,
                 base_channels: int | None = None, depth: int | None = None,
                 decoder_channels: Sequence[int] | None = None,
                 upsampling: Literal["bilinear", "transpose"] = "bilinear", output_stride: int = 32,
                 pretrained: bool = False, weights_path: str | None = None, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")
        self.num_classes = num_classes
        if backbone is None:
            encoder, widths = self._paper_encoder(in_channels, base_channels, depth, decoder_channels,
                                                  output_stride, pretrained, freeze_backbone)
            self.encoder = encoder
        else:
            if base_channels is not None or depth is not None:
                raise ValueError("base_channels and depth shape the paper's encoder; with a backbone set "
                                 "decoder_channels instead, or set backbone to null")
            encoder = self.backbone = build_encoder(backbone, output_stride=output_stride, pretrained=pretrained,
                                                    weights_path=weights_path, in_channels=in_channels)
            widths = self._decoder_widths(encoder, decoder_channels)
        skips = list(encoder.out_channels[-2::-1])
        skips += [0] * (len(widths) - len(skips))
        ins = [encoder.out_channels[-1], *widths[:-1]]
        self.up = nn.ModuleList(UpBlock(i, s, o, upsampling) for i, s, o in zip(ins, skips, widths))
        self.head = nn.Conv2d(widths[-1], num_classes, kernel_size=1)
        self.smallest = encoder.strides[-1]
        self.apply_freezing(freeze_bn, freeze_backbone)

    @staticmethod
    def _paper_encoder(in_channels: int, base_channels: int | None, depth: int | None,
                       decoder_channels: Sequence[int] | None, output_stride: int, pretrained: bool,
                       freeze_backbone: bool) -> tuple[UNetEncoder, list[int]]:
        """The paper's encoder and the widths of its mirror decoder."""
        base_channels = 64 if base_channels is None else base_channels
        depth = 4 if depth is None else depth
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be at least 1, got {base_channels}")
        if decoder_channels is not None or output_stride != 32 or pretrained or freeze_backbone:
            raise ValueError("decoder_channels, output_stride, pretrained and freeze_backbone need a backbone; "
                             "the paper's encoder (backbone null) is set by base_channels and depth")
        encoder = UNetEncoder(in_channels, base_channels, depth)
        return encoder, list(encoder.out_channels[-2::-1])

    @staticmethod
    def _decoder_widths(encoder: nn.Module, decoder_channels: Sequence[int] | None) -> list[int]:
        """One width per decoder block: a block per skip, and one more to stride 1 from stride 2."""
        widths = list(decoder_channels or (256, 128, 64, 32, 16))
        blocks = len(encoder.out_channels) - 1 + (encoder.strides[0] == 2)
        if len(widths) < blocks:
            raise ValueError(f"decoder_channels needs {blocks} widths for this backbone, got {len(widths)}")
        return widths[:blocks]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        if height < self.smallest or width < self.smallest:  # every pooling level needs a pixel
            x = nn.functional.pad(x, (0, max(self.smallest - width, 0), 0, max(self.smallest - height, 0)),
                                  mode="replicate")
        feats = (self.backbone if hasattr(self, "backbone") else self.encoder)(x)
        y, skips = feats[-1], feats[-2::-1]
        for index, up in enumerate(self.up):
            y = up(y, skips[index] if index < len(skips) else None)
        logits = self.resize_to(self.head(y), x.shape[-2:])
        return {"out": logits[..., :height, :width]}
