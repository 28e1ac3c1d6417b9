"""Inference speed of the modes of ``predictor`` on one large image, and of ONNX and bf16.

    python -m tools.bench.inference [--models DeepLabV3Plus,UNet,ENet] [--size 1024 2048] [--tile 512 512]
                                    [--overlap 0.333] [--tile-batch 1] [--scales 0.75,1.0,1.25]
                                    [--measure single,sliding,multiscale,onnx,bf16] [--repeats 2]
                                    [--threads N] [--cpu-time]

For each model (19 classes, untrained, eval mode; the speed does not depend on
the weights), on one random ``uint8`` image of ``--size``, in one process:

- images/s of ``single`` (whole image), ``sliding`` (``--tile``, ``--overlap``,
  ``--tile-batch`` tiles per pass) and ``multiscale`` + flip (``--scales``);
- sliding time / whole-image time next to the pixels the tiles cover / the
  image's pixels: the tiling's own overhead is the first over the second, minus 1;
- eager PyTorch against the same model exported to ONNX (dynamic size) and run by
  onnxruntime, and bfloat16 autocast against float32, all on the whole image.

Each figure is the median of ``--repeats`` runs after one warm-up run, on the wall
clock, or with ``--cpu-time`` on the process's CPU clock, which other processes on a
shared machine disturb less (use it with ``--threads 1``: with more threads it also
counts the time they spin waiting for each other).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import numpy as np
import torch

from utils.config import import_components
from utils.errors import ConfigError
from predictor import InferenceSettings, Normalized, OnnxForward, Predictor, tile_starts
from tools.export import Logits, export_onnx
from utils.registry import MODELS

ARCHS = {
    "DeepLabV3Plus": {"backbone": "resnet18"},
    "UNet": {"base_channels": 16, "depth": 4},
    "ENet": {},
}
NUM_CLASSES = 19
MEASUREMENTS = ["single", "sliding", "multiscale", "onnx", "bf16"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed(predictor: Predictor, image: np.ndarray, repeats: int, clock) -> float:
    """Median seconds of one prediction of ``image`` on ``clock``, after a warm-up."""
    predictor.probabilities([image])
    times = []
    for _ in range(repeats):
        start = clock()
        predictor.probabilities([image])
        times.append(clock() - start)
    return statistics.median(times)


def onnx_forward(name: str, model: torch.nn.Module, forward: Normalized, image: np.ndarray,
                 folder: Path) -> OnnxForward | None:
    """The model exported to ONNX with a dynamic size (None where it cannot be, saying why)."""
    path = folder / f"{name}.onnx"
    example = forward.normalize(torch.from_numpy(image[:256, :256]).permute(2, 0, 1)[None].contiguous())
    try:
        export_onnx(Logits(model), example, path, dynamic=True, meta={"input": "normalized", "mean": MEAN, "std": STD})
    except ConfigError as exc:  # a model the exporter cannot write (see docs/export.md)
        print(f"{name}: no ONNX figure: {exc}", file=sys.stderr)
        return None
    return OnnxForward(path)


def bench_model(name: str, image: np.ndarray, args: argparse.Namespace) -> dict:
    """Seconds per image of each measurement in ``args.measure`` (None: not measured or not possible)."""
    torch.manual_seed(0)
    model = MODELS.build({"type": name, "args": ARCHS[name]}, "arch", num_classes=NUM_CLASSES).eval()
    forward = Normalized(model, MEAN, STD)
    tile = tuple(args.tile)
    clock = time.process_time if args.cpu_time else time.perf_counter
    settings = {"single": InferenceSettings(),
                "sliding": InferenceSettings(mode="sliding", tile=tile, overlap=args.overlap,
                                             batch_size=args.tile_batch),
                "multiscale": InferenceSettings(mode="multiscale", scales=tuple(args.scales), flip=True),
                "bf16": InferenceSettings(amp="bf16"), "onnx": InferenceSettings()}
    row = dict.fromkeys(settings)
    with tempfile.TemporaryDirectory() as folder:
        for key in args.measure:
            on = onnx_forward(name, model, forward, image, Path(folder)) if key == "onnx" else forward
            if on is not None:
                row[key] = timed(Predictor(on, {}, torch.device("cpu"), settings[key]), image, args.repeats, clock)
    height, width = image.shape[:2]
    th, tw = min(tile[0], height), min(tile[1], width)
    tiles = len(tile_starts(height, th, args.overlap)) * len(tile_starts(width, tw, args.overlap))
    row["pixel_ratio"] = tiles * th * tw / (height * width)
    return row


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="DeepLabV3Plus,UNet,ENet")
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--tile", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--overlap", type=float, default=1 / 3)
    parser.add_argument("--tile-batch", type=int, default=1, help="tiles per forward pass")
    parser.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=[0.75, 1.0, 1.25])
    parser.add_argument("--measure", type=lambda s: s.split(","), default=MEASUREMENTS,
                        help=f"a subset of {','.join(MEASUREMENTS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time on the process's CPU clock (steadier than wall time on a shared machine)")
    args = parser.parse_args(argv)
    unknown = set(args.measure) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"--measure: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MEASUREMENTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import_components()
    image = np.random.default_rng(0).integers(0, 256, (*args.size, 3), dtype=np.uint8)
    print(f"{args.size[0]}x{args.size[1]} image, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, tile {args.tile[0]}x{args.tile[1]} overlap {args.overlap:.3f} "
          f"({args.tile_batch} per pass), scales {args.scales} + flip, median of {args.repeats}")
    print(f"{'model':<15}{'single':>9}{'sliding':>9}{'ms+flip':>9}{'slide/whole':>13}{'pixels':>8}"
          f"{'overhead':>10}{'onnx':>9}{'onnx/eager':>12}{'bf16':>9}{'bf16/fp32':>11}\n"
          f"{'':<15}(images/s; slide/whole and pixels are time and pixel ratios, onnx/eager and bf16/fp32 "
          "speed-ups)")
    for name in args.models.split(","):
        row = bench_model(name, image, args)
        speed = {key: _ratio(1.0, row[key]) for key in MEASUREMENTS}
        time_ratio = _ratio(row["sliding"], row["single"])
        overhead = None if time_ratio is None else time_ratio / row["pixel_ratio"] - 1
        print(f"{name:<15}{_cell(speed['single'], '.3f', 9)}{_cell(speed['sliding'], '.3f', 9)}"
              f"{_cell(speed['multiscale'], '.3f', 9)}{_cell(time_ratio, '.2f', 13)}{row['pixel_ratio']:>8.2f}"
              f"{_cell(overhead, '.1%', 10)}{_cell(speed['onnx'], '.3f', 9)}"
              f"{_cell(_ratio(row['single'], row['onnx']), '.2f', 12)}{_cell(speed['bf16'], '.3f', 9)}"
              f"{_cell(_ratio(row['single'], row['bf16']), '.2f', 11)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
