"""Segment images, folders, lists and videos with a trained checkpoint or an exported file.

    python inference.py -m CHECKPOINT -i INPUT -o OUT_DIR [-c CONFIG] [--labels LABEL_DIR]
                        [--mode single|sliding|multiscale] [--tile H W] [--overlap F]
                        [--scales 0.5,0.75,1.0] [--flip] [--batch-size N] [--amp bf16|fp16]
                        [--label-ids] [--confidence] [--probs] [--min-cluster N]

``INPUT`` is a folder (searched recursively; the output mirrors its sub-folders),
one image, a list file (``.txt``: one image path a line, relative to the list's
folder) or a video (``.mp4``, ``.avi``: written back as ``<stem>_overlay`` video at
the same frame rate). Each image gives ``<name>.png`` (palette PNG of class
indices) and ``<name>_overlay.png``; on request ``<name>_labelIds.png`` (the
data set's own label ids, e.g. for the Cityscapes server), ``<name>_confidence.png``
(max probability x 255) and ``<name>_probs.npy`` (float16 ``(K, H, W)``).
Unreadable images are skipped, named and counted; the exit code is then 1.

With ``--labels`` the folder is scored as a whole into ``results.json``,
``results.txt`` and ``confusion_matrix.png``; ``worst/`` shows the images of
lowest mIoU (image | ground truth | prediction). Mode options may also come from
an ``inference`` section of the config; flags override it. No training data is
needed: classes, palette and normalisation come from the checkpoint. ``-m`` also
takes a file of ``tools.export``: ONNX (``.onnx``), ``torch.export`` (``.pt2``) or
TorchScript (``.pt``, deprecated). ``python -m tools.evaluate`` writes the same report
for a config's validation set.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import builder
from predictor import Prediction, Predictor, Report, add_mode_arguments, mode_flags, remove_small_clusters
from utils.distributed import select_device
from utils.errors import ConfigError, DataError, run_command, user_message
from utils.files import make_dir
from utils.images import read_image, read_label
from utils.registry import DATASETS
from utils.visualize import overlay, save_palette_png, save_rgb_png

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp")
VIDEO_EXTENSIONS = ("mp4", "avi")
LIST_EXTENSIONS = ("txt", "lst")
# OpenCV codecs by container; both are built into the opencv-python wheels.
FOURCC = {"mp4": "mp4v", "avi": "MJPG"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Segment images, folders, list files or videos.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in the checkpoint)")
    parser.add_argument("-m", "--model", required=True,
                        help="checkpoint (best_model.pth, checkpoint.pth) or a file of tools.export "
                             "(.onnx, .pt2, TorchScript .pt)")
    parser.add_argument("-i", "--images", required=True, help="folder, image, list file (.txt) or video")
    parser.add_argument("-o", "--output", required=True, help="folder for the predictions")
    parser.add_argument("-l", "--labels", help="folder of ground-truth labels, same relative paths and stems")
    parser.add_argument("-e", "--extension", help="only images with this extension (default: common image types)")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the prediction in overlays")
    add_mode_arguments(parser)
    extra = parser.add_argument_group("extra outputs")
    extra.add_argument("--label-ids", action="store_true", help="also write <name>_labelIds.png")
    extra.add_argument("--confidence", action="store_true", help="also write <name>_confidence.png")
    extra.add_argument("--probs", action="store_true", help="also write <name>_probs.npy (float16)")
    extra.add_argument("--min-cluster", type=int, default=0,
                       help="regions smaller than this many pixels take the class around them")
    extra.add_argument("--worst", type=int, default=5, help="with --labels: how many worst images to show")
    return parser.parse_args(argv)


# --- inputs ---------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def list_images(folder: Path, extension: str | None) -> list[Path]:
    """The images under ``folder`` (recursively, sorted); other files are skipped with a warning."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    extensions = (extension.lower().lstrip("."),) if extension else IMAGE_EXTENSIONS
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if _suffix(p) in extensions]
    skipped = [p for p in files if _suffix(p) not in IMAGE_EXTENSIONS]  # --extension filters silently
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) that are not images: {names}", file=sys.stderr)
    if not images:
        raise DataError(f"{folder}: no images with extension {', '.join(extensions)}")
    return images


def read_list_file(path: Path) -> list[Path]:
    """The images named in a list file, one a line; relative paths start at the list's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the list file ({exc})") from exc
    images = [path.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not images:
        raise DataError(f"{path}: the list file names no image")
    return images


def collect_inputs(source: Path, extension: str | None) -> tuple[list[Path], Path]:
    """The images of ``-i`` and the folder their output paths are relative to."""
    if source.is_dir():
        return list_images(source, extension), source
    if not source.is_file():
        raise DataError(f"{source}: no such folder or file")
    if _suffix(source) in LIST_EXTENSIONS:
        images = read_list_file(source)
        return images, Path(os.path.commonpath([p.parent.resolve() for p in images]))
    if _suffix(source) in IMAGE_EXTENSIONS:
        return [source], source.parent
    raise DataError(f"{source}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a list file "
                    f"({', '.join(LIST_EXTENSIONS)}) or a video ({', '.join(VIDEO_EXTENSIONS)})")


def output_names(images: list[Path], root: Path) -> dict[Path, Path]:
    """The output path (relative, without suffix) of each image: its stem in its mirrored sub-folder.

    Two images of one folder sharing a stem (``a.png``, ``a.jpg``) keep their
    extensions (``a.png``, ``a.jpg`` -> ``a.png.png``, ``a.jpg.png``) so neither
    overwrites the other.
    """
    def folder(path: Path) -> Path:
        return path.resolve().parent.relative_to(root.resolve())

    stems: dict[tuple[Path, str], int] = {}
    for path in images:
        key = (folder(path), path.stem)
        stems[key] = stems.get(key, 0) + 1
    return {path: folder(path) / (path.stem if stems[(folder(path), path.stem)] == 1 else path.name)
            for path in images}


def find_label(label_dir: Path, stem: str) -> Path:
    """The label file of an image: same stem, PNG preferred (Cityscapes' ``*_leftImg8bit`` -> ``*_gtFine_labelIds``)."""
    candidates = [label_dir / f"{stem}.png"] + sorted(label_dir.glob(f"{stem}.*"))
    if stem.endswith("_leftImg8bit"):
        candidates.append(label_dir / f"{stem[:-len('_leftImg8bit')]}_gtFine_labelIds.png")
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{label_dir}: no label file for image '{stem}' (expected {stem}.png)")


# --- model ----------------------------------------------------------------------------------------
def load_predictor(config_path: str | None, model_path: str, device: torch.device,
                   args: argparse.Namespace | None = None) -> tuple[Predictor, dict | None]:
    """The predictor of a checkpoint or exported file, with the mode of the config's section and ``args``.

    Returns:
        ``(predictor, config)``; ``config`` is None for an exported file run without ``-c``.
    """
    return builder.load_predictor(config_path, model_path, device, mode_flags(args))


def label_id_mapper(meta: dict):
    """Class index map -> the data set's label ids: its ``to_label_ids``, else the inverse of its label_map."""
    cls = DATASETS.get(meta["dataset"])
    if hasattr(cls, "to_label_ids"):
        return cls.to_label_ids
    raw_of: dict[int, list[int]] = {}
    for raw, index in (cls.label_map or {i: i for i in range(meta["num_classes"])}).items():
        if index is not None:
            raw_of.setdefault(index, []).append(raw)
    if sorted(raw_of) != list(range(meta["num_classes"])) or any(len(v) > 1 for v in raw_of.values()):
        raise ConfigError(f"--label-ids: {meta['dataset']} maps several label values to one class, so "
                          "label ids cannot be recovered from a prediction")
    table = np.array([raw_of[i][0] for i in range(meta["num_classes"])], dtype=np.uint8)
    return lambda pred: table[pred]


# --- outputs --------------------------------------------------------------------------------------
class Writer:
    """Writes the per-image files asked for; counts them."""

    def __init__(self, out_dir: Path, meta: dict, args: argparse.Namespace) -> None:
        self.out_dir, self.meta, self.args = out_dir, meta, args
        self.to_label_ids = label_id_mapper(meta) if args.label_ids else None
        self.count = 0

    def write(self, name: Path, image: np.ndarray, prediction: Prediction) -> np.ndarray:
        """Write the outputs of one image; returns its class-index map."""
        pred = remove_small_clusters(prediction.labels, self.args.min_cluster)
        base = self.out_dir / name
        base.parent.mkdir(parents=True, exist_ok=True)
        palette = self.meta["palette"]
        save_palette_png(pred, palette, f"{base}.png")
        save_rgb_png(overlay(image, pred, palette, self.args.alpha), f"{base}_overlay.png")
        self.count += 2
        if self.to_label_ids is not None:
            cv2.imwrite(f"{base}_labelIds.png", self.to_label_ids(pred))
            self.count += 1
        if self.args.confidence:
            cv2.imwrite(f"{base}_confidence.png", (prediction.confidence.numpy() * 255).round().astype(np.uint8))
            self.count += 1
        if self.args.probs:
            # half the size; 3 digits suffice
            np.save(f"{base}_probs.npy", prediction.probs.numpy().astype(np.float16))
            self.count += 1
        return pred


class LabelReader:
    """Reads a label file into class indices as the model's data set does (colour masks, .mat files...),
    with its instance map when the data set's benchmark needs one (Cityscapes' ``*_instanceIds.png``)."""

    def __init__(self, meta: dict, dataset_args: dict, report: Report) -> None:
        self.dataset = DATASETS.get(meta["dataset"])
        self.decode = self.dataset.label_decoder(dataset_args, meta["ignore_index"])
        self.benchmark = report.benchmark is not None

    def __call__(self, label_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        instances = self.dataset.instance_map_path(label_path) if self.benchmark else None
        return self.decode(label_path), read_label(instances) if instances is not None else None


# --- running --------------------------------------------------------------------------------------
def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_images(predictor: Predictor, images: list[Path], root: Path, out_dir: Path,
               args: argparse.Namespace, dataset_args: dict, metrics: dict | None = None) -> int:
    """Predict every image; returns how many could not be read.

    ``dataset_args``: the training data set's config args (how ``Folder`` reads its masks);
    ``metrics``: the config's ``metrics`` section (the classes the means cover).
    """
    label_dir = Path(args.labels) if args.labels else None
    names = output_names(images, root)
    report = Report(predictor.meta, args.worst, metrics) if label_dir is not None else None
    labels = {path: find_label(label_dir / names[path].parent, path.stem)
              for path in images} if report else {}  # fail early
    read_truth = LabelReader(predictor.meta, dataset_args, report) if report else None
    writer = Writer(out_dir, predictor.meta, args)
    failed = []
    with tqdm(total=len(images), desc="inference", unit="img", disable=None) as bar:
        for chunk in _chunks(images, predictor.settings.batch_size):
            loaded = []
            for path in chunk:
                try:
                    loaded.append((path, read_image(path)))
                except DataError as exc:
                    failed.append(path)
                    tqdm.write(f"warning: skipped {user_message(exc)}", file=sys.stderr)
            predictions = predictor.predictions([image for _, image in loaded], confidence=args.confidence,
                                                probs=args.probs)
            for (path, image), prediction in zip(loaded, predictions):
                pred = writer.write(names[path], image, prediction)
                if report is not None:
                    label, instances = read_truth(labels[path])
                    report.add(str(path), image, label, pred, instances, str(labels[path]))
            bar.update(len(chunk))
    print(f"Wrote {writer.count} files to {out_dir}")
    if report is not None:
        report.finish(out_dir)
        print(report.text, end="")
    if failed:
        print(f"error: {len(failed)} of {len(images)} image(s) could not be read and were skipped: "
              f"{', '.join(str(p) for p in failed[:5])}{', ...' if len(failed) > 5 else ''}", file=sys.stderr)
    return len(failed)


def run_video(predictor: Predictor, video: Path, out_dir: Path, args: argparse.Namespace) -> None:
    """Write ``<stem>_overlay.<ext>``: every frame blended with its prediction, at the source frame rate."""
    if args.labels:
        raise ConfigError("--labels scores image folders; it does not apply to a video")
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise DataError(f"{video}: not a readable video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = out_dir / f"{video.stem}_overlay.{_suffix(video)}"
    writer = None
    palette = predictor.meta["palette"]
    try:
        with tqdm(total=frames, desc="inference", unit="frame", disable=None) as bar:
            while True:
                batch = []
                while len(batch) < predictor.settings.batch_size:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                if not batch:
                    break
                for image, prediction in zip(batch, predictor.predictions(batch)):
                    pred = remove_small_clusters(prediction.labels, args.min_cluster)
                    if writer is None:
                        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*FOURCC[_suffix(video)]), fps,
                                                 (image.shape[1], image.shape[0]))
                        if not writer.isOpened():
                            raise DataError(f"{target}: OpenCV cannot write this video (codec "
                                            f"{FOURCC[_suffix(video)]})")
                    writer.write(cv2.cvtColor(overlay(image, pred, palette, args.alpha), cv2.COLOR_RGB2BGR))
                bar.update(len(batch))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None:
        raise DataError(f"{video}: the video has no readable frame")
    print(f"Wrote {target}")


def label_args(meta: dict) -> dict:
    """How a model's labels are read when only its ``meta`` is at hand (an exported file).

    Files written before ``label_args`` was saved give their classes and palette, which is
    what reading index masks needs.
    """
    if "label_args" in meta:
        return meta["label_args"]
    return {"classes": meta["class_names"], "colors": meta["palette"]}


def run(args: argparse.Namespace) -> int:
    """Predict ``args.images``; returns the number of images that could not be read."""
    for option, value in (("--min-cluster", args.min_cluster), ("--worst", args.worst)):
        if value < 0:
            raise ConfigError(f"{option} {value}: expected a count >= 0")
    device = select_device(args.device)
    source, out_dir = Path(args.images), Path(args.output)
    label_dir = Path(args.labels) if args.labels else None
    if label_dir is not None and not label_dir.is_dir():
        raise DataError(f"{label_dir}: label folder does not exist")
    if out_dir.resolve() in (source.resolve(), label_dir and label_dir.resolve()):
        raise ConfigError(f"-o {out_dir}: the output folder must not be the image or label folder "
                          "(predictions would overwrite them)")
    is_video = source.is_file() and _suffix(source) in VIDEO_EXTENSIONS
    images, root = (None, None) if is_video else collect_inputs(source, args.extension)
    predictor, config = load_predictor(args.config, args.model, device, args)
    make_dir(out_dir, "-o")
    if is_video:
        run_video(predictor, source, out_dir, args)
        return 0
    dataset_args = config["train_loader"]["args"] if config is not None else label_args(predictor.meta)
    return run_images(predictor, images, root, out_dir, args, dataset_args,
                      config.get("metrics") if config is not None else None)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 when some images could not be read)."""
    args = parse_args(argv)
    return run_command(lambda: 1 if run(args) else 0)  # run: the number of unreadable images


if __name__ == "__main__":
    sys.exit(main())
