"""Properties every registered loss must have: inputs untouched, void pixels inert, finite under
bf16 autocast, correct gradients, and configs validated with dotted paths."""
import copy

import pytest
import torch

import models.losses  # noqa: F401  (registers every loss)
from utils.config import LOSS_INJECTED, validate_config
from utils.errors import ConfigError
from utils.registry import LOSSES

NUM_CLASSES = 3

# One configuration of each registered loss (args as a config would give them).
SPECS = {
    "CrossEntropyLoss": {"label_smoothing": 0.1},
    "WeightedCrossEntropyLoss": {"weights": [0.5, 1.0, 2.0], "label_smoothing": 0.1},
    "FocalLoss": {"gamma": 2.0, "alpha": [0.2, 0.3, 0.5]},
    "SoftDiceLoss": {"smooth": 1.0},
    "DiceCrossEntropyLoss": {"ce_weight": 1.0, "dice_weight": 0.5},
    "LovaszSoftmaxLoss": {"per_image": True},
    "OhemCrossEntropyLoss": {"thresh": 0.7, "min_kept": 20},
    "RMILoss": {"pool_size": 2, "radius": 2},
    "WeightedSumLoss": {"terms": [{"loss": "CrossEntropyLoss"},
                                  {"loss": {"type": "LovaszSoftmaxLoss"}, "weight": 0.5}]},
}
# Further variants worth running through the same checks.
VARIANTS = [("LovaszSoftmaxLoss", {"per_image": False, "classes": "all"}),
            ("RMILoss", {"pool_size": 1, "pool": "max"}),
            ("FocalLoss", {"gamma": 0.5})]
CASES = [pytest.param(name, args, id=name) for name, args in SPECS.items()] + [
    pytest.param(name, args, id=f"{name}-{i}") for i, (name, args) in enumerate(VARIANTS)]


def build(name, args):
    return LOSSES.build({"type": name, "args": copy.deepcopy(args)}, "loss", ignore_index=255,
                        num_classes=NUM_CLASSES, train_dataset=None, cache_dir=None)


def batch(dtype=torch.float32, seed=0):
    """Logits (2, 3, 6, 6) and a target with a void band, including an all-void image row."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, NUM_CLASSES, 6, 6, generator=generator, dtype=dtype)
    target = torch.randint(0, NUM_CLASSES, (2, 6, 6), generator=generator)
    target[0, :, :2] = 255
    target[1, 4:] = 255
    return logits, target


def test_every_registered_loss_is_checked_here():
    assert sorted(SPECS) == LOSSES.names()


@pytest.mark.parametrize("name, args", CASES)
def test_inputs_are_not_modified(name, args):
    logits, target = batch()
    logits.requires_grad_(True)
    logits_before, target_before = logits.detach().clone(), target.clone()
    build(name, args)(logits, target).backward()
    assert torch.equal(logits.detach(), logits_before)
    assert torch.equal(target, target_before)


@pytest.mark.parametrize("name, args", CASES)
def test_void_pixels_change_nothing(name, args):
    loss_fn = build(name, args)
    logits, target = batch()
    other = torch.where(target.unsqueeze(1) == 255, torch.randn_like(logits) * 10, logits)
    assert not torch.equal(other, logits)
    results = []
    for values in (logits, other):
        values = values.clone().requires_grad_(True)
        loss = loss_fn(values, target)
        loss.backward()
        results.append((loss.detach(), values.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=0)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
    void = (target == 255).unsqueeze(1).expand_as(logits)
    assert results[0][1][void].abs().max() == 0


@pytest.mark.parametrize("name, args", CASES)
def test_all_void_batch_has_zero_gradient(name, args):
    logits = batch()[0].requires_grad_(True)
    loss = build(name, args)(logits, torch.full((2, 6, 6), 255))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    if name != "RMILoss":  # RMI's log-determinant is a constant (log epsilon) there, not 0
        assert loss.item() == 0.0


@pytest.mark.parametrize("name, args", CASES)
def test_bf16_autocast_gives_a_finite_loss_close_to_float32(name, args):
    loss_fn = build(name, args)
    logits, target = batch()
    reference = loss_fn(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = logits.to(torch.bfloat16).requires_grad_(True)
        loss = loss_fn(half, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(half.grad).all()
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("name, args", CASES)
def test_gradcheck_in_double_precision(name, args):
    # Lovász and OHEM are piecewise smooth: random logits lie away from their kinks.
    loss_fn = build(name, args).double()
    logits, target = batch(torch.float64, seed=1)
    logits = logits[:, :, :4, :4].clone().requires_grad_(True)
    target = target[:, :4, :4].clone()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, target), (logits,), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_loss_validates_in_a_config(name, tiny_config):
    tiny_config["loss"] = {"type": name, "args": copy.deepcopy(SPECS[name])}
    resolved = validate_config(tiny_config)
    assert resolved["loss"]["type"] == name
    assert {k: resolved["loss"]["args"][k] for k in SPECS[name]} == SPECS[name]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_misspelled_argument_is_named_by_its_path(name, tiny_config):
    first = next(iter(SPECS[name]))
    args = copy.deepcopy(SPECS[name])
    args[first + "x"] = args.pop(first)
    tiny_config["loss"] = {"type": name, "args": args}
    with pytest.raises(ConfigError, match=rf"^loss\.args\.{first}x: unknown argument for loss '{name}'\. "
                                          rf"Did you mean '{first}'\?"):
        validate_config(tiny_config)


def test_misspelled_argument_of_a_nested_loss_is_named_by_its_path(tiny_config):
    tiny_config["aux_loss"] = {"type": "WeightedSumLoss", "args": {"terms": [
        {"loss": "CrossEntropyLoss", "weight": 1.0},
        {"loss": {"type": "FocalLoss", "args": {"gama": 2.0}}, "weight": 0.5}]}}
    with pytest.raises(ConfigError, match=r"^aux_loss\.args\.terms\[1\]\.loss\.args\.gama: unknown argument for "
                                          r"loss 'FocalLoss'\. Did you mean 'gamma'\?"):
        validate_config(tiny_config)


@pytest.mark.parametrize("terms, message", [
    ([], r"loss\.args\.terms: give at least one term"),
    ([{"loss": "CrossEntropyLoss", "wieght": 1.0}],
     r"loss\.args\.terms\[0\]\.wieght: unknown key\. Did you mean 'weight'\? Expected 'loss' and 'weight'"),
    ([{"weight": 1.0}], r"loss\.args\.terms\[0\]\.loss: missing required key"),
    ([{"loss": "CrossEntropyLoss", "weight": -1}], r"loss\.args\.terms\[0\]\.weight: expected a number >= 0"),
    ([{"loss": "CrossEntropyLoss", "weight": "1"}], r"loss\.args\.terms\[0\]\.weight: expected a number >= 0"),
    ([{"loss": "Focal"}], r"loss\.args\.terms\[0\]\.loss\.type: unknown loss 'Focal'\. Did you mean 'FocalLoss'\?"),
    ([{"loss": {"type": "WeightedCrossEntropyLoss", "args": {"num_classes": 3}}}],
     r"loss\.args\.terms\[0\]\.loss\.args\.num_classes: is set by the framework"),
    (["CrossEntropyLoss"], r"loss\.args\.terms: expected a list of an object"),
])
def test_bad_terms_of_a_weighted_sum_are_named_by_their_path(terms, message, tiny_config):
    tiny_config["loss"] = {"type": "WeightedSumLoss", "args": {"terms": terms}}
    with pytest.raises(ConfigError, match="^" + message):
        validate_config(tiny_config)


def test_weighted_sum_construction_errors_name_the_term():
    spec = {"type": "WeightedSumLoss", "args": {"terms": [
        {"loss": "CrossEntropyLoss"}, {"loss": {"type": "FocalLoss", "args": {"alpha": [1.0, 2.0]}}}]}}
    with pytest.raises(ConfigError, match=r"loss \(WeightedSumLoss\): terms\[1\]\.loss \(FocalLoss\): "
                                          r"got 2 alpha values for 3 classes"):
        LOSSES.build(spec, "loss", ignore_index=255, num_classes=3, train_dataset=None, cache_dir=None)


def test_injected_names_are_the_framework_ones():
    # WeightedSumLoss passes exactly these on to its terms.
    assert set(LOSS_INJECTED) <= set(LOSSES.parameters("WeightedSumLoss"))
