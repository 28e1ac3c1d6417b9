"""The normalisation switch (models.norm): each norm over every model, pretrained statistics,
the config keys, synchronised batch norm and the dry forward pass that catches one-value batches."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torchvision
from timm.layers import BatchNormAct2d, EvoNorm2dS0
from torch import nn

import models  # noqa: F401  (registers the models and norms)
import builder
import train
from models.blocks import PPM, SeparableASPP
from models.norm import _groups, check_training_batches, convert_norm
from tests.model_cases import CASES, TIMM
from builder import build_model
from utils.config import load_config, norm_spec, read_config, validate_config
from utils.errors import ConfigError
from utils.registry import MODELS, NORMS

REPLACING = ["GroupNorm", "InstanceNorm", "EvoNormS0"]
#: One case per model, and the timm encoder (its BatchNormAct2d layers) under DeepLabV3+.
ONE_PER_MODEL = list({case.model: case for case in reversed(CASES)}.values()) + \
    [c for c in CASES if c.model == "DeepLabV3Plus" and c.args.get("backbone") == TIMM]


def norm(spec) -> object:
    return NORMS.build(spec, "norm")


def batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("name", REPLACING)
@pytest.mark.parametrize("case", ONE_PER_MODEL, ids=lambda c: c.id)
def test_every_model_trains_with_every_norm(case, name):
    torch.manual_seed(0)
    model = MODELS.build({"type": case.model, "args": case.args}, "arch", num_classes=3)
    before = len(batch_norms(model))
    summary = convert_norm(model, norm(name))
    assert before > 0 and batch_norms(model) == []
    assert f"in place of {before} batch-norm layers" in summary
    expected = {"GroupNorm": nn.GroupNorm, "InstanceNorm": (nn.InstanceNorm2d, nn.GroupNorm),
                "EvoNormS0": EvoNorm2dS0}[name]
    new = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, EvoNorm2dS0))]
    assert len(new) == before and all(isinstance(m, expected) for m in new)
    model.train()
    # 96: MS-OCR's half scale then still gives HRNet's stride-32 branch more than one value per channel.
    out = model(torch.randn(2, 3, 96, 96))
    assert out["out"].shape == (2, 3, 96, 96) and torch.isfinite(out["out"]).all()
    sum(v.float().mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in new for p in m.parameters())


def test_batch_norm_keeps_the_pretrained_statistics_and_other_norms_the_scales(monkeypatch, tmp_path):
    """The ImageNet weights are loaded before the switch: BatchNorm keeps them whole, GroupNorm their
    affine weights (the running statistics have no counterpart)."""
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for bn in batch_norms(reference):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(1, 2)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    config = validate_config({"arch": {"type": "FCN", "args": {"backbone": "resnet18", "pretrained": True,
                                                                "weights_path": str(path)}},
                              "train_loader": {"type": "SyntheticShapes", "args": {}},
                              "optimizer": {"type": "SGD", "args": {"lr": 0.01}}})
    kept = build_model(config).backbone
    assert torch.equal(kept.layer1[0].bn1.running_mean, reference.layer1[0].bn1.running_mean)
    assert torch.equal(kept.layer1[0].bn1.running_var, reference.layer1[0].bn1.running_var)
    assert torch.equal(kept.layer1[0].bn1.weight, reference.layer1[0].bn1.weight)
    grouped = build_model({**config, "norm": norm_spec({**config, "norm": "GroupNorm"})}).backbone
    layer = grouped.layer1[0].bn1
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 32
    assert torch.equal(layer.weight, reference.layer1[0].bn1.weight)
    assert torch.equal(layer.bias, reference.layer1[0].bn1.bias)
    assert torch.equal(grouped.conv1.weight, reference.conv1.weight)


def test_batch_norm_momentum_is_set_and_the_layers_stay():
    model = MODELS.build({"type": "UNet", "args": {"base_channels": 4, "depth": 2}}, "arch", num_classes=3)
    layers = batch_norms(model)
    assert convert_norm(model, norm({"type": "BatchNorm", "args": {"momentum": 0.01}})) == \
        f"BatchNorm(momentum=0.01): {len(layers)} batch-norm layers"
    assert batch_norms(model) == layers and all(bn.momentum == 0.01 for bn in layers)


def test_groups_divide_the_channels_with_two_channels_per_group_at_least():
    assert [_groups(c, 32) for c in (256, 64, 48, 96, 24, 16, 13, 3, 1)] == [32, 32, 24, 32, 12, 8, 1, 1, 1]
    assert _groups(40, 8) == 8 and _groups(40, 6) == 5
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48), nn.Conv2d(48, 64, 1), nn.BatchNorm2d(64))
    summary = convert_norm(model, norm("GroupNorm"))
    assert [model[1].num_groups, model[3].num_groups] == [24, 32]
    assert summary.endswith("fewer groups where the channels ask for it: 48 channels: 24 groups")


def test_the_new_layer_takes_over_the_scale_shift_and_eps():
    bn = nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.arange(8.0)), bn.bias.fill_(0.5)
    for name in REPLACING:
        model = nn.Sequential(copy.deepcopy(bn))
        convert_norm(model, norm(name))
        assert torch.equal(model[0].weight, bn.weight) and torch.equal(model[0].bias, bn.bias)
        assert model[0].eps == 1e-3


def test_evonorm_s0_computes_the_papers_formula():
    """y = x * sigmoid(v x) / sqrt(var over the group of channels and the map + eps) * gamma + beta
    (gated: an activation follows the batch norm)."""
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    convert_norm(model, norm({"type": "EvoNormS0", "args": {"groups": 2}}))
    layer = model[0]
    with torch.no_grad():
        layer.v.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[0.0, -2.0]], [[2.0, 0.0]]]])  # (1, 4, 1, 2)
    var_a = sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 4  # channels 0-1: mean 2.5
    var_b = sum((v - 0.0) ** 2 for v in (0, -2, 2, 0)) / 4  # channels 2-3: mean 0
    expected = torch.empty_like(x)
    for c, (v, g, b) in enumerate(zip([1.0, 2.0, 0.5, -1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, -1.0, 0.5])):
        std = math.sqrt((var_a if c < 2 else var_b) + 1e-5)
        for w in range(2):
            value = x[0, c, 0, w].item()
            expected[0, c, 0, w] = value / (1 + math.exp(-v * value)) / std * g + b
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_instance_norm_normalises_global_pooling_branches_over_channels():
    """On a 1x1 map an instance's statistics are its own value (the output would be constant)."""
    for module, pooled in [(SeparableASPP(16, 8), lambda m: m.image_pool[1][1]),
                           (PPM(16, 8, bins=(1, 2)), lambda m: m.branches[0][1][1]),
                           (torchvision.models.segmentation.deeplabv3.ASPP(16, [2, 3], 8),
                            lambda m: m.convs[3][2])]:
        summary = convert_norm(module, norm("InstanceNorm"))
        layer = pooled(module)
        assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1, type(module).__name__
        assert "1 in global-pooling branches (1x1 maps) normalise over the channels" in summary
        assert sum(isinstance(m, nn.InstanceNorm2d) for m in module.modules()) > 0
        module.train()
        assert torch.isfinite(module(torch.randn(2, 16, 9, 9))).all()
    ppm = PPM(16, 8, bins=(1, 2))
    convert_norm(ppm, norm("InstanceNorm"))
    assert isinstance(ppm.branches[1][1][1], nn.InstanceNorm2d)  # the 2x2 bin stays an instance norm


def test_timm_batch_norm_with_activation_keeps_its_activation():
    layer = BatchNormAct2d(8, act_layer=nn.ReLU)
    model = nn.Sequential(layer)
    convert_norm(model, norm("GroupNorm"))
    assert isinstance(model[0], nn.Sequential) and isinstance(model[0][0], nn.GroupNorm)
    assert model[0][2] is layer.act
    assert (model(torch.randn(2, 8, 4, 4)) >= 0).all()
    synced = builder.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(8, act_layer=nn.ReLU)))
    assert type(synced[0]).__name__ == "SyncBatchNormAct" and isinstance(synced[0].act, nn.ReLU)


@pytest.mark.parametrize("name", ["BatchNorm", *REPLACING])
def test_bf16_autocast_gives_finite_outputs(name):
    model = MODELS.build({"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}, "arch", num_classes=3)
    convert_norm(model, norm(name))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 48, 48))["out"]
    assert torch.isfinite(out.float()).all()


# --- config -------------------------------------------------------------------------------------

def config_with(tiny_config, **top) -> dict:
    return {**tiny_config, **top}


def test_norm_in_the_model_args_or_at_the_top(tiny_config):
    top = validate_config(config_with(tiny_config, norm="GroupNorm"))
    assert top["norm"] == {"type": "GroupNorm", "args": {"num_groups": 32}}
    assert norm_spec(top) == top["norm"]
    tiny_config["arch"]["args"]["norm"] = {"type": "EvoNormS0", "args": {"groups": 8}}
    inside = validate_config(tiny_config)
    assert inside["arch"]["args"]["norm"] == {"type": "EvoNormS0", "args": {"groups": 8}}
    assert norm_spec(inside)["type"] == "EvoNormS0"
    layers = [m for m in build_model(inside).modules() if isinstance(m, EvoNorm2dS0)]
    assert layers and {(m.weight.numel(), m.groups) for m in layers} == {(4, 2), (8, 4), (16, 8)}
    default = validate_config(config_with(copy.deepcopy(tiny_config), arch={"type": "UNet", "args": {}}))
    assert default["norm"] is None and norm_spec(default) == {"type": "BatchNorm", "args": {"momentum": None}}


@pytest.mark.parametrize("change, message", [
    ({"norm": "EvoNorm"}, "norm.type: unknown norm layer 'EvoNorm'. Did you mean 'EvoNormS0'?"),
    ({"norm": {"type": "GroupNorm", "args": {"groups": 8}}},
     "norm.args.groups: unknown argument for norm layer 'GroupNorm'. Did you mean 'num_groups'?"),
    ({"norm": {"type": "GroupNorm", "args": {"num_groups": "8"}}}, "norm.args.num_groups: expected an integer"),
    ({"norm": {"type": "GroupNorm", "args": {"num_groups": 0}}}, "norm (GroupNorm): num_groups must be >= 1"),
    ({"norm": 3}, "norm: expected a string or an object or null, got 3"),
    ({"arch.args.norm": "Batchnorm"}, "arch.args.norm.type: unknown norm layer 'Batchnorm'. "
                                      "Did you mean 'BatchNorm'?"),
    ({"arch.args.norm": "GroupNorm", "norm": "InstanceNorm"},
     "norm: is also set in arch.args.norm (GroupNorm); set the normalisation in one place"),
    ({"arch.args.freeze_bn": True, "norm": "GroupNorm"},
     "arch.args.freeze_bn: freezes batch-norm statistics, but the norm is GroupNorm"),
])
def test_bad_norm_settings_name_the_key(tiny_config, change, message):
    tiny_config["arch"] = {"type": "DeepLabV3", "args": {"backbone": "resnet18"}}
    for key, value in change.items():
        if key.startswith("arch.args."):
            tiny_config["arch"]["args"][key.split(".")[-1]] = value
        else:
            tiny_config[key] = value
    with pytest.raises(ConfigError) as caught:
        validate_config(tiny_config)
    assert message in str(caught.value)


def test_a_model_trained_with_a_norm_is_rebuilt_from_its_config(tiny_config):
    """Checkpoints save the resolved config: inference and resume rebuild the same layers."""
    config = validate_config(config_with(tiny_config, norm="InstanceNorm"))
    trained = build_model(config)
    again = build_model(json.loads(json.dumps(config)), pretrained=False)
    again.load_state_dict(trained.state_dict())  # strict: the same layers and names
    assert not any("running_mean" in k for k in again.state_dict())


# --- synchronised batch norm --------------------------------------------------------------------

def test_sync_batch_norm_stays_batch_norm_in_a_single_process(tiny_config):
    for top in ({"norm": "SyncBatchNorm"}, {"use_synch_bn": True}):
        config = validate_config(config_with(copy.deepcopy(tiny_config), **top))
        assert builder.synchronized_batch_norm(config)
        model = build_model(config)
        assert builder.wrap_distributed(model, torch.device("cpu"), True) is model
        assert batch_norms(model) and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not builder.synchronized_batch_norm(validate_config(tiny_config))


# --- the dry forward pass -----------------------------------------------------------------------

def deeplab(norm_name: str = "BatchNorm") -> nn.Module:
    model = MODELS.build({"type": "DeepLabV3", "args": {"backbone": "resnet18"}}, "arch", num_classes=3)
    convert_norm(model, norm(norm_name))
    return model


def test_dry_forward_finds_the_one_value_batch_norm_of_the_pooling_branch():
    model = deeplab().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as caught:
        check_training_batches(model, (3, 64, 64), 1, "batch_size 1")
    assert str(caught.value) == (
        "train_loader.args.batch_size: batch_size 1 makes DeepLabV3's layer head.0.convs.4.2 "
        "(BatchNorm2d) normalise a single value per channel in training (its input is 1x1 for 64x64 "
        "training images), which batch norm cannot do. Use batches of 2 or more images, or a norm "
        "without batch statistics (norm: GroupNorm)")
    # Nothing was computed or changed: same weights and statistics, still in eval mode.
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    check_training_batches(model, (3, 64, 64), 2, "batch_size 2")
    check_training_batches(model, (3, 64, 64), 1, "batch_size 1", processes=2)  # synchronised: 2 values
    check_training_batches(deeplab("GroupNorm"), (3, 64, 64), 1, "batch_size 1")


def test_dry_forward_finds_instance_norm_on_a_1x1_map():
    model = MODELS.build({"type": "FCN", "args": {"backbone": "resnet18", "output_stride": 32}}, "arch",
                         num_classes=3)
    convert_norm(model, norm("InstanceNorm"))
    with pytest.raises(ConfigError, match=r"norm: with InstanceNorm, FCN's layer backbone.layer4.0.bn1 "
                                          r"\(InstanceNorm2d\) would normalise a single value per channel "
                                          r"\(its input is 1x1 for 32x32 training images\)"):
        check_training_batches(model, (3, 32, 32), 4, "batch_size 4")
    check_training_batches(model, (3, 64, 64), 4, "batch_size 4")


def test_a_one_image_batch_stops_train_before_the_run_folder(tiny_config, tmp_path, capsys):
    tiny_config["arch"] = {"type": "DeepLabV3", "args": {"backbone": "resnet18", "output_stride": 16}}
    tiny_config["train_loader"]["args"].update(batch_size=1)
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config))
    assert train.main(["-c", str(path), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "error: train_loader.args.batch_size: batch_size 1 makes DeepLabV3's layer head.0.convs.4.2" \
        in error
    assert not (tmp_path / "saved").exists()
    # The last batch of an epoch is one image: 25 images, batch_size 6, drop_last false.
    tiny_config["train_loader"]["args"].update(batch_size=6, num_samples=25, drop_last=False)
    path.write_text(json.dumps(tiny_config))
    assert train.main(["-c", str(path), "--device", "cpu"]) == 2
    assert ("the last batch of each epoch (1 of 25 images at batch_size 6, with drop_last false; set "
            "drop_last to true) makes DeepLabV3's layer") in capsys.readouterr().err
    assert not (tmp_path / "saved").exists()


def test_a_run_logs_its_norm_and_trains(tiny_config, tmp_path, capsys):
    tiny_config.update(norm={"type": "GroupNorm", "args": {"num_groups": 2}})
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config))
    assert train.main(["-c", str(path), "--device", "cpu"]) == 0
    assert "Normalisation layers: GroupNorm(num_groups=2) in place of" in capsys.readouterr().out
    saved = next((tmp_path / "saved").rglob("config.json"))
    assert json.loads(saved.read_text())["norm"] == {"type": "GroupNorm", "args": {"num_groups": 2}}


# --- the MiniCity comparison configs ------------------------------------------------------------

MINICITY = sorted((train.Path(__file__).resolve().parents[1] / "configs").glob("minicity_deeplabv3_*.json"))


def flatten(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def test_minicity_comparisons_change_one_key_of_the_baseline():
    names = {p.stem.removeprefix("minicity_deeplabv3_"): p for p in MINICITY}
    assert set(names) == {"baseline", "weighted_ce", "focal", "instancenorm", "groupnorm", "evonorm"}
    base = flatten(read_config(names.pop("baseline")))  # bases merged (configs/_base_/)
    assert base["loss"] == "CrossEntropyLoss" and base["norm"] == "BatchNorm"
    expected = {"weighted_ce": ("loss.type", "WeightedCrossEntropyLoss"), "focal": ("loss.type", "FocalLoss"),
                "instancenorm": ("norm", "InstanceNorm"), "groupnorm": ("norm", "GroupNorm"),
                "evonorm": ("norm", "EvoNormS0")}
    for name, path in names.items():
        variant = flatten(read_config(path))
        changed = {k for k in base.keys() | variant.keys() if base.get(k) != variant.get(k)} - {"name"}
        root = {k.split(".")[0] for k in changed}
        assert root == {expected[name][0].split(".")[0]}, (name, changed)
        assert variant[expected[name][0]] == expected[name][1]
        load_config(path)


@pytest.mark.slow  # six ResNet-50 DeepLabV3 training steps and validations
def test_each_minicity_comparison_trains_on_a_minicity_tree(tmp_path):
    import cv2
    import numpy as np

    from tests.test_datasets import CITY_LABEL_IDS
    root = tmp_path / "minicity"
    rng = np.random.default_rng(0)
    for split, stems in (("train", ["aachen_000000_000019", "aachen_000001_000019"]),
                         ("val", ["zurich_000001_000019"])):
        for stem in stems:
            for folder, name, data in (("leftImg8bit", f"{stem}_leftImg8bit.png",
                                        rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)),
                                       ("gtFine", f"{stem}_gtFine_labelIds.png", np.tile(CITY_LABEL_IDS, (32, 32)))):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(root / folder / split / name), data)
    for path in MINICITY:
        run = tmp_path / path.stem
        overrides = [f"train_loader.args.data_dir={root}", f"val_loader.args.data_dir={root}",
                     "train_loader.args.batch_size=2", "train_loader.args.num_workers=0",
                     "val_loader.args.num_workers=0", "train_loader.args.transforms[0].args.size=[64,128]",
                     "trainer.epochs=1", "trainer.val_per_epochs=1", "trainer.tensorboard=false",
                     "trainer.progress_bar=false", f"cache_dir={tmp_path / 'cache'}"]
        argv = ["-c", str(path), "--run-dir", str(run), "--device", "cpu"]
        assert train.main(argv + [a for o in overrides for a in ("--set", o)]) == 0, path.name
        history = torch.load(run / "checkpoint.pth", weights_only=True)["history"]
        assert len(history) == 1 and math.isfinite(history[0]["train_loss"]), path.name


# --- freeze_backbone and the replaced layers (issue 16) ---------------------------------------------

@pytest.mark.parametrize("name", REPLACING)
def test_freeze_backbone_keeps_the_replaced_norms_of_the_encoder_fixed(name, tiny_config, tmp_path, monkeypatch):
    """The norm is swapped after the model froze its encoder: the new layers keep the trainability and
    the mode of the batch norm they replace, so two epochs change no tensor of the encoder."""
    tiny_config["arch"] = {"type": "UNet", "args": {"backbone": "resnet18", "pretrained": False,
                                                    "decoder_channels": [16, 16, 8, 8, 8], "freeze_backbone": True}}
    tiny_config["norm"] = name
    # 64x64: the stride-32 map is 2x2 (instance norm cannot normalise a 1x1 map).
    tiny_config["train_loader"]["args"].update(num_samples=12, image_size=64)
    tiny_config["train_loader"]["args"]["transforms"][1]["args"]["size"] = 64
    tiny_config["val_loader"]["args"].update(num_samples=4, image_size=64)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config))
    initial = {}
    build = train.build_trainer

    def keep(*args, **kwargs):  # the weights before training
        trainer = build(*args, **kwargs)
        initial.update({k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()})
        return trainer

    monkeypatch.setattr(train, "build_trainer", keep)
    assert train.main(["-c", str(path), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    trained = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"]
    encoder = [k for k in initial if k.startswith("backbone.")]
    new_layers = [k for k in encoder if k.endswith("bn1.weight")]
    assert encoder and new_layers and set(trained) == set(initial)
    assert [k for k in encoder if not torch.equal(trained[k], initial[k])] == []
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if not k.startswith("backbone."))


def test_the_replaced_layer_keeps_requires_grad_and_the_mode_of_the_batch_norm():
    for name in REPLACING:
        frozen, trained, half = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        frozen.requires_grad_(False), frozen.eval()
        half.bias.requires_grad_(False)
        model = nn.Sequential(frozen, nn.ReLU(), trained, nn.ReLU(), half, nn.ReLU())
        convert_norm(model, norm(name))
        assert not any(p.requires_grad for p in model[0].parameters()) and not model[0].training, name
        assert all(p.requires_grad for p in model[2].parameters()) and model[2].training, name
        assert model[4].weight.requires_grad and not model[4].bias.requires_grad, name
    model = MODELS.build({"type": "DeepLabV3", "args": {"backbone": "resnet18", "freeze_backbone": True}}, "arch",
                         num_classes=3)
    convert_norm(model, norm("EvoNormS0"))
    model.train()
    layers = [m for m in model.backbone.modules() if isinstance(m, EvoNorm2dS0)]
    assert len(layers) == 20 and not any(m.training for m in layers)
    assert not any(p.requires_grad for m in layers for p in m.parameters())  # v too
    assert all(p.requires_grad for m in model.head.modules() if isinstance(m, EvoNorm2dS0) for p in m.parameters())


# --- EvoNorm-S0's gate where no activation follows (issue 16) ----------------------------------------

def test_evonorm_s0_gates_only_the_norms_an_activation_follows():
    """ResNet-50: the norms that feed the residual add (bn3, downsample.1) are plain affine layers."""
    model = MODELS.build({"type": "DeepLabV3", "args": {"backbone": "resnet50", "pretrained": False}}, "arch",
                         num_classes=3)
    convert_norm(model, norm("EvoNormS0"))
    layers = {name: m for name, m in model.backbone.named_modules() if isinstance(m, EvoNorm2dS0)}
    blocks = [m for m in model.backbone.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16 and len(layers) == 16 * 3 + 4 + 1
    by_role = {}
    for name, layer in layers.items():
        role = "downsample.1" if name.endswith("downsample.1") else name.split(".")[-1]
        by_role.setdefault(role, []).append(layer.apply_act)
    assert {role: (len(gates), sum(gates)) for role, gates in by_role.items()} == {
        "bn1": (17, 17), "bn2": (16, 16), "bn3": (16, 0), "downsample.1": (4, 0)}  # bn1: the stem's too
    assert all(layer.v is None for layer in layers.values() if not layer.apply_act)
    # The head: every norm of DeepLabV3's head and aux head is followed by a ReLU.
    assert all(m.apply_act for m in model.modules() if isinstance(m, EvoNorm2dS0) and m not in layers.values())


def test_evonorm_s0_gate_follows_the_module_structure():
    """Activation next in its Sequential (or after the Sequential it ends), timm's BatchNormAct2d with an
    activation: gated; a Sequential's last norm with nothing after it, BatchNormAct2d without one: not."""
    inner = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    model = nn.Sequential(inner, nn.PReLU(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Upsample(scale_factor=2),
                          BatchNormAct2d(8, act_layer=nn.SiLU), BatchNormAct2d(8, apply_act=False),
                          nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    convert_norm(model, norm("EvoNormS0"))
    assert [inner[1].apply_act, model[3].apply_act, model[5][0].apply_act, model[6][0].apply_act,
            model[7][1].apply_act] == [True, False, True, False, False]
    basic = torchvision.models.resnet18(weights=None)
    convert_norm(basic, norm("EvoNormS0"))
    assert [basic.layer2[0].bn1.apply_act, basic.layer2[0].bn2.apply_act,
            basic.layer2[0].downsample[1].apply_act] == [True, False, False]
