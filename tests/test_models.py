"""Every model of tests/model_cases.py through one set of shared tests, then model-specific checks.

A new architecture needs no new test here: an entry in ``tests/model_cases.py`` runs it through
``TestEveryModel``, and ``test_every_registered_model_has_a_case`` fails until it has one.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision

import models  # noqa: F401  (registers the models)
from models.convert import from_torchvision
from tests.model_cases import CASES, ModelCase
from utils.config import validate_config
from utils.errors import ConfigError
from utils.registry import MODELS

NUM_CLASSES = 5
SIZES = [(64, 64), (97, 131)]


def build(case: ModelCase, **args) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build({"type": case.model, "args": {**case.args, **args}}, "arch", num_classes=NUM_CLASSES)


@functools.cache
def shared(index: int) -> torch.nn.Module:
    """One model per case for the tests that only run it (building is most of their cost)."""
    return build(CASES[index])


def accepts(case: ModelCase, argument: str) -> bool:
    return argument in MODELS.parameters(case.model)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case.id for case in CASES])
class TestEveryModel:
    def test_output_shapes(self, index):
        model = shared(index).train()
        for size in SIZES:
            with torch.no_grad():
                out = model(torch.randn(2, 3, *size))
            assert out["out"].shape == (2, NUM_CLASSES, *size)
            assert set(out) == ({"out", "aux"} if getattr(model, "aux", None) is not None else {"out"})
            assert all(v.shape == (2, NUM_CLASSES, *size) for v in out.values())

    def test_backward_gives_finite_grads_to_every_trainable_parameter(self, index):
        model = shared(index).train()
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(2, 3, *SIZES[0]))
        sum(v.square().mean() for v in out.values()).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None, f"{name} gets no gradient"
            assert torch.isfinite(param.grad).all(), name

    def test_eval_has_no_aux_and_is_deterministic(self, index):
        model = shared(index).eval()
        x = torch.randn(1, 3, *SIZES[1])
        with torch.no_grad():
            first, second = model(x), model(x)
        assert set(first) == {"out"}
        assert torch.equal(first["out"], second["out"])

    def test_misspelled_argument_is_rejected_with_its_path(self, index, tiny_config):
        case = CASES[index]
        key = next(iter(case.args), None) or next(k for k in MODELS.parameters(case.model) if k != "num_classes")
        typo = key[0] + key[2:]
        config = copy.deepcopy(tiny_config)
        config["arch"] = {"type": case.model, "args": {**{k: v for k, v in case.args.items() if k != key},
                                                       typo: case.args.get(key)}}
        with pytest.raises(ConfigError, match=rf"arch.args.{typo}: unknown argument for model '{case.model}'. "
                                              rf"Did you mean '{key}'\?"):
            validate_config(config)
        if "backbone" in case.args:
            config["arch"] = {"type": case.model, "args": {**case.args, "backbone": "resnet81"}}
            with pytest.raises(ConfigError, match=r"arch.args.backbone: unknown backbone 'resnet81'. "
                                                  r"Did you mean 'resnet18'\?"):
                validate_config(config)

    def test_param_groups_split_backbone_from_decoder(self, index):
        model = shared(index)
        backbone = getattr(model, "backbone", None)
        backbone_ids = set() if backbone is None else {id(p) for p in backbone.parameters()}
        groups = model.param_groups(0.01, 0.1)
        seen = [id(p) for group in groups for p in group["params"]]
        assert len(seen) == len(set(seen))
        assert set(seen) == {id(p) for p in model.parameters()}
        for group in groups:
            for param in group["params"]:
                assert group["lr"] == pytest.approx(0.001 if id(param) in backbone_ids else 0.01)

    def test_freeze_bn_and_freeze_backbone(self, index):
        case = CASES[index]
        if accepts(case, "freeze_bn"):
            model = build(case, freeze_bn=True).train()
            assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        if not accepts(case, "freeze_backbone") or "backbone" not in case.args:
            return
        model = build(case, freeze_backbone=True).train()
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert not any(m.training for m in model.backbone.modules())
        decoder = [m for name, m in model.named_children() if name != "backbone"]
        assert all(m.training for m in decoder)
        groups = model.param_groups(0.01, 0.1)
        assert [g["name"] for g in groups] == ["decoder"]
        assert sum(p.numel() for g in groups for p in g["params"]) == sum(
            p.numel() for p in model.parameters() if p.requires_grad) > 0

    @pytest.mark.slow
    def test_overfits_one_batch(self, index):
        case = CASES[index]
        torch.manual_seed(0)  # the initial weights and dropout masks: the same whatever ran before
        model = build(case).train()
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 64, 64, generator=generator)
        rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        target = torch.stack([(rows // 16 + cols // 16 + i) % NUM_CLASSES for i in range(2)])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.lr)
        losses = []
        for _ in range(80):
            out = model(images)
            loss = sum(torch.nn.functional.cross_entropy(v, target) for v in out.values()) / len(out)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert min(losses[-5:]) < losses[0] / 5, losses


def test_every_registered_model_has_a_case():
    assert set(MODELS.names()) <= {case.model for case in CASES}


@pytest.mark.parametrize("name, make", [("DeepLabV3", torchvision.models.segmentation.deeplabv3_resnet50),
                                        ("FCN", torchvision.models.segmentation.fcn_resnet50)])
def test_torchvision_parity(name, make):
    """ResNet-50, output stride 8, aux head: torchvision's parameter count and, after
    :func:`from_torchvision`, its outputs."""
    torch.manual_seed(0)
    theirs = make(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True).eval()
    ours = MODELS.build({"type": name, "args": {"backbone": "resnet50", "output_stride": 8, "aux_head": True}},
                        "arch", num_classes=NUM_CLASSES).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.load_state_dict(from_torchvision(theirs.state_dict()))
    x = torch.randn(1, 3, 67, 83)
    with torch.no_grad():
        assert torch.allclose(ours(x)["out"], theirs(x)["out"], atol=1e-5)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 40)
    torch.manual_seed(2)
    expected = theirs(x)
    torch.manual_seed(2)
    got = ours(x)
    assert torch.allclose(got["aux"], expected["aux"], atol=1e-5)


def test_from_torchvision_rejects_other_checkpoints():
    with pytest.raises(KeyError, match="'fc.weight' is not a key of a torchvision segmentation model"):
        from_torchvision({"fc.weight": torch.zeros(1)})


def test_deeplabv3plus_is_depthwise_separable_as_the_paper():
    """The head costs a fraction of full 3x3 convolutions: its 3x3 convs are all depthwise."""
    model = MODELS.build({"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}, "arch", num_classes=3)
    head = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
            and not name.startswith("backbone") and m.kernel_size == (3, 3)]
    assert len(head) == 5  # three ASPP rates, two decoder convs
    assert all(m.groups == m.in_channels == m.out_channels for m in head)


def test_aux_head_sits_on_the_stride_16_stage():
    model = MODELS.build({"type": "PSPNet", "args": {"backbone": "resnet18", "output_stride": 16}}, "arch",
                         num_classes=3)
    assert model.backbone.strides[-2] == 16 and model.aux[0].in_channels == model.backbone.out_channels[-2] == 256


def test_unet_shape_arguments_belong_to_its_own_encoder():
    with pytest.raises(ConfigError, match="base_channels and depth shape the paper's encoder"):
        MODELS.build({"type": "UNet", "args": {"backbone": "resnet18", "depth": 3}}, "arch", num_classes=3)
    with pytest.raises(ConfigError, match="need a backbone"):
        MODELS.build({"type": "UNet", "args": {"pretrained": True}}, "arch", num_classes=3)


def test_unet_accepts_inputs_smaller_than_its_pooling():
    model = MODELS.build({"type": "UNet", "args": {"base_channels": 4, "depth": 4}}, "arch", num_classes=3)
    assert model(torch.zeros(2, 3, 7, 9))["out"].shape == (2, 3, 7, 9)  # 16x16 needed: padded, then cropped


def test_duc_hdc_rates_and_backbone():
    model = MODELS.build({"type": "DUCHDC", "args": {"backbone": "resnet50"}}, "arch", num_classes=3)
    assert [b.conv2.dilation[0] for b in model.backbone.layer3] == [1, 2, 5, 9, 1, 2]
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [5, 9, 17]
    with pytest.raises(ConfigError, match="backbone must be a ResNet or ResNeXt"):
        MODELS.build({"type": "DUCHDC", "args": {"backbone": "mobilenet_v2"}}, "arch", num_classes=3)


def test_bilinear_upsample_starts_as_bilinear_interpolation():
    from models.blocks import BilinearUpsample

    x = torch.randn(1, 2, 5, 7)
    up = BilinearUpsample(2, 2)(x)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (1, 2, 10, 14)
    assert torch.allclose(up[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-6)  # borders see zero padding
