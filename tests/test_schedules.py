"""Learning-rate schedules and optimizer construction, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from utils.build import build_optimizer, build_scheduler
from utils.config import validate_config
from utils.schedules.iteration import OneCycle, Poly, poly_factor
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
    assert poly_factor(25, 20) == 0.0  # past the end it stays at zero


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
