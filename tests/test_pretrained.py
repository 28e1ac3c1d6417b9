"""Pretrained weights files: the forms every encoder accepts, the files it refuses, and FCN-8s's fc6/fc7.

Every file here is written in ``tmp_path`` from a freshly built network (random weights): nothing
is downloaded.
"""
from __future__ import annotations

import logging
import os
import re

import pytest
import torch
import torchvision

import models  # noqa: F401  (registers the encoders and models)
from models.backbones import IMAGENET_MEAN_STD, build_encoder
from utils.errors import CheckpointError
from utils.registry import MODELS


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


# The files users have: how each holds a network's state dict, and what the log says was unwrapped.
FORMS = {
    "plain": (lambda s: s, None),
    "module": (lambda s: prefixed(s, "module."), "'module.'"),
    "backbone": (lambda s: prefixed(s, "backbone."), "'backbone.'"),
    "encoder": (lambda s: prefixed(s, "encoder."), "'encoder.'"),
    "state_dict": (lambda s: {"state_dict": s, "epoch": 3}, "'state_dict'"),
    "model-module": (lambda s: {"model": prefixed(s, "module.")}, "'module.'"),
    # A segmentation checkpoint: the encoder under "backbone.", a decoder beside it.
    "segmentation": (lambda s: {"state_dict": {**prefixed(s, "backbone."),
                                               "decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)}},
                     "'backbone.'"),
}


def torchvision_resnet18() -> dict:
    return torchvision.models.resnet18(weights=None).state_dict()


def timm_resnet18() -> dict:
    import timm

    return timm.create_model("resnet18").state_dict()


def timm_hrnet_w18() -> dict:
    import timm

    return timm.create_model("hrnet_w18").state_dict()


# (backbone, the state dict of a full network, the encoder's module holding those names)
NETWORKS = {
    "resnet18": (torchvision_resnet18, lambda encoder: encoder),
    "timm:resnet18": (timm_resnet18, lambda encoder: encoder.net),
    "hrnet_w18": (timm_hrnet_w18, lambda encoder: encoder.net),
}
CASES = [(name, form) for name in ("resnet18", "timm:resnet18") for form in FORMS]
# HRNet is the biggest of the three: one wrapped and prefixed form, and the segmentation checkpoint.
CASES += [("hrnet_w18", "model-module"), ("hrnet_w18", "segmentation")]


@pytest.fixture(scope="module")
def references():
    torch.manual_seed(0)
    return {name: make() for name, (make, _) in NETWORKS.items()}


def own_tensors(encoder: torch.nn.Module) -> int:
    return sum(not key.endswith("num_batches_tracked") for key in encoder.state_dict())


@pytest.mark.parametrize("name, form", CASES)
def test_wrapped_and_prefixed_files_load(tmp_path, caplog, references, name, form):
    reference = references[name]
    wrap, said = FORMS[form]
    path = tmp_path / "weights.pth"
    torch.save(wrap(reference), path)
    with caplog.at_level(logging.INFO, logger="models"):
        encoder = build_encoder(name, pretrained=True, weights_path=str(path))
    loaded = NETWORKS[name][1](encoder).state_dict()
    assert loaded and set(loaded) <= set(reference)
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())
    assert encoder.pretrained_normalization == IMAGENET_MEAN_STD
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("models")]
    if said is None:
        assert not any("stripped" in n or "unwrapped" in n for n in notes)
    else:
        assert any(said in n and str(path) in n for n in notes), notes
        assert list(encoder.weights_notes) == [n for n in notes if str(path) in n]


MISMATCHES = {
    # Keys under a prefix nobody strips: nothing matches.
    "prefix": lambda s: prefixed(s, "net."),
    # One tensor of the encoder left out.
    "missing": lambda s: {k: v for k, v in s.items() if k != max(k for k in s if k.endswith("bn1.weight"))},
}


@pytest.mark.parametrize("name, mismatch", [("resnet18", "prefix"), ("resnet18", "missing"),
                                            ("timm:resnet18", "prefix"), ("timm:resnet18", "missing"),
                                            ("hrnet_w18", "prefix")])
def test_files_that_do_not_fit_are_refused_with_the_count(tmp_path, references, name, mismatch):
    reference = references[name]
    path = tmp_path / "weights.pth"
    torch.save(MISMATCHES[mismatch](reference), path)
    total = own_tensors(NETWORKS[name][1](build_encoder(name)))
    matched = 0 if mismatch == "prefix" else total - 1
    what = f"timm model '{name.removeprefix('timm:')}'" if name.startswith(("timm:", "hrnet")) \
        else f"torchvision's {name}"
    with pytest.raises(CheckpointError) as info:
        build_encoder(name, pretrained=True, weights_path=str(path))
    message = str(info.value)
    assert "\n" not in message
    assert re.search(rf"{re.escape(str(path))}: {matched} of {total} tensors of {re.escape(what)} match by name "
                     "and shape", message), message


def test_a_file_of_a_bigger_network_is_refused(tmp_path):
    """resnet34's file holds every tensor of resnet18, shapes included: its blocks more give it away."""
    import timm

    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"resnet34.pth: all 100 tensors of timm model 'resnet18' match by name "
                                              r"and shape, but the file has 80 more inside its modules "
                                              r"\(layer1.2.conv1.weight, .*another network"):
        build_encoder("timm:resnet18", pretrained=True, weights_path=str(path))


def test_a_wrong_shape_is_named(tmp_path, references):
    state = dict(references["timm:resnet18"])
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        build_encoder("timm:resnet18", pretrained=True, weights_path=str(path))


def test_a_file_of_python_objects_is_refused_in_one_line(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": torchvision_resnet18(), "args": logging.getLogger("x")}, path)
    for name in ("resnet18", "timm:resnet18"):
        with pytest.raises(CheckpointError, match=f"cannot read weights file {re.escape(str(path))}") as info:
            build_encoder(name, pretrained=True, weights_path=str(path))
        assert "\n" not in str(info.value)


# FCN-8s: fc6 and fc7 are VGG16's first two fully connected layers, as convolutions.

VGG_FILE = os.path.basename(torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """torchvision's VGG16-BN state dict (random weights), at its torch hub cache path."""
    torch.manual_seed(0)
    state = torchvision.models.vgg16_bn().state_dict()
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / VGG_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state, home, path


@pytest.mark.parametrize("source", ["weights_path", "cache"])
def test_fcn8s_starts_fc6_and_fc7_from_vggs_classifier(monkeypatch, vgg_weights, source):
    state, home, path = vgg_weights
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    args = {"pretrained": True, **({"weights_path": str(path)} if source == "weights_path" else {})}
    model = MODELS.build({"type": "FCN8s", "args": args}, "arch", num_classes=3)
    fc6, fc7 = model.head[0], model.head[3]
    assert torch.equal(fc6.weight, state["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(fc6.bias, state["classifier.0.bias"])
    assert torch.equal(fc7.weight, state["classifier.3.weight"].view(4096, 4096, 1, 1))
    assert torch.equal(fc7.bias, state["classifier.3.bias"])
    assert torch.equal(model.backbone.features[0].weight, state["features.0.weight"])
    # The encoder hands them over: nothing of the classifier stays behind on it.
    assert not any(isinstance(v, torch.Tensor) and v.numel() >= 4096 * 4096 for v in vars(model.backbone).values())
    assert any("fc6" in note and "fc7" in note for note in model.backbone.weights_notes)


def test_fcn8s_with_another_width_or_without_weights_starts_fc6_at_random(vgg_weights):
    state, _, path = vgg_weights
    narrow = MODELS.build({"type": "FCN8s", "args": {"pretrained": True, "weights_path": str(path),
                                                     "fc_channels": 64}}, "arch", num_classes=3)
    assert narrow.head[0].weight.shape == (64, 512, 7, 7)
    assert torch.equal(narrow.backbone.features[0].weight, state["features.0.weight"])
    with torch.device("meta"):  # no weights: nothing to read (and no memory for 134M parameters)
        MODELS.build({"type": "FCN8s", "args": {}}, "arch", num_classes=3)
