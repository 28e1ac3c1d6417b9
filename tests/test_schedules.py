"""Learning-rate schedules and optimizer construction, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from builder import build_optimizer, build_scheduler
from utils.config import validate_config
from optim.schedules import Constant, Cosine, OneCycle, Poly, Step
from utils.registry import MODELS


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(scheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_poly_values():
    # 2 epochs x 5 iterations, power 2: lr_t = (1 - t/10)^2
    values = lrs(Poly(sgd(), num_epochs=2, iters_per_epoch=5, power=2.0), 10)
    assert values == pytest.approx([(1 - t / 10) ** 2 for t in range(10)])
    assert values[5] == pytest.approx(0.25)


def test_poly_warmup():
    # 4 warm-up iterations from 0.2: 0.2, 0.4, 0.6, 0.8, then (1 - (t-4)/6)^1 over the last 6
    scheduler = Poly(sgd(), num_epochs=1, iters_per_epoch=10, power=1.0, warmup_epochs=0.4, warmup_ratio=0.2)
    assert lrs(scheduler, 10) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert scheduler.factor(25) == 0.0  # past the end it stays at zero


def test_constant_with_warmup():
    # 3 warm-up iterations from 0.4: 0.4, 0.6, 0.8, then 1 for good.
    scheduler = Constant(sgd(2.0), num_epochs=2, iters_per_epoch=3, warmup_epochs=1, warmup_ratio=0.4)
    assert lrs(scheduler, 6) == pytest.approx([0.8, 1.2, 1.6, 2.0, 2.0, 2.0])


def test_step_is_the_enet_recipe():
    # x0.1 every 100 epochs of 7 iterations: 1 up to iteration 699, 0.1 from 700, 0.01 from 1400.
    scheduler = Step(sgd(), num_epochs=300, iters_per_epoch=7, step_epochs=100, gamma=0.1)
    values = lrs(scheduler, 1401)
    assert values[0] == values[699] == 1.0
    assert values[700] == pytest.approx(0.1) and values[1399] == pytest.approx(0.1)
    assert values[1400] == pytest.approx(0.01)


def test_step_counts_from_the_start_with_warmup():
    # Steps of 4 iterations (2 epochs of 2), warm-up of 2 iterations from 0.5: 0.5, 0.75, 1, 1, 0.5, ...
    scheduler = Step(sgd(), num_epochs=4, iters_per_epoch=2, step_epochs=2, gamma=0.5, warmup_epochs=1,
                     warmup_ratio=0.5)
    assert lrs(scheduler, 8) == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])


def test_cosine_values():
    # 9 iterations, no warm-up, to 0.1: 0.1 + 0.9 * (1 + cos(pi t / 9)) / 2
    values = lrs(Cosine(sgd(), num_epochs=3, iters_per_epoch=3, min_ratio=0.1), 9)
    assert values[0] == pytest.approx(1.0)
    assert values[3] == pytest.approx(0.1 + 0.9 * 0.75)  # cos(pi / 3) = 0.5
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.25)  # cos(2 pi / 3) = -0.5
    assert lrs(Cosine(sgd(), num_epochs=1, iters_per_epoch=4), 4) == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


def test_cosine_with_warmup():
    # 2 warm-up iterations from 0 (0, 0.5), then cosine over the remaining 4: 1, 0.853.., 0.5, 0.146..
    scheduler = Cosine(sgd(), num_epochs=2, iters_per_epoch=3, warmup_epochs=2 / 3, warmup_ratio=0.0)
    assert lrs(scheduler, 6) == pytest.approx([0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                               (1 + math.cos(3 * math.pi / 4)) / 2])


@pytest.mark.parametrize("schedule", ["Constant", "Step", "Cosine"])
def test_new_schedules_from_config(tiny_config, schedule):
    tiny_config["lr_scheduler"] = {"type": schedule, "args": {"warmup_epochs": 1.0, "warmup_ratio": 0.5}}
    config = validate_config(tiny_config)
    optimizer = sgd(0.1)
    scheduler = build_scheduler(config, optimizer, iters_per_epoch=4)
    assert lrs(scheduler, 2) == pytest.approx([0.05, 0.0625])  # the warm-up: 0.1 * (0.5 + 0.5 * t / 4)


def test_one_cycle_values():
    # 10 iterations, rise over 3 from 1/4 to 1, then cosine down to 1/(4*2) over 7.
    values = lrs(OneCycle(sgd(), num_epochs=1, iters_per_epoch=10, pct_start=0.3, div_factor=4.0,
                          final_div_factor=2.0), 10)
    rise = [1 + (0.25 - 1) * (1 + math.cos(math.pi * t / 3)) / 2 for t in range(3)]
    fall = [0.125 + (1 - 0.125) * (1 + math.cos(math.pi * t / 7)) / 2 for t in range(7)]
    assert values == pytest.approx(rise + fall)
    assert values[0] == pytest.approx(0.25) and values[3] == pytest.approx(1.0)


def test_schedule_state_is_the_iteration_count():
    first = Poly(sgd(), num_epochs=2, iters_per_epoch=5)
    lrs(first, 3)
    state = first.state_dict()
    assert state == {"last_epoch": 3, "_step_count": 4}
    second = Poly(sgd(), num_epochs=2, iters_per_epoch=5)
    second.load_state_dict(state)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx((1 - 3 / 10) ** 0.9)
    assert lrs(second, 7) == pytest.approx(lrs(first, 7))


def test_bad_schedule_args():
    with pytest.raises(ValueError, match="pct_start must be in"):
        OneCycle(sgd(), 1, 10, pct_start=1.5)
    with pytest.raises(ValueError, match="power must be > 0"):
        Poly(sgd(), 1, 10, power=0)
    with pytest.raises(ValueError, match="need step_epochs > 0 and 0 < gamma <= 1"):
        Step(sgd(), 1, 10, gamma=0)
    with pytest.raises(ValueError, match="min_ratio must be in"):
        Cosine(sgd(), 1, 10, min_ratio=2)
    with pytest.raises(ValueError, match="need warmup_epochs >= 0"):
        Constant(sgd(), 1, 10, warmup_epochs=-1)


@pytest.mark.parametrize("differential, expected", [(True, {"decoder": 0.02, "backbone": 0.002}),
                                                    (False, {None: 0.02})])
def test_differential_lr_gives_backbone_a_fraction(tiny_config, differential, expected):
    tiny_config["arch"] = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}
    tiny_config["optimizer"] = {"type": "SGD", "differential_lr": differential, "backbone_lr_factor": 0.1,
                                "args": {"lr": 0.02}}
    config = validate_config(tiny_config)
    model = MODELS.build(config["arch"], "arch", num_classes=5)
    optimizer = build_optimizer(config, model)
    assert {g.get("name"): g["lr"] for g in optimizer.param_groups} == pytest.approx(expected)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    if differential:
        backbone = next(g for g in optimizer.param_groups if g["name"] == "backbone")
        assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    # The schedule scales every group by the same factor.
    scheduler = build_scheduler(config, optimizer, iters_per_epoch=4)
    optimizer.step()
    scheduler.step()
    factor = (1 - 1 / 8) ** 0.9
    assert {g.get("name"): g["lr"] for g in optimizer.param_groups} == \
        pytest.approx({k: v * factor for k, v in expected.items()})
