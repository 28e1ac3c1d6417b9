"""Base class of every segmentation network in the zoo."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class BaseModel(nn.Module):
    """A segmentation network: ``forward(x)`` returns ``{"out": logits}``.

    ``logits`` has shape ``(N, num_classes, H, W)``, already upsampled to the input
    size (any H, W: models must handle sizes that are not multiples of their
    stride). A model with an auxiliary head adds ``"aux"`` (same shape) in
    training mode.

    Subclasses that use a pretrained encoder put it in ``self.backbone`` so that
    :meth:`param_groups` can give it its own learning rate. A model that takes
    ``freeze_bn`` (and ``freeze_backbone``) hands them to :meth:`apply_freezing`
    as the last step of its constructor.
    """

    num_classes: int
    #: Set by :meth:`apply_freezing` (``freeze_bn``): keep batch norm in eval mode.
    bn_frozen: bool = False
    #: Set by :meth:`freeze_backbone`: the encoder's weights are fixed and it stays in eval mode.
    backbone_frozen: bool = False

    def train(self, mode: bool = True) -> BaseModel:
        """Like ``nn.Module.train``, but batch norm stays frozen when ``bn_frozen`` is set
        and a frozen backbone stays in eval mode."""
        super().train(mode)
        if mode and self.bn_frozen:
            self.freeze_bn()
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def apply_freezing(self, freeze_bn: bool, freeze_backbone: bool = False) -> None:
        """Apply a model's ``freeze_bn`` and ``freeze_backbone`` arguments; the last step of its constructor.

        Args:
            freeze_bn: keep every BatchNorm in eval mode while training (for small batches):
                :meth:`train` puts them back in eval mode each time, so their running
                statistics stay fixed.
            freeze_backbone: fix the encoder's weights (and its batch-norm statistics), see
                :meth:`freeze_backbone`. Only for models with a ``self.backbone``.
        """
        self.bn_frozen = freeze_bn
        if freeze_backbone:
            self.freeze_backbone()

    def freeze_backbone(self) -> None:
        """Fix the encoder (``freeze_backbone`` in a model's args): its weights get no
        gradient and it stays in eval mode, so its batch-norm statistics are fixed too."""
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def pretrained_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The input ``(mean, std)`` (0-1 range) the pretrained encoder was trained with.

        ``None`` when no pretrained weights were requested: the data set's own
        statistics are then used. Encoders set ``pretrained_normalization``.
        """
        return getattr(getattr(self, "backbone", None), "pretrained_normalization", None)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        backbone = getattr(self, "backbone", None)
        return iter(()) if backbone is None else backbone.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return (p for p in self.parameters() if id(p) not in backbone_ids)

    def param_groups(self, lr: float, backbone_lr_factor: float | None) -> list[dict]:
        """Optimizer parameter groups.

        Args:
            lr: the base learning rate.
            backbone_lr_factor: when not None, the backbone gets ``lr * factor``
                and the decoder ``lr`` (``differential_lr`` in the config).
        """
        if backbone_lr_factor is None:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]
        groups = [
            {"params": [p for p in self.decoder_parameters() if p.requires_grad], "lr": lr, "name": "decoder"},
            {"params": [p for p in self.backbone_parameters() if p.requires_grad],
             "lr": lr * backbone_lr_factor, "name": "backbone"},
        ]
        return [g for g in groups if g["params"]]

    def freeze_bn(self) -> None:
        """Put every batch-norm layer in eval mode (running statistics frozen)."""
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def __str__(self) -> str:
        return f"{super().__str__()}\nTrainable parameters: {self.num_parameters():,}"

    @staticmethod
    def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resize of logits/features to ``size`` (no-op when it matches)."""
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
