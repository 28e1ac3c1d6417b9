"""Score a trained model on a config's validation set, without training.

    python -m tools.evaluate [-c CONFIG] -m CHECKPOINT [-o OUT]
                             [--mode single|sliding|multiscale] [--tile H W] [--overlap F]
                             [--scales 0.5,0.75,1.0] [--flip] [--batch-size N] [--amp bf16|fp16]
                             [--min-cluster N] [--worst N] [--device cpu|cuda|cuda:N]

Every image of the config's ``val_loader`` data set (its ``subset`` too) is
predicted at full resolution in the chosen mode, and scored against its label as
the data set reads it; the loader's transforms are not applied, so nothing
changes the label. The report is that of ``inference.py --labels``:
``results.json``, ``results.txt``, ``confusion_matrix.png`` and ``worst/``, in
``-o`` (default: ``evaluation/`` beside the checkpoint). ``-c`` defaults to the
config saved in the checkpoint; ``-m`` also takes a file of ``tools.export``,
then with ``-c``. Mode options may also come from the config's ``inference``
section; flags override it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from builder import build_dataset, dataset_info, load_predictor
from predictor import MODEL_FORMATS, Report, add_mode_arguments, mode_flags, remove_small_clusters
from utils.distributed import select_device
from utils.errors import ConfigError, run_command
from utils.files import make_dir
from utils.images import read_label


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate",
                                     description="Score a trained model on the config's validation set.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in the checkpoint)")
    parser.add_argument("-m", "--model", required=True, help=f"the model: {MODEL_FORMATS}")
    parser.add_argument("-o", "--output", help="folder for the report (default: evaluation/ beside the model)")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_mode_arguments(parser)
    parser.add_argument("--min-cluster", type=int, default=0,
                        help="regions smaller than this many pixels take the class around them")
    parser.add_argument("--worst", type=int, default=5, help="how many worst images to show")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    """Predict and score the validation set as ``args`` says; returns the results (see ``Report.finish``)."""
    for option, value in (("--min-cluster", args.min_cluster), ("--worst", args.worst)):
        if value < 0:
            raise ConfigError(f"{option} {value}: expected a count >= 0")
    predictor, config = load_predictor(args.config, args.model, select_device(args.device), mode_flags(args))
    if config is None:
        raise ConfigError(f"-m {args.model}: an exported file holds no config; name the one whose val_loader "
                          "to score with -c CONFIG")
    if config["val_loader"] is None:
        raise ConfigError("val_loader: the config has no validation set to score (val_loader is null)")
    meta = predictor.meta
    classes = dataset_info(config).class_names
    if list(classes) != list(meta["class_names"]):
        raise ConfigError(f"val_loader: the config's data set has the classes {list(classes)[:5]}..., the model "
                          f"predicts {meta['class_names'][:5]}...; give the config the model was trained with (-c)")
    dataset = build_dataset(config, "val_loader", transforms=False)
    subset = config["val_loader"]["args"].get("subset")
    if subset is not None:
        dataset.restrict(subset)
    if config["val_loader"]["args"]["transforms"]:
        print("note: val_loader.args.transforms are not applied: every image is scored at its full resolution")
    out_dir = Path(args.output) if args.output else Path(args.model).resolve().parent / "evaluation"
    make_dir(out_dir, "-o")

    report = Report(meta, args.worst, config.get("metrics"))
    benchmark = report.benchmark is not None
    batch = predictor.settings.batch_size
    with tqdm(total=len(dataset), desc="evaluate", unit="img", disable=None) as bar:
        for start in range(0, len(dataset), batch):
            indices = range(start, min(start + batch, len(dataset)))
            samples = [dataset.decoded(i) for i in indices]
            predictions = predictor.predictions([image for image, _ in samples])
            for i, (image, label), prediction in zip(indices, samples, predictions):
                pred = remove_small_clusters(prediction.labels, args.min_cluster)
                instances = None
                if benchmark:  # Cityscapes' iIoU: the instance map beside the label, when there is one
                    path = type(dataset).instance_map_path(Path(dataset.label_source(i)))
                    instances = read_label(path) if path is not None else None
                report.add(dataset.sample_name(i), image, label, pred, instances, dataset.label_source(i))
            bar.update(len(indices))
    results = report.finish(out_dir)
    print(report.text, end="")
    print(f"Wrote {out_dir}")
    return results


def run(args: argparse.Namespace) -> int:
    evaluate(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on bad input)."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
