"""Predict a folder of images with a trained checkpoint.

    python inference.py -c CONFIG -m CHECKPOINT -i IMAGE_DIR -o OUT_DIR
                        [--labels LABEL_DIR] [--extension png] [--device cpu|cuda]

For each image it writes ``<stem>.png`` (a palette PNG whose pixel values are
class indices) and ``<stem>_overlay.png``. With ``--labels`` it also scores the
folder as a whole (one confusion matrix over all images) into ``results.json``
and ``results.txt``. No training data is needed: classes, palette and
normalisation come from the checkpoint (or the data set class).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from base.base_dataset import apply_label_lut, normalize_batch, read_image, read_label
from utils.build import build_model, dataset_class, dataset_meta, make_dir, select_device
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.config import load_config
from utils.errors import ConfigError, DataError, UserError, user_message
from utils.files import write_json
from utils.metrics import ConfusionMatrix, segmentation_metrics
from utils.visualize import overlay, save_palette_png, save_rgb_png

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment a folder of images with a trained model.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in the checkpoint)")
    parser.add_argument("-m", "--model", required=True, help="checkpoint (best_model.pth or checkpoint.pth)")
    parser.add_argument("-i", "--images", required=True, help="folder of images to segment")
    parser.add_argument("-o", "--output", required=True, help="folder for the predictions")
    parser.add_argument("-l", "--labels", help="folder of ground-truth label images with the same stems")
    parser.add_argument("-e", "--extension", help="only images with this extension (default: common image types)")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the prediction in overlays")
    return parser.parse_args(argv)


def list_images(folder: Path, extension: str | None) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    extensions = (extension.lower().lstrip("."),) if extension else IMAGE_EXTENSIONS
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in extensions)
    if not images:
        raise DataError(f"{folder}: no images with extension {', '.join(extensions)}")
    return images


def output_names(images: list[Path]) -> dict[Path, str]:
    """The output name of each image: its stem, or its file name where two images share a stem.

    ``a.png`` and ``a.jpg`` in one folder give ``a.png.png`` and ``a.jpg.png``
    (and ``..._overlay.png``) instead of one overwriting the other.
    """
    stems: dict[str, int] = {}
    for path in images:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {path: path.stem if stems[path.stem] == 1 else path.name for path in images}


def find_label(label_dir: Path, stem: str) -> Path:
    """The label file of an image: same stem, PNG preferred."""
    candidates = [label_dir / f"{stem}.png"] + sorted(label_dir.glob(f"{stem}.*"))
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{label_dir}: no label file for image '{stem}' (expected {stem}.png)")


class Predictor:
    """A model with the normalisation and classes it was trained with.

    ``predict(image)`` takes an RGB ``uint8`` array ``(H, W, 3)`` and returns the
    class-index map ``(H, W)``.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.meta = meta
        self.device = device

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        x = normalize_batch(batch, self.meta["mean"], self.meta["std"])
        return self.model(x)["out"].argmax(dim=1)[0].cpu().numpy()


def load_predictor(config_path: str | None, checkpoint_path: str, device: torch.device) -> tuple[Predictor, dict]:
    """Build the model of the config (or of the checkpoint's saved config) and load its weights."""
    state = load_checkpoint(checkpoint_path)
    if config_path is not None:
        config = load_config(config_path)
    elif isinstance(state.get("config"), dict):
        config = load_config(None, base=state["config"])
    else:
        raise ConfigError(f"{checkpoint_path}: the checkpoint holds no config; pass one with -c")
    meta = state.get("meta") or dataset_meta(config)
    model = build_model(config, pretrained=False)  # the checkpoint holds every weight
    load_model_weights(model, state, checkpoint_path, config["arch"]["type"], dataset_class(config).num_classes())
    return Predictor(model, meta, device), config


def run(args: argparse.Namespace) -> dict | None:
    device = select_device(args.device)
    images = list_images(Path(args.images), args.extension)
    label_dir = Path(args.labels) if args.labels else None
    if label_dir is not None and not label_dir.is_dir():
        raise DataError(f"{label_dir}: label folder does not exist")
    out_dir = Path(args.output)
    if out_dir.resolve() in (Path(args.images).resolve(), label_dir and label_dir.resolve()):
        raise ConfigError(f"-o {out_dir}: the output folder must not be the image or label folder "
                          "(predictions would overwrite them)")
    predictor, config = load_predictor(args.config, args.model, device)
    meta = predictor.meta
    make_dir(out_dir, "-o")

    confusion = lut = None
    if label_dir is not None:
        labels = {path: find_label(label_dir, path.stem) for path in images}  # fail before predicting
        confusion = ConfusionMatrix(meta["num_classes"], meta["ignore_index"])
        lut = dataset_class(config).label_lut(meta["ignore_index"])
    names = output_names(images)
    for path in tqdm(images, desc="inference", disable=None):
        image = read_image(path)
        pred = predictor.predict(image)
        save_palette_png(pred, meta["palette"], out_dir / f"{names[path]}.png")
        blended = overlay(image, pred, meta["palette"], args.alpha)
        save_rgb_png(blended, out_dir / f"{names[path]}_overlay.png")
        if confusion is not None:
            label_path = labels[path]
            label = apply_label_lut(read_label(label_path), lut, str(label_path), meta["num_classes"])
            if label.shape != pred.shape:
                raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image {path} "
                                f"is {pred.shape[1]}x{pred.shape[0]} (width x height)")
            confusion.update(torch.from_numpy(pred), torch.from_numpy(label))
    print(f"Wrote {2 * len(images)} files to {out_dir}")
    if confusion is None:
        return None
    results = {"num_images": len(images), **segmentation_metrics(confusion.matrix, meta["class_names"])}
    write_json(results, out_dir / "results.json")
    (out_dir / "results.txt").write_text(format_results(results, meta["class_names"]))
    print(format_results(results, meta["class_names"]), end="")
    return results


def format_results(results: dict, class_names: list[str]) -> str:
    """A plain-text table of the folder's metrics."""
    lines = [f"images         {results['num_images']}",
             f"pixel accuracy {results['pixel_acc']:.4f}",
             f"mean accuracy  {results['mean_acc']:.4f}",
             f"mIoU           {results['mIoU']:.4f}",
             f"fwIoU          {results['fwIoU']:.4f}",
             "", f"{'class':<20}{'IoU':>8}{'accuracy':>10}"]
    for name, iou, acc in zip(class_names, results["class_iou"], results["class_acc"]):
        lines.append(f"{name:<20}{_cell(iou):>8}{_cell(acc):>10}")
    lines.append("(- : no IoU when a class is in neither labels nor predictions, no accuracy when it is not "
                 "in the labels; such classes are left out of the means)")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
