"""Size and cost of a configured model, and the models table ``docs/models_table.md``.

    python -m tools.model_summary -c CONFIG [--size H W] [--batch N] [--repeats R]
    python -m tools.model_summary --write-table docs/models_table.md

For the config's model: parameters (total, trainable, backbone and decoder),
GFLOPs of one forward pass (``torch.utils.flop_counter``; a multiply-add counts
2), activation memory of a training step and forward latency. FLOPs are counted
on the ``meta`` device (shapes only: instant even for 70 M parameters). The
activation memory is, on the CPU, the bytes of the tensors autograd saves for
backward (parameters excluded, each storage once); on CUDA, the allocator's peak
during forward and backward above what the model and input already hold.

``--write-table`` writes the whole models table file: every registered
architecture with default args, 19 classes, one 512x1024 image;
``tests/test_generated_docs.py`` fails while ``docs/models_table.md`` is stale.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tools.generated import generated_note, write_generated
from utils.errors import run_command
from utils.registry import MODELS

TABLE_PATH = "docs/models_table.md"
TABLE_COMMAND = f"python -m tools.model_summary --write-table {TABLE_PATH}"
TABLE_HEADER = ("| model | parameters (M) | GFLOPs | training activations (MiB / image) |\n"
                "|---|---:|---:|---:|")
TABLE_SIZE = (512, 1024)
TABLE_CLASSES = 19
# Batch norm in training mode needs two values per channel (a model's 1x1 image-pooling
# branch has one per image), so training-step memory is measured on two images at least.
MIN_TRAIN_BATCH = 2


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    backbone: int
    decoder: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Parameters of ``model``; backbone/decoder as ``BaseModel`` splits them (all decoder without one)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_params = getattr(model, "backbone_parameters", None)
    backbone = sum(p.numel() for p in backbone_params()) if backbone_params is not None else 0
    return ParameterCounts(total, trainable, backbone, total - backbone)


def forward_flops(model: nn.Module, size: tuple[int, int], batch: int = 1, in_channels: int = 3) -> int:
    """FLOPs of one eval-mode forward pass of ``batch`` images, counted by ``FlopCounterMode``.

    The input is made on the model's device: build the model on ``meta`` to count for free.
    """
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, in_channels, *size, device=device))
    return counter.get_total_flops()


def saved_activation_bytes(model: nn.Module, size: tuple[int, int], batch: int = MIN_TRAIN_BATCH,
                           in_channels: int = 3) -> int:
    """Bytes of the tensors a training-mode forward saves for backward (parameters excluded).

    Each storage counts once, however many tensors view it or however often it
    is saved. Works on the ``meta`` device (sizes without memory).
    """
    parameters = {id(p.untyped_storage()) for p in model.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}  # values keep the storages (and their ids) alive

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in parameters:
            storages[id(storage)] = storage
        return tensor

    device = next(model.parameters()).device
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(torch.zeros(batch, in_channels, *size, device=device))
    del outputs
    return sum(s.nbytes() for s in storages.values())


def cuda_peak_bytes(model: nn.Module, size: tuple[int, int], batch: int, in_channels: int = 3) -> int:
    """CUDA allocator peak of a training step's forward and backward, above the memory held before it."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, in_channels, *size, device=device)
    model.train()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    sum(v.float().mean() for v in model(x).values()).backward()
    torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) - start


def forward_latency(model: nn.Module, size: tuple[int, int], batch: int, repeats: int,
                    in_channels: int = 3) -> float:
    """Median seconds of an eval-mode forward pass (after one untimed warm-up pass)."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, in_channels, *size, device=device)
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def summarize(config: dict, size: tuple[int, int], batch: int, repeats: int, device: torch.device) -> list[str]:
    """The summary lines of ``config``'s model (validated config, see ``utils.config.load_config``)."""
    from builder import build_model

    meta = _meta_model(lambda: build_model(config, pretrained=False))
    counts = count_parameters(meta)
    in_channels = _in_channels(meta)
    flops = forward_flops(meta, size, batch, in_channels)
    train_batch = max(batch, MIN_TRAIN_BATCH)
    model = build_model(config, pretrained=False).to(device)
    if device.type == "cuda":
        memory, how = cuda_peak_bytes(model, size, train_batch, in_channels), "CUDA allocator peak"
    else:
        memory, how = saved_activation_bytes(model, size, train_batch, in_channels), "tensors saved for backward"
    latency = forward_latency(model, size, batch, repeats, in_channels)
    height, width = size
    return [
        f"model: {config['arch']['type']}  input: {batch}x{in_channels}x{height}x{width}  device: {device}",
        f"parameters: {counts.total:,} total, {counts.trainable:,} trainable "
        f"(backbone {counts.backbone:,}, decoder {counts.decoder:,})",
        f"GFLOPs (forward, batch {batch}): {flops / 1e9:.2f}",
        f"activation memory (training step, batch {train_batch}, {how}): {memory / 2**20:.1f} MiB",
        f"forward latency (eval, batch {batch}, median of {repeats}): {latency * 1e3:.1f} ms",
    ]


def _in_channels(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first.in_channels


@dataclass
class TableRow:
    name: str
    params: int
    flops: int
    activation_bytes: int | None


def table_rows(names: list[str] | None = None, with_memory: bool = True) -> list[TableRow]:
    """One row per registered architecture: default args, 19 classes, one 512x1024 image, on ``meta``.

    Training activations are measured on two images and given per image.
    """
    rows = []
    for name in names or MODELS.names():
        model = _meta_model(lambda: MODELS.build({"type": name, "args": {}}, "arch", num_classes=TABLE_CLASSES))
        memory = (saved_activation_bytes(model, TABLE_SIZE, MIN_TRAIN_BATCH) // MIN_TRAIN_BATCH
                  if with_memory else None)
        rows.append(TableRow(name, count_parameters(model).total, forward_flops(model, TABLE_SIZE), memory))
    return rows


def format_params(count: int) -> str:
    return f"{count / 1e6:.2f}"


def format_flops(flops: int) -> str:
    return f"{flops / 1e9:.1f}"


def table_row(row: TableRow) -> str:
    return (f"| `{row.name}` | {format_params(row.params)} | {format_flops(row.flops)} | "
            f"{row.activation_bytes / 2**20:.0f} |")


def table_markdown(rows: list[TableRow]) -> str:
    """The whole of ``docs/models_table.md``."""
    lines = [generated_note(TABLE_COMMAND), "", "# Models: size and cost", "",
             f"Every registered model with default args, {TABLE_CLASSES} classes, one "
             f"{TABLE_SIZE[0]}x{TABLE_SIZE[1]} image. GFLOPs: an eval forward pass, counted by "
             "`torch.utils.flop_counter` (a multiply-add is 2); training activations: the tensors a "
             "training-mode forward pass saves for backward. Any config's model: `python -m "
             "tools.model_summary -c CONFIG` ([models](models.md#model-summary)).", "", TABLE_HEADER]
    lines += [table_row(r) for r in rows]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see python -m tools.model_summary --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m tools.model_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", help="the config whose model to summarise")
    parser.add_argument("--size", type=int, nargs=2, default=TABLE_SIZE, metavar=("H", "W"),
                        help="input height and width (default 512 1024)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes (median)")
    parser.add_argument("--write-table", metavar="FILE",
                        help=f"write the models table of every registered model to FILE ({TABLE_PATH}) instead")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.write_table is None):
        parser.error("give either -c CONFIG or --write-table FILE")
    if min(args.size) < 1:
        parser.error(f"--size must be two positive integers, got {args.size[0]} {args.size[1]}")
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from utils.config import import_components, load_config

    import_components()
    if args.write_table is not None:
        write_generated(args.write_table, "--write-table", lambda: table_markdown(table_rows()))
        print(f"wrote {args.write_table}")
        return 0
    config = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("\n".join(summarize(config, tuple(args.size), args.batch, args.repeats, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
