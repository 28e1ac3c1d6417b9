"""ONNX and TorchScript export (tools.export): the written files run and match PyTorch."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch

import inference
from utils.images import read_image
from models.blocks import max_unpool2x, pad_to_multiple
from tests.conftest import CAMVID_DIR, TINY_CONFIG
from tools import export
from builder import build_model, dataset_meta
from utils.checkpoint import save_atomic
from utils.config import load_config
from utils.registry import DATASETS
from predictor import Normalized


def camvid_image() -> Path | None:
    images = sorted((CAMVID_DIR / "val").glob("*.png")) if CAMVID_DIR.is_dir() else []
    return images[0] if images else None


def make_checkpoint(tmp_path: Path, arch: dict, train_loader: dict | None = None) -> tuple[str, str]:
    """A config and a checkpoint of a seeded, untrained ``arch`` (what export and inference need from a run)."""
    config = copy.deepcopy(TINY_CONFIG)
    config["arch"] = arch
    if train_loader is not None:
        config["train_loader"], config["val_loader"] = train_loader, None
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    resolved = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(resolved)
    classifier = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        classifier.weight.mul_(50)  # confident logits: predictions that differ from pixel to pixel and by mode
    state = {"model": model.state_dict(), "config": resolved, "meta": dataset_meta(resolved),
             "arch": arch["type"], "num_classes": len(resolved_classes(resolved))}
    save_atomic(state, tmp_path / "model.pth")
    return str(config_path), str(tmp_path / "model.pth")


def resolved_classes(config: dict) -> tuple[str, ...]:
    return dataset_meta(config)["class_names"]


def export_args(config: str, checkpoint: str, out: Path, *extra: str) -> list[str]:
    image = camvid_image()
    return ["-c", config, "-m", checkpoint, "-o", str(out), *(["--image", str(image)] if image else []), *extra]


UNET = {"type": "UNet", "args": {"base_channels": 4, "depth": 2}}


def test_unet_to_onnx_with_uint8_input_runs_in_onnxruntime_and_inference(tmp_path, capsys):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "unet.onnx"
    assert export.main(export_args(config, checkpoint, out, "--format", "onnx", "--size", "64", "96",
                                   "--dynamic", "--input", "uint8")) == 0
    printed = capsys.readouterr().out
    assert "at 64x96: max |logit difference|" in printed and "at 96x160" in printed
    # The file runs by itself on an image of a third size, and matches PyTorch.
    image = read_image(camvid_image()) if camvid_image() else np.random.default_rng(0).integers(
        0, 256, (120, 160, 3), dtype=np.uint8)
    image = cv2.resize(image, (90, 60))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    got = session.run(None, {"image": image.transpose(2, 0, 1)[None].copy()})[0]
    model, meta, _, _ = export.load_trained(config, checkpoint)
    with torch.no_grad():
        expected = Normalized(model, meta["mean"], meta["std"])(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    assert got.shape == (1, 5, 60, 90)
    assert np.abs(got - expected.numpy()).max() < 1e-4
    # inference.py runs the file (classes from its metadata) like the checkpoint.
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), image[..., ::-1])
    def probs(model: str, name: str, *mode: str) -> np.ndarray:
        assert inference.main(["-m", model, "-i", str(folder), "-o", str(tmp_path / name), "--probs", *mode]) == 0
        return np.load(tmp_path / name / "a_probs.npy").astype(np.float32)

    whole = probs(str(out), "onnx_out")
    assert np.abs(whole - probs(checkpoint, "torch_out")).max() < 2e-3  # float16 files
    # Every mode runs the file: sliding tiles of another size than the export's, and flip.
    sliding = ("--mode", "sliding", "--tile", "32", "48", "--flip")
    tiles = probs(str(out), "onnx_tiles", *sliding)
    assert np.abs(tiles - probs(checkpoint, "torch_tiles", *sliding)).max() < 2e-3
    assert np.abs(tiles - whole).max() > 0.1  # the mode did change the prediction


def test_fixed_size_onnx_refuses_other_sizes(tmp_path, capsys):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "fixed.onnx"
    # Without --image the check runs on the first image of the config's validation set.
    assert export.main(["-c", config, "-m", checkpoint, "-o", str(out), "--format", "onnx", "--size", "32", "48"]) == 0
    assert "verified on " in capsys.readouterr().out
    assert onnxruntime.InferenceSession(str(out)).get_inputs()[0].shape == ["batch", 3, 32, 48]
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((40, 40, 3), np.uint8))
    capsys.readouterr()
    assert inference.main(["-m", str(out), "-i", str(folder), "-o", str(tmp_path / "o")]) == 2
    assert "the file takes 32x48 images only (exported without --dynamic), got 40x40" in capsys.readouterr().err


def test_unet_to_torchscript_with_float_input(tmp_path):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "unet.pt"
    assert export.main(export_args(config, checkpoint, out, "--format", "torchscript", "--size", "32", "32",
                                   "--dynamic", "--input", "float")) == 0
    files = {"meta.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=files)
    meta = json.loads(files["meta.json"])
    assert meta["input"] == "float" and meta["class_names"][:2] == ["background", "disk"]
    x = torch.rand(2, 3, 40, 24)
    model, meta, _, _ = export.load_trained(config, checkpoint)
    with torch.no_grad():
        assert torch.allclose(loaded(x), Normalized(model, meta["mean"], meta["std"], 1.0)(x), atol=1e-5)


def test_verification_fails_when_the_file_differs(tmp_path):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "unet.onnx"
    assert export.main(export_args(config, checkpoint, out, "--format", "onnx", "--size", "32", "32")) == 0
    model, meta, _, _ = export.load_trained(config, checkpoint)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # now PyTorch predicts something else than the file
    meta = {**meta, "input": "normalized"}
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(export.VerificationError, match="differ from PyTorch's by 1"):
        export.verify(export.export_module(model, meta, "normalized"), out, "onnx", image, meta, [(32, 32)], 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", [
    ({"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}, (48, 80)),
    ({"type": "SegNet"}, (70, 90)),  # not multiples of 32: the padding is recorded by tracing
], ids=["DeepLabV3Plus", "SegNet"])
def test_to_onnx_dynamic(tmp_path, arch, size):
    config, checkpoint = make_checkpoint(tmp_path, arch)
    out = tmp_path / "model.onnx"
    assert export.main(export_args(config, checkpoint, out, "--format", "onnx", "--size", "64", "64",
                                   "--dynamic")) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, *size)
    model, _, _, _ = export.load_trained(config, checkpoint)
    with torch.no_grad():
        expected = model(x)["out"].numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-3 * np.abs(expected).max()


@pytest.mark.slow
def test_enet_to_torchscript_and_onnx(tmp_path):
    config, checkpoint = make_checkpoint(tmp_path, {"type": "ENet"})
    out = tmp_path / "enet.pt"
    assert export.main(export_args(config, checkpoint, out, "--format", "torchscript", "--size", "64", "64",
                                   "--dynamic")) == 0
    loaded = torch.jit.load(str(out))
    model, _, _, _ = export.load_trained(config, checkpoint)
    x = torch.randn(1, 3, 45, 70)  # not multiples of 8: the padding is recorded by tracing
    with torch.no_grad():
        expected = model(x)["out"]
    assert torch.allclose(loaded(x), expected, atol=1e-4)
    # ONNX: the unpooling is written as a scatter while exporting (the exporter has no max_unpool2d).
    onnx_path = tmp_path / "enet.onnx"
    assert export.main(export_args(config, checkpoint, onnx_path, "--format", "onnx", "--size", "64", "64",
                                   "--dynamic")) == 0
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected.numpy()).max() < 1e-4


class FrozenSize(torch.nn.Module):
    """Adds a tensor whose size tracing records as a constant: right at the example size only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] + torch.ones(int(x.shape[2]), int(x.shape[3]))


def test_verification_catches_a_size_frozen_by_tracing(tmp_path):
    meta = {"input": "normalized", "mean": [0.5] * 3, "std": [0.25] * 3}
    example = torch.zeros(1, 3, 32, 32)
    image = np.zeros((32, 32, 3), np.uint8)
    export.export_onnx(FrozenSize(), example, tmp_path / "frozen.onnx", dynamic=True, meta=meta)
    assert export.verify(FrozenSize(), tmp_path / "frozen.onnx", "onnx", image, meta, [(32, 32)], 1e-6)[0][
        "max_abs_diff"] == 0.0
    with pytest.raises(export.VerificationError, match="fails at 64x96 .*export without --dynamic"):
        export.verify(FrozenSize(), tmp_path / "frozen.onnx", "onnx", image, meta, [(32, 32), (64, 96)], 1e-3)


@pytest.mark.parametrize("norm", ["GroupNorm", "InstanceNorm", "EvoNormS0"])
@pytest.mark.parametrize("file_format", ["onnx", "torchscript"])
def test_models_with_another_norm_export_and_match(tmp_path, capsys, norm, file_format):
    """The checkpoint's config rebuilds the norm's layers; the exported file matches PyTorch (export checks)."""
    arch = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18", "norm": norm}}
    config, checkpoint = make_checkpoint(tmp_path, arch)
    out = tmp_path / f"model.{'onnx' if file_format == 'onnx' else 'pt'}"
    assert export.main(export_args(config, checkpoint, out, "--format", file_format, "--size", "64", "96",
                                   "--dynamic")) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    model, _, _, _ = export.load_trained(config, checkpoint)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unpooling_written_for_onnx_equals_max_unpool2d(monkeypatch):
    """The scatter that replaces max_unpool2d while exporting to ONNX puts every value in the same place."""
    x = torch.randn(2, 3, 6, 10)
    pooled, indices = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    expected = torch.nn.functional.max_unpool2d(pooled, indices, 2, 2)
    assert torch.equal(max_unpool2x(pooled, indices), expected)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    scattered = max_unpool2x(pooled, indices)
    assert torch.equal(scattered, expected)
    assert scattered.shape == (2, 3, 6, 10) and int((scattered != 0).sum()) == 2 * 3 * 3 * 5


class PadCrop(torch.nn.Module):
    def forward(self, x):
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, 8)
        return padded, padded.mean((2, 3), keepdim=True).expand_as(padded)[..., :height, :width]


def test_tracing_records_the_padding_to_a_multiple():
    """A traced model pads (and crops) at the size it is run at, not at the example's: the example
    needs no padding, and eager code would skip the pad that tracing must record."""
    with torch.no_grad():
        traced = torch.jit.trace(PadCrop(), torch.randn(1, 3, 16, 16))
    x = torch.randn(1, 3, 13, 21)
    padded, cropped = traced(x)
    assert padded.shape == (1, 3, 16, 24) and torch.equal(padded[..., :13, :21], x)
    assert float(padded[..., 13:, :].abs().sum()) == 0 and float(padded[..., 21:].abs().sum()) == 0
    assert cropped.shape == (1, 3, 13, 21)
    assert torch.equal(pad_to_multiple(torch.ones(1, 1, 16, 16), 8), torch.ones(1, 1, 16, 16))


@pytest.mark.parametrize("mask_format", ["index", "color"])
def test_onnx_of_a_folder_model_scores_labels_without_its_config(tmp_path, mask_format, capsys):
    # A model trained on one's own folder: inference.py -m model.onnx --labels reads the masks
    # the way the data set did (classes, colours, mask format saved in the file's meta), with no config.
    rng = np.random.default_rng(0)
    colors = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(tmp_path / "data" / "images" / f"{i}.png"), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
        mask = rng.integers(0, 3, (32, 48)).astype(np.uint8)
        if mask_format == "color":
            rgb = np.asarray(colors, dtype=np.uint8)[mask]
            cv2.imwrite(str(tmp_path / "data" / "masks" / f"{i}.png"), rgb[..., ::-1].copy())
        else:
            cv2.imwrite(str(tmp_path / "data" / "masks" / f"{i}.png"), mask)
    loader = {"type": "Folder", "args": {"data_dir": str(tmp_path / "data"), "classes": ["bg", "red", "green"],
                                         "colors": colors, "mask_format": mask_format, "batch_size": 2}}
    config, checkpoint = make_checkpoint(tmp_path, UNET, train_loader=loader)
    onnx_file = tmp_path / "folder.onnx"
    assert export.main(["-c", config, "-m", checkpoint, "-o", str(onnx_file), "--format", "onnx",
                        "--dynamic"]) == 0
    out = tmp_path / "out"
    assert inference.main(["-m", str(onnx_file), "-i", str(tmp_path / "data" / "images"), "-o", str(out),
                           "--labels", str(tmp_path / "data" / "masks"), "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["num_images"] == 2 and len(results["class_iou"]) == 3


@pytest.mark.parametrize("name", sorted(DATASETS.names()))
def test_every_data_set_reads_its_labels_from_the_saved_meta_alone(name, tmp_path):
    # What inference.py --labels uses for an exported file: the meta's label_args (or, for files
    # written before they were saved, the class names and palette), never the data set's folders.
    dataset = DATASETS.get(name)
    classes = ["a", "b"] if name == "Folder" else list(dataset.class_names)
    palette = [[0, 0, 0], [255, 255, 255]] if name == "Folder" else [list(c) for c in dataset.palette]
    meta = {"class_names": classes, "palette": palette}
    assert callable(dataset.label_decoder(inference.label_args(meta), 255))
    if name == "Folder":
        saved = dataset.label_args({"data_dir": str(tmp_path), "classes": classes, "colors": palette,
                                    "mask_format": "color", "void_colors": [[9, 9, 9]]})
        assert saved == {"classes": classes, "colors": palette, "mask_format": "color", "void_colors": [[9, 9, 9]]}
        assert inference.label_args({**meta, "label_args": saved}) is saved


def folder_of(tmp_path: Path, *sizes: tuple[int, int]) -> Path:
    """Images of the given sizes (a camvid crop when the data is there, else noise) in a new folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    source = read_image(camvid_image()) if camvid_image() else np.random.default_rng(0).integers(
        0, 256, (120, 160, 3), dtype=np.uint8)
    for i, (height, width) in enumerate(sizes):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.resize(source, (width, height))[..., ::-1])
    return folder


def predictions(tmp_path: Path, model: str, folder: Path, name: str, *extra: str) -> dict[str, np.ndarray]:
    """``inference.py``'s class maps and probabilities of every image of ``folder``."""
    out = tmp_path / name
    assert inference.main(["-m", model, "-i", str(folder), "-o", str(out), "--probs", "--device", "cpu",
                           *extra]) == 0
    return {p.stem: (np.asarray(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)),
                     np.load(out / f"{p.stem}_probs.npy").astype(np.float32))
            for p in sorted(out.glob("*.png")) if not p.stem.endswith("_overlay")}


def test_unet_to_pt2_runs_in_inference_like_the_checkpoint(tmp_path, capsys):
    # torch.export's program (.pt2), the format PyTorch recommends: free height and width, the classes
    # in its extra file, run by inference.py -m like the checkpoint.
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "unet.pt2"
    assert export.main(export_args(config, checkpoint, out, "--format", "pt2", "--size", "64", "96",
                                   "--dynamic", "--input", "uint8")) == 0
    printed = capsys.readouterr().out
    assert "at 64x96: max |logit difference|" in printed and "at 96x160" in printed
    files = {"meta.json": ""}
    program = torch.export.load(str(out), extra_files=files)
    meta = json.loads(files["meta.json"])
    assert meta["input"] == "uint8" and meta["class_names"][:2] == ["background", "disk"]
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    model, meta, _, _ = export.load_trained(config, checkpoint)
    with torch.no_grad():
        expected = Normalized(model, meta["mean"], meta["std"])(x.float())
        assert torch.allclose(program.module()(x), expected, atol=1e-4)
    folder = folder_of(tmp_path, (60, 90), (48, 64))  # sizes other than the export's
    exported = predictions(tmp_path, str(out), folder, "pt2_out")
    reference = predictions(tmp_path, checkpoint, folder, "torch_out")
    assert sorted(exported) == ["0", "1"]
    for name, (classes, probs) in exported.items():
        assert np.array_equal(classes, reference[name][0])
        assert np.abs(probs - reference[name][1]).max() < 2e-3  # float16 files
    # Every mode runs the file.
    sliding = ("--mode", "sliding", "--tile", "32", "48", "--flip")
    tiles = predictions(tmp_path, str(out), folder, "pt2_tiles", *sliding)
    reference = predictions(tmp_path, checkpoint, folder, "torch_tiles", *sliding)
    assert all(np.array_equal(tiles[n][0], reference[n][0]) for n in tiles)


def test_fixed_size_pt2_refuses_other_sizes(tmp_path, capsys):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "fixed.pt2"
    assert export.main(export_args(config, checkpoint, out, "--format", "pt2", "--size", "32", "48")) == 0
    folder = folder_of(tmp_path, (40, 40))
    capsys.readouterr()
    assert inference.main(["-m", str(out), "-i", str(folder), "-o", str(tmp_path / "o")]) == 2
    assert "the file takes 32x48 images only (exported without --dynamic), got 40x40" in capsys.readouterr().err


def test_torchscript_runs_in_inference_with_a_deprecation_note(tmp_path, capsys):
    config, checkpoint = make_checkpoint(tmp_path, UNET)
    out = tmp_path / "unet.pt"
    assert export.main(export_args(config, checkpoint, out, "--format", "torchscript", "--size", "32", "32",
                                   "--dynamic")) == 0
    assert "TorchScript (torch.jit.trace/save/load) is deprecated" in capsys.readouterr().err
    folder = folder_of(tmp_path, (40, 56))
    with pytest.warns(FutureWarning, match="TorchScript is deprecated in PyTorch; export with --format pt2"):
        scripted = predictions(tmp_path, str(out), folder, "ts_out")
    reference = predictions(tmp_path, checkpoint, folder, "torch_out")
    assert np.array_equal(scripted["0"][0], reference["0"][0])


@pytest.mark.parametrize("name, content", [("model.pt", b"not a model at all"),
                                           ("model.pt2", b"PK\x03\x04 truncated"),
                                           ("best_model.pth", b"\x80\x02}q\x00")])
def test_a_file_that_is_no_model_gets_one_line_naming_the_formats(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    folder = folder_of(tmp_path, (32, 32))
    assert inference.main(["-m", str(path), "-i", str(folder), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "weights_only" not in err
    assert err.startswith(f"error: {path}: not a readable checkpoint (corrupt or truncated?) nor an exported model")
    assert "(.pth)" in err and "(.onnx)" in err and "(.pt2)" in err and "TorchScript (.pt)" in err
