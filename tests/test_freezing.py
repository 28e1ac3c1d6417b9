"""``freeze_backbone`` and ``freeze_bn`` (``BaseModel.apply_freezing``) on every model with an encoder.

``freeze_backbone``: exactly the encoder's parameters get ``requires_grad`` False, the encoder stays
in eval mode through ``train()``, and a training step changes none of its weights or statistics.
``freeze_bn``: every BatchNorm stays in eval mode through ``train()`` and its running statistics
do not move, while every parameter still trains.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models  # noqa: F401  (registers the models)
from tests.model_cases import CASES, ModelCase
from utils.registry import MODELS

NUM_CLASSES = 3


def build(case: ModelCase, **args) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.build({"type": case.model, "args": {**case.args, **args}}, "arch", num_classes=NUM_CLASSES)


def batch_norms(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_step(model: nn.Module) -> None:
    """One SGD step on a random batch, in training mode, over the groups the trainer would build."""
    model.train()
    optimizer = torch.optim.SGD(model.param_groups(0.1, 0.1), lr=0.1)
    out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    sum(v.square().mean() for v in out.values()).backward()
    optimizer.step()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_freeze_backbone_fixes_exactly_the_encoder(case):
    if "freeze_backbone" not in MODELS.parameters(case.model) or "backbone" not in case.args:
        pytest.skip("no encoder to freeze")
    model = build(case, freeze_backbone=True)
    backbone = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert backbone and frozen == backbone
    assert model.backbone_frozen and not model.bn_frozen
    before = snapshot(model)
    for _ in range(2):  # train() after eval() puts the encoder back in eval mode, not in training
        model.train()
        assert not any(m.training for m in model.backbone.modules())
        assert all(m.training for name, m in model.named_modules() if not name.startswith("backbone"))
        model.eval()
    train_step(model)
    after = snapshot(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("backbone.") for k in moved)  # weights and batch-norm statistics
    assert any(k.startswith("backbone.") for k in before) and moved  # the decoder did train


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_freeze_bn_keeps_every_batch_norm_in_eval_mode(case):
    if "freeze_bn" not in MODELS.parameters(case.model):
        pytest.skip("no freeze_bn argument")
    model = build(case, freeze_bn=True)
    if not hasattr(model, "backbone"):
        pytest.skip("no encoder")
    assert model.bn_frozen and not model.backbone_frozen
    assert all(p.requires_grad for p in model.parameters())
    norms = batch_norms(model)
    assert batch_norms(model.backbone), "the encoder has batch norm to freeze"
    for _ in range(2):
        model.train()
        assert [name for name, m in norms if m.training] == []
        assert all(m.training for m in model.modules() if isinstance(m, nn.Conv2d))  # the rest trains
        model.eval()
    stats = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in norms}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_step(model)
    for name, m in norms:
        assert torch.equal(m.running_mean, stats[name][0]) and torch.equal(m.running_var, stats[name][1]), name
    assert any(not torch.equal(p, weights[name]) for name, p in model.backbone.named_parameters(prefix="backbone"))


def test_without_freezing_batch_norm_trains():
    """The control: the same step moves the statistics when nothing is frozen."""
    model = build(next(c for c in CASES if c.model == "DeepLabV3Plus"))
    norms = batch_norms(model.backbone)
    stats = [m.running_mean.clone() for _, m in norms]
    train_step(model)
    assert all(m.training for _, m in norms)
    assert any(not torch.equal(m.running_mean, s) for (_, m), s in zip(norms, stats))
