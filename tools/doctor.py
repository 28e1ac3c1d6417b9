"""The data-set doctor: check the configured data before a training run is spent on it.

``python -m tools.doctor -c CONFIG`` scans the splits of ``train_loader`` and
``val_loader`` (raw files, no augmentation) and reports unreadable or truncated
files, image/label size mismatches, images without labels and labels without
images, colour or 16-bit labels where indices are expected, label values that
are neither a class nor void (with their pixel counts per file), 0/255 binary
masks, EXIF-rotated JPEGs, duplicate images, and the per-class pixel and image
distribution (printed, drawn as ``class_distribution_<split>.png``, and turned into
median-frequency class weights in ``class_weights.json``). The full list goes to
``report.txt`` in the output folder; the terminal shows a screenful and the count
of the rest. It never writes into the data. Exit code: 0 clean or warnings
only, 1 errors found, 2 the config could not be used.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from base.base_dataset import BaseDataSet
from builder import build_dataset
from models.losses.class_weights import median_frequency_weights
from utils.config import load_config
from utils.errors import DataError, UserError, run_command, user_message
from utils.files import write_json
from utils.images import read_image
from utils.labels import UNMAPPED

ERROR, WARNING = "error", "warning"
SHOWN_CLASSES = 30  # longer class tables only go to report.txt and the bar chart
_EXIF_ORIENTATION = 0x0112
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Finding:
    """One problem: how bad, which check, which file, what exactly."""
    severity: str
    check: str
    file: str
    detail: str

    def line(self) -> str:
        return f"{self.severity:7s} {self.check}: {self.file}: {self.detail}"


@dataclass
class SplitReport:
    """Findings and class statistics of one configured split."""
    name: str
    class_names: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    samples: int = 0
    pixels: np.ndarray | None = None          # labelled pixels per class
    images: np.ndarray | None = None          # images containing each class
    present_pixels: np.ndarray | None = None  # labelled pixels of the images containing each class

    def add(self, severity: str, check: str, file: object, detail: str) -> None:
        self.findings.append(Finding(severity, check, str(file), detail))


def truncated(data: bytes) -> bool:
    """Whether a JPEG lacks its end marker or a PNG its IEND chunk (decoders often return a partial image)."""
    if data.startswith(_JPEG_START):
        return not data.rstrip(b"\x00\r\n ").endswith(_JPEG_END)
    if data.startswith(_PNG_SIGNATURE):
        return b"IEND" not in data[-16:]
    return False


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag of a JPEG (1 = as stored)."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):
        return 1


def _check_image(dataset: BaseDataSet, index: int, report: SplitReport,
                 hashes: dict[str, list[str]]) -> np.ndarray | None:
    name = dataset.sample_name(index)
    path = Path(name)
    if path.is_file():
        data = path.read_bytes()
        hashes[hashlib.sha1(data).hexdigest()].append(name)
        if truncated(data):
            report.add(ERROR, "truncated", name, "the file ends early (partly written or downloaded)")
        orientation = exif_orientation(path) if path.suffix.lower() in (".jpg", ".jpeg") else 1
        if orientation != 1:
            report.add(WARNING, "EXIF-rotated", name, f"orientation tag {orientation}: viewers show it "
                       "rotated, training uses the stored pixels (as it does for the label)")
    try:
        return dataset.load_image(index) if not path.is_file() else read_image(path)
    except DataError as exc:
        report.add(ERROR, "unreadable", name, user_message(exc).split(": ", 1)[-1])
        return None


def _check_values(dataset: BaseDataSet, raw: np.ndarray, source: str, report: SplitReport) -> bool:
    """Report label values that are neither a class nor void; True if all are known."""
    if raw.dtype.kind not in "ui" or raw.ndim != 2:
        return True  # colour masks: the data set's own mapping reports unknown colours
    values, counts = np.unique(raw, return_counts=True)
    lut = dataset.label_lut(dataset.ignore_index)
    inside = (values >= 0) & (values < len(lut))
    known = np.zeros(values.shape, bool)
    known[inside] = lut[values[inside]] != UNMAPPED
    if raw.dtype.itemsize > 1 and source.lower().endswith(".png"):
        report.add(WARNING, "16-bit label", source, f"{raw.dtype} PNG; class indices are usually 8-bit")
    if set(values.tolist()) == {0, 255} and type(dataset).label_map is None:
        report.add(ERROR, "0/255 mask", source, "holds only 0 and 255, and 255 is void: the foreground "
                   "would be ignored; save the foreground as 1")
        return False
    if not known.all():
        shown = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in zip(values[~known], counts[~known]))
        report.add(ERROR, "unknown values", source, f"{shown}: neither a class "
                   f"(0-{dataset.num_classes() - 1}) nor the ignore value")
    return bool(known.all())


def _check_sample(dataset: BaseDataSet, index: int, report: SplitReport, hashes: dict[str, list[str]]) -> None:
    image = _check_image(dataset, index, report, hashes)
    source = dataset.label_source(index)
    try:
        raw = dataset.load_label(index)
    except DataError as exc:
        message = user_message(exc)
        check = "colour label" if "channels" in message else "unreadable"
        report.add(ERROR, check, source, message.split(": ", 1)[-1])
        return
    if not _check_values(dataset, raw, source, report):
        return
    try:
        label = dataset.map_label(raw, source)
    except DataError as exc:
        report.add(ERROR, "unknown values", source, user_message(exc).split(": ", 1)[-1])
        return
    if image is not None and image.shape[:2] != label.shape[:2]:
        report.add(ERROR, "size mismatch", source, f"label is {label.shape[1]}x{label.shape[0]}, its image "
                   f"{dataset.sample_name(index)} is {image.shape[1]}x{image.shape[0]} (width x height)")
    counts = np.bincount(label[label != dataset.ignore_index].ravel().astype(np.int64),
                         minlength=dataset.num_classes())[:dataset.num_classes()]
    report.pixels += counts
    report.images += counts > 0
    report.present_pixels += np.where(counts > 0, counts.sum(), 0)


def scan(dataset: BaseDataSet, name: str, progress: bool = True) -> SplitReport:
    """Check every sample of ``dataset``; never modifies a file."""
    n = dataset.num_classes()
    report = SplitReport(name, tuple(dataset.class_names), samples=len(dataset), pixels=np.zeros(n, np.int64),
                         images=np.zeros(n, np.int64), present_pixels=np.zeros(n, np.int64))
    hashes: dict[str, list[str]] = defaultdict(list)
    for index in tqdm(range(len(dataset)), desc=f"checking {name}", unit="sample", disable=not progress,
                      file=sys.stderr):
        _check_sample(dataset, index, report, hashes)
    for label in dataset.unpaired_labels():
        report.add(WARNING, "label without image", label, "no image has this stem")
    for names in hashes.values():
        if len(names) > 1:
            report.add(WARNING, "duplicate", names[0], f"same bytes as {', '.join(names[1:])}")
    return report


def class_table(report: SplitReport) -> list[str]:
    """One line per class: pixel share and the number of images containing it."""
    if report.pixels is None:
        return []
    total = max(int(report.pixels.sum()), 1)
    width = max(len(name) for name in report.class_names)
    lines = [f"  {'class':{width}s}  pixels   images"]
    for name, pixels, images in zip(report.class_names, report.pixels, report.images):
        lines.append(f"  {name:{width}s}  {100 * pixels / total:5.2f}%  {int(images):6d}")
    return lines


def plot_distribution(report: SplitReport, path: Path) -> None:
    """A bar chart of the pixel share per class (log scale: rare classes stay visible)."""
    from utils.plots import pyplot

    plt = pyplot()

    share = report.pixels / max(int(report.pixels.sum()), 1)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(share) + 1.5))
    ax.barh(range(len(share)), np.maximum(share, 1e-9), color="tab:blue")
    ax.set_yticks(range(len(share)), report.class_names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("share of labelled pixels")
    ax.set_title(f"{report.name}: {report.samples} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(reports: list[SplitReport], out_dir: Path) -> None:
    """``report.txt``, ``class_distribution_<split>.png`` and ``class_weights.json`` (training split)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for report in reports:
        lines += [f"[{report.name}] {report.samples} samples, {len(report.findings)} finding(s)"]
        lines += [finding.line() for finding in report.findings] + class_table(report)
        if report.pixels is not None:
            plot_distribution(report, out_dir / f"class_distribution_{report.name}.png")
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    scanned = [r for r in reports if r.pixels is not None and r.pixels.any()]
    if scanned:
        first = scanned[0]
        weights = median_frequency_weights(first.pixels, first.present_pixels)
        write_json({"split": first.name, "method": "median_frequency", "classes": list(first.class_names),
                    "weights": [round(w, 6) for w in weights]}, out_dir / "class_weights.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.doctor",
                                     description="Check the configured data sets before training.")
    parser.add_argument("-c", "--config", required=True, help="JSON config whose loaders to check")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value as train.py does, e.g. --set "
                             "train_loader.args.data_dir=/data (repeatable)")
    parser.add_argument("-o", "--output", help="folder for the report (default: saved/doctor/<name>)")
    parser.add_argument("--loaders", nargs="+", default=["train_loader", "val_loader"],
                        choices=["train_loader", "val_loader"], help="which loaders' splits to check")
    parser.add_argument("--max-lines", type=int, default=20, help="findings shown in the terminal")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 clean or warnings only, 1 errors found, 2 bad config)."""
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Check the splits that ``args`` names, write the outputs, print the summary; returns the exit code."""
    config = load_config(args.config, args.overrides)
    reports = []
    for key in args.loaders:
        if config.get(key) is None:
            continue
        try:
            dataset = build_dataset(config, key, transforms=False)
        except UserError as exc:  # the listing itself failed: missing folders, images without labels
            failed = SplitReport(key, ())
            failed.add(ERROR, "listing", config[key]["type"], user_message(exc))
            reports.append(failed)
            continue
        reports.append(scan(dataset, key, progress=not args.no_progress))
    out_dir = Path(args.output) if args.output else Path("saved") / "doctor" / config["name"]
    write_outputs(reports, out_dir)
    findings = [f for r in reports for f in r.findings]
    for report in reports:
        errors = sum(f.severity == ERROR for f in report.findings)
        print(f"[{report.name}] {report.samples} samples: {errors} error(s), "
              f"{len(report.findings) - errors} warning(s)")
        if report.pixels is not None and len(report.class_names) <= SHOWN_CLASSES:
            print("\n".join(class_table(report)))
    for finding in findings[:args.max_lines]:
        print(finding.line())
    if len(findings) > args.max_lines:
        print(f"... and {len(findings) - args.max_lines} more in {out_dir / 'report.txt'}")
    print(f"report, class distribution and class weights written to {out_dir}")
    return 1 if any(f.severity == ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
