"""The normalisation switch: one config key (``norm``) swaps every batch-norm layer of a model.

Every model of the zoo is written with ``BatchNorm2d`` (that is what pretrained
encoders ship with). ``norm`` names a registered normalisation; after the model
is built (and its pretrained weights loaded), :func:`convert_norm` replaces each
``BatchNorm2d`` of the encoder and the heads by that layer:

- ``BatchNorm`` and ``SyncBatchNorm`` keep the layers, their pretrained running
  statistics and their affine weights; ``SyncBatchNorm`` (like ``use_synch_bn``)
  makes them synchronised when training runs in several processes.
- ``GroupNorm``, ``InstanceNorm`` and ``EvoNormS0`` are new layers; they take over
  the batch-norm layer's affine weight and bias (so a pretrained or zero-initialised
  scale is kept) and its ``eps``. Running statistics have no counterpart and are dropped.
  A new layer also keeps what freezing set on the one it replaces: ``requires_grad`` of
  the weight and bias (its own further parameters, EvoNorm-S0's ``v``, follow the weight)
  and the train/eval mode, so a frozen backbone (``freeze_backbone``) stays frozen.
  (``freeze_bn`` is refused with these norms: they have no statistics to freeze.)
- EvoNorm-S0 is a normalisation and activation in one: only a batch norm that an
  activation follows becomes a gated layer, any other (a residual block's last norm and
  shortcut norm, which feed the addition; a linear projection) an ungated one
  (``apply_act=False``, as in timm and the paper's ResNets). An activation follows a
  batch norm when it is the next module of its ``Sequential`` (after a ``Sequential``'s
  last module: the module after that ``Sequential``), when the norm is timm's
  ``BatchNormAct2d`` with an activation, or when it is a norm but the last of a
  torchvision or timm ResNet block.

:func:`check_training_batches` is the dry forward pass that runs before training:
it finds a layer that would normalise a single value per channel (batch norm on
a 1x1 map with one image, instance norm on a 1x1 map) and says what to change.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from timm.layers import BatchNormAct2d, EvoNorm2dS0
from timm.models import resnet as timm_resnet
from torch import nn
from torch.func import functional_call
from torchvision.models import resnet as tv_resnet

from utils.errors import ConfigError
from utils.registry import NORMS


class Norm:
    """A registered normalisation: what replaces each ``BatchNorm2d`` of a model."""

    #: The layers stay batch norm (nothing is replaced).
    keeps_batchnorm = False
    #: The layers become SyncBatchNorm under multi-process training.
    synchronized = False

    def layer(self, bn: nn.BatchNorm2d, global_pool: bool, activated: bool) -> nn.Module:
        """The layer that takes the place of ``bn``.

        ``global_pool``: ``bn`` is in a global-pooling branch (an ``AdaptiveAvgPool2d(1)``
        starts its ``Sequential``), where it normalises a 1x1 map. ``activated``: an
        activation follows ``bn`` (see :func:`_activated_norms`).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _groups(channels: int, most: int) -> int:
    """The largest number of groups <= ``most`` that divides ``channels`` with at least 2
    channels per group (1 group for a single channel)."""
    return max(g for g in range(1, min(most, max(channels // 2, 1)) + 1) if channels % g == 0)


@NORMS.register
class BatchNorm(Norm):
    """Batch normalisation (Ioffe & Szegedy 2015): the models as written.

    Statistics over the batch and the map, per channel; the pretrained running
    statistics are kept. Needs batches of several images (it cannot normalise a
    single value per channel, see the dry forward pass).

    Args:
        momentum: weight of each batch in the running statistics; null keeps each
            layer's own (0.1 in torchvision, as in PyTorch).
    """

    keeps_batchnorm = True

    def __init__(self, momentum: float | None = None) -> None:
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum


@NORMS.register
class SyncBatchNorm(BatchNorm):
    """Batch normalisation whose statistics are computed over all processes (Zhang et al. 2018,
    "Context Encoding"; PyTorch's ``SyncBatchNorm``).

    The same as ``BatchNorm`` with ``use_synch_bn: true``: under torchrun on CUDA the
    layers are converted to ``SyncBatchNorm`` (each GPU's small batch then counts
    as one large batch); in a single process, and on the CPU (whose process groups
    it does not support), they stay ``BatchNorm2d``. Checkpoints are the same.

    Args:
        momentum: as for ``BatchNorm``.
    """

    synchronized = True


@NORMS.register
class GroupNorm(Norm):
    """Group normalisation (Wu & He 2018): statistics per image over groups of channels.

    Independent of the batch size, so it suits small batches and large crops.
    A layer whose channels ``num_groups`` does not divide gets the largest number
    of groups below it that does, with at least 2 channels per group (the
    training log lists such layers).

    Args:
        num_groups: groups of channels (32 in the paper).
    """

    def __init__(self, num_groups: int = 32) -> None:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups

    def layer(self, bn: nn.BatchNorm2d, global_pool: bool, activated: bool) -> nn.Module:
        return nn.GroupNorm(_groups(bn.num_features, self.num_groups), bn.num_features, eps=bn.eps,
                            affine=bn.affine)


@NORMS.register
class InstanceNorm(Norm):
    """Instance normalisation (Ulyanov et al. 2016): statistics per image and channel over the map.

    Removes each image's contrast and colour cast (style); used for domain
    robustness. A global-pooling branch (a 1x1 map, where an instance's statistics
    are its own value) normalises over the channels instead (``GroupNorm`` with one group).

    Args:
        affine: learn a per-channel scale and shift (as batch norm does).
    """

    def __init__(self, affine: bool = True) -> None:
        self.affine = affine

    def layer(self, bn: nn.BatchNorm2d, global_pool: bool, activated: bool) -> nn.Module:
        if global_pool:
            return nn.GroupNorm(1, bn.num_features, eps=bn.eps, affine=self.affine)
        return nn.InstanceNorm2d(bn.num_features, eps=bn.eps, affine=self.affine)


@NORMS.register
class EvoNormS0(Norm):
    """EvoNorm-S0 (Liu et al. 2020, "Evolving Normalization-Activation Layers"): the sample-based variant.

    ``y = x * sigmoid(v * x) / group_std(x) * gamma + beta``: a normalisation and
    activation in one layer, without batch statistics (timm's ``EvoNorm2dS0``).
    The activations that followed batch norm in the model are kept. A batch norm
    that no activation follows (one that feeds a residual addition) becomes the
    ungated ``y = x / group_std(x) * gamma + beta`` (``apply_act=False``). Groups as
    for ``GroupNorm``.

    Args:
        groups: groups of channels of the standard deviation (32 in the paper).
    """

    def __init__(self, groups: int = 32) -> None:
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups

    def layer(self, bn: nn.BatchNorm2d, global_pool: bool, activated: bool) -> nn.Module:
        return EvoNorm2dS0(bn.num_features, groups=_groups(bn.num_features, self.groups), eps=bn.eps,
                           apply_act=activated)


#: What counts as an activation after a batch norm (EvoNorm-S0's gate).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.PReLU, nn.ELU,
               nn.CELU, nn.SELU, nn.Mish)
#: Residual blocks whose norms are attributes used in another order than they were registered:
#: the last one feeds the addition, each other one an activation (torchvision's and timm's ResNet
#: blocks, timm's HRNet included).
RESIDUAL_BLOCKS = (tv_resnet.BasicBlock, tv_resnet.Bottleneck, timm_resnet.BasicBlock, timm_resnet.Bottleneck)


def _activated_norms(model: nn.Module) -> set[int]:
    """The ids of the batch-norm layers of ``model`` that an activation follows.

    That is: timm's ``BatchNormAct2d`` with an activation; in a residual block of
    ``RESIDUAL_BLOCKS``, every norm but the last; anywhere else, a norm whose next
    sibling module (registration order) is one of ``ACTIVATIONS``, where the last
    module of a ``Sequential`` has as next sibling the module after that ``Sequential``.
    Outside ``Sequential`` containers registration order is taken as the order of use
    (as in ``InitialBlock`` or a ResNet stem: ``conv1``, ``bn1``, ``relu``).
    """
    found: set[int] = set()

    def visit(module: nn.Module, after: nn.Module | None) -> None:
        children = list(module.children())
        norms = [c for c in children if isinstance(c, nn.BatchNorm2d)]
        for i, child in enumerate(children):
            if i + 1 < len(children):
                following = children[i + 1]
            else:  # a Sequential's output is its last module's
                following = after if isinstance(module, nn.Sequential) else None
            if isinstance(child, BatchNormAct2d):
                gated = not isinstance(child.act, nn.Identity)
            elif isinstance(child, nn.BatchNorm2d):
                gated = child is not norms[-1] if isinstance(module, RESIDUAL_BLOCKS) \
                    else isinstance(following, ACTIVATIONS)
            else:
                visit(child, following)
                continue
            if gated:
                found.add(id(child))

    visit(model, None)
    return found


def _global_pool_norms(model: nn.Module) -> set[int]:
    """The ids of the batch-norm layers inside a ``Sequential`` that starts with a global
    average pooling (ASPP's image pooling, the 1x1 bin of a pyramid pooling module)."""
    found = set()
    for module in model.modules():
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.AdaptiveAvgPool2d) \
                and module[0].output_size in (1, (1, 1)):
            found.update(id(m) for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    return found


def convert_norm(model: nn.Module, norm: Norm) -> str:
    """Replace every ``BatchNorm2d`` of ``model`` (in place) as ``norm`` says; returns a summary for the log.

    The new layer takes over the affine weight and bias of the one it replaces, their
    ``requires_grad`` and its train/eval mode. timm's ``BatchNormAct2d`` (batch norm fused
    with an activation) becomes the new layer followed by the same dropout and activation.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if norm.keeps_batchnorm:
        if norm.momentum is not None:
            for bn in batchnorms:
                bn.momentum = norm.momentum
        sync = "; synchronised across processes under torchrun on CUDA" if norm.synchronized else ""
        return f"{norm!r}: {len(batchnorms)} batch-norm layers{sync}"
    pooled = _global_pool_norms(model)
    activated = _activated_norms(model)
    made: Counter = Counter()
    fewer_groups: Counter = Counter()

    def replace(bn: nn.BatchNorm2d) -> nn.Module:
        new = norm.layer(bn, id(bn) in pooled, id(bn) in activated)
        if bn.affine and getattr(new, "weight", None) is not None:
            with torch.no_grad():
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
        # What freezing set on bn (convert_norm runs after the model froze its backbone).
        for name, param in new.named_parameters(recurse=False):
            if bn.affine:  # EvoNorm-S0's v, which bn lacks, follows the weight
                param.requires_grad_(getattr(bn, name if name == "bias" else "weight").requires_grad)
        new.train(bn.training)
        made[type(new).__name__] += 1
        groups = getattr(new, "num_groups", getattr(new, "groups", None))
        wanted = getattr(norm, "num_groups", getattr(norm, "groups", None))
        if isinstance(new, (nn.GroupNorm, EvoNorm2dS0)) and wanted is not None and groups != wanted:
            fewer_groups[(bn.num_features, groups)] += 1
        if isinstance(bn, BatchNormAct2d):
            return nn.Sequential(new, bn.drop, bn.act)
        return new

    _replace_children(model, replace)
    parts = ", ".join(f"{count} {name}" for name, count in sorted(made.items()))
    text = f"{norm!r} in place of {len(batchnorms)} batch-norm layers ({parts})"
    if pooled and isinstance(norm, InstanceNorm):
        text += (f"; {len(pooled)} in global-pooling branches (1x1 maps) normalise over the channels "
                 "instead (GroupNorm with one group)")
    if fewer_groups:
        shown = ", ".join(f"{c} channels: {g} groups" + (f" (x{n})" if n > 1 else "")
                          for (c, g), n in sorted(fewer_groups.items()))
        text += f"; fewer groups where the channels ask for it: {shown}"
    return text


def _replace_children(module: nn.Module, replace: Callable[[nn.BatchNorm2d], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, replace(child))
        else:
            _replace_children(child, replace)


class _SingleValue(Exception):
    """Raised by the dry forward pass's hook at the first layer that normalises one value per channel."""

    def __init__(self, name: str, module: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__(name)
        self.name, self.module, self.shape = name, module, shape


def check_training_batches(model: nn.Module, image_shape: tuple[int, int, int], batch: int,
                           batch_text: str, processes: int = 1) -> None:
    """Run the model once on shapes only (PyTorch's meta device) in training mode, with a batch of
    ``batch`` images of ``image_shape`` ``(channels, height, width)``, and raise a ConfigError at
    the first normalisation layer that would see a single value per channel.

    ``batch_text`` says where that batch size comes from (for the message); ``processes``:
    how many processes' batches batch norm adds together (more than 1 when it is to be
    synchronised). No weight is read or changed and nothing is computed; a model that
    cannot run on the meta device is not checked (the first training step would then
    report the problem).
    """
    arch = type(model).__name__
    hooks = []

    def hook(name):
        def check(module, inputs):
            shape = tuple(inputs[0].shape)
            area = shape[-1] * shape[-2]
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                values = shape[0] * processes * area
            elif isinstance(module, nn.InstanceNorm2d) and (module.training or not module.track_running_stats):
                values = area
            else:
                return
            if values <= 1:
                raise _SingleValue(name, module, shape)
        return check

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d)):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.train()
    try:
        functional_call(model, state, (torch.empty((batch, *image_shape), device="meta"),), strict=False)
    except _SingleValue as found:
        height, width = image_shape[1:]
        where = f"its input is {found.shape[-2]}x{found.shape[-1]} for {height}x{width} training images"
        layer = f"{arch}'s layer {found.name} ({type(found.module).__name__})"
        if isinstance(found.module, nn.InstanceNorm2d):
            raise ConfigError(f"norm: with InstanceNorm, {layer} would normalise a single value per channel "
                              f"({where}); train on larger crops or use norm GroupNorm") from None
        raise ConfigError(f"train_loader.args.batch_size: {batch_text} makes {layer} normalise a single "
                          f"value per channel in training ({where}), which batch norm cannot do. Use "
                          "batches of 2 or more images, or a norm without batch statistics "
                          "(norm: GroupNorm)") from None
    except Exception:  # noqa: BLE001 - an op without a meta kernel: the check does not apply
        return
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
