"""Export a trained model to ONNX, torch.export (.pt2) or TorchScript, and check the file against PyTorch.

    python -m tools.export -c CONFIG -m CHECKPOINT --format onnx|pt2|torchscript [-o OUT]
                           [--size H W] [--dynamic] [--input normalized|uint8|float]
                           [--image IMAGE] [--tolerance 1e-3]

The exported graph maps an image batch ``(N, 3, H, W)`` to logits ``(N, K, H, W)``.
``--input`` says what it takes: ``normalized`` (the model's own input: the caller
normalises with the mean/std stored in the file), ``uint8`` (0-255 bytes) or
``float`` (0-1 floats); the last two embed the normalisation. ``--dynamic`` keeps
height and width free (the batch is always free); otherwise the file takes
``--size`` only. The classes, palette, normalisation and input kind are stored in
the file (ONNX metadata ``segmentation`` / the extra file ``meta.json`` of ``.pt2``
and TorchScript), so ``inference.py -m FILE`` needs nothing else.

``pt2`` is the format PyTorch recommends: a ``torch.export`` ExportedProgram
written with ``torch.export.save`` (``--dynamic``: height and width are
``torch.export.Dim.AUTO``, and the ranges the model allows are recorded).
TorchScript (``torch.jit.trace``/``save``) is deprecated in PyTorch and kept for
files that need it.

Verification: the exported file is run (onnxruntime for ONNX, ``torch.export.load``
for ``.pt2``, ``torch.jit.load`` for TorchScript) on a real image, the first of the config's validation set
unless ``--image`` names one, resized to ``--size``, and with ``--dynamic`` also at
another size; the largest logit difference to PyTorch, relative to the largest
logit, must stay below ``--tolerance``. onnxruntime is needed for the check only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from builder import build_dataset, load_trained
from predictor import META_FILE, META_KEY, InputKind, Normalized
from utils.errors import ConfigError, UserError, run_command, user_message
from utils.images import read_image


#: The default suffix of each format's file.
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


class VerificationError(UserError):
    """The exported file's output differs from PyTorch's beyond the tolerance."""


class Logits(nn.Module):
    """``model(x)["out"]``: the plain-tensor output an exported graph needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def export_module(model: nn.Module, meta: dict, input_kind: InputKind) -> nn.Module:
    """The module to export: the model, with the normalisation in front unless ``normalized``."""
    if input_kind == "normalized":
        return Logits(model).eval()
    return Normalized(model, meta["mean"], meta["std"], 255.0 if input_kind == "uint8" else 1.0).eval()


def example_input(image: np.ndarray, meta: dict, input_kind: InputKind) -> torch.Tensor:
    """An RGB ``uint8`` image ``(H, W, 3)`` as the exported graph takes it: ``(1, 3, H, W)``."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].contiguous()
    if input_kind == "uint8":
        return pixels
    if input_kind == "float":
        return pixels.float() / 255.0
    return Normalized(nn.Identity(), meta["mean"], meta["std"]).normalize(pixels)


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """No gradients, quiet tracer warnings, and a tracer that passes through ``max_unpool2d`` (ENet).

    The tracer warns about every Python value it records as a constant;
    :func:`verify` runs the file at a second size instead, which shows a frozen
    shape. The TorchScript-based ONNX exporter and ``torch.jit.trace`` are
    deprecated in favour of ``torch.export``, whose ONNX path needs onnxscript;
    they are used on purpose. PyTorch checks an unpooled size with
    ``torch._check_value``, which raises a TypeError on the tensors the tracer
    gives for sizes; the check (sizes >= 0) always holds for the unpooling of a
    pooling's indices, so it is skipped while tracing.
    """
    original = F._check_unpool_output_size
    F._check_unpool_output_size = lambda output_size, dim: None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        F._check_unpool_output_size = original


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, meta: dict) -> None:
    """Write ``module`` as ONNX (opset 17) with ``meta`` in the file's metadata."""
    try:
        import onnx
    except ImportError:
        raise ConfigError("--format onnx needs the onnx package (pip install onnx onnxruntime)") from None

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    try:
        with _tracing():
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = str(exc).strip().splitlines()[0][:300]
        raise ConfigError(f"--format onnx: this model cannot be written as ONNX{' with --dynamic' * dynamic} "
                          f"({reason}); use {'no --dynamic or ' * dynamic}--format torchscript") from None
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {META_KEY: json.dumps(meta)})
    onnx.save(graph, str(path))


def export_pt2(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, meta: dict) -> None:
    """Export ``module`` with ``torch.export`` and save the program with ``meta`` as the extra file ``meta.json``.

    The batch is always free, and height and width with ``dynamic``
    (``Dim.AUTO``: torch.export records the range of sizes the model allows).
    """
    # A batch of one would be specialised to 1: export with two copies of the example.
    batch = example.expand(2, *example.shape[1:]).contiguous()
    dims = {0: torch.export.Dim.AUTO}
    if dynamic:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    try:
        with _tracing():
            program = torch.export.export(module, (batch,), dynamic_shapes=({**dims},))
    except Exception as exc:  # torch.export raises many error types for what it cannot capture
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--format pt2: torch.export cannot capture this model{' with --dynamic' * dynamic} "
                          f"({reason}); use {'no --dynamic or ' * dynamic}--format onnx") from None
    torch.export.save(program, str(path), extra_files={META_FILE: json.dumps(meta)})


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """Trace ``module`` and save it with ``meta`` as the extra file ``meta.json``."""
    with _tracing():
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})


def run_exported(path: Path, file_format: str, example: torch.Tensor) -> np.ndarray:
    """The logits of the exported file for ``example``."""
    if file_format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("verifying an ONNX file needs onnxruntime (pip install onnxruntime)") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        if file_format == "pt2":
            return torch.export.load(str(path)).module()(example).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; said once in run()
            return torch.jit.load(str(path)).eval()(example).numpy()


def verify(module: nn.Module, path: Path, file_format: str, image: np.ndarray, meta: dict,
           sizes: list[tuple[int, int]], tolerance: float) -> list[dict]:
    """Compare the exported file with PyTorch on ``image`` resized to each of ``sizes``.

    Returns:
        One ``{"size", "max_abs_diff", "relative_diff", "argmax_agreement"}`` per size.

    Raises:
        VerificationError: when a relative difference exceeds ``tolerance``.
    """
    checks = []
    for height, width in sizes:
        resized = image if image.shape[:2] == (height, width) else cv2.resize(
            image, (width, height), interpolation=cv2.INTER_LINEAR)
        example = example_input(resized, meta, meta["input"])
        with torch.no_grad():
            expected = module(example).numpy()
        try:
            got = run_exported(path, file_format, example)
        except Exception as exc:  # onnxruntime, torch.export and TorchScript raise their own error types
            raise VerificationError(f"{path}: the exported file fails at {height}x{width} "
                                    f"({str(exc).strip().splitlines()[-1][:300]}); a size recorded while "
                                    "tracing does not generalise: export without --dynamic at the size you "
                                    "need") from None
        if got.shape != expected.shape:
            raise VerificationError(f"{path}: at {height}x{width} the file gives logits of shape {got.shape}, "
                                    f"PyTorch {expected.shape}")
        diff = float(np.abs(got - expected).max())
        relative = diff / max(1.0, float(np.abs(expected).max()))
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        checks.append({"size": [height, width], "max_abs_diff": diff, "relative_diff": relative,
                       "argmax_agreement": agreement})
        if relative > tolerance:
            raise VerificationError(f"{path}: at {height}x{width} the exported logits differ from PyTorch's by "
                                    f"{diff:.3g} ({relative:.3g} of the largest logit, tolerance {tolerance:g})")
    return checks


def verification_image(config: dict, image_path: str | None) -> tuple[np.ndarray, str]:
    """``--image``, else the first image of the config's validation (or training) set."""
    if image_path is not None:
        return read_image(image_path), image_path
    key = "val_loader" if config["val_loader"] is not None else "train_loader"
    try:
        dataset = build_dataset(config, key, transforms=False)
    except UserError as exc:
        raise ConfigError(f"no --image given and the config's {key} cannot be read ({user_message(exc)}); "
                          "pass an image to verify with --image") from None
    return dataset.load_image(0), dataset.sample_name(0)


def export(config_path: str | None, checkpoint_path: str, file_format: str, output: Path,
           size: tuple[int, int], dynamic: bool, input_kind: InputKind, image_path: str | None,
           tolerance: float) -> list[dict]:
    """Export, then verify; returns the verification checks (see :func:`verify`)."""
    model, meta, config, _ = load_trained(config_path, checkpoint_path)
    meta = {**meta, "input": input_kind, "dynamic": dynamic, "size": list(size)}
    module = export_module(model, meta, input_kind)
    image, image_name = verification_image(config, image_path)
    example = example_input(cv2.resize(image, (size[1], size[0])), meta, input_kind)
    output.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "onnx":
        export_onnx(module, example, output, dynamic, meta)
    elif file_format == "pt2":
        export_pt2(module, example, output, dynamic, meta)
    else:
        export_torchscript(module, example, output, meta)
    # At a second size a shape frozen by tracing shows; +32/+64 keeps the multiples of 32 that some
    # models need (see docs/export.md).
    sizes = [size] + ([(size[0] + 32, size[1] + 64)] if dynamic else [])
    checks = verify(module, output, file_format, image, meta, sizes, tolerance)
    for check in checks:
        print(f"verified on {image_name} at {check['size'][0]}x{check['size'][1]}: max |logit difference| "
              f"{check['max_abs_diff']:.2e} ({check['relative_diff']:.2e} of the largest logit), "
              f"argmax agrees on {100 * check['argmax_agreement']:.3f}% of pixels")
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.export",
                                     description="Export a trained model to ONNX, torch.export (.pt2) or "
                                                 "TorchScript and verify it.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in the checkpoint)")
    parser.add_argument("-m", "--model", required=True, help="checkpoint (best_model.pth or checkpoint.pth)")
    parser.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"),
                        help="onnx, pt2 (torch.export, what PyTorch recommends) or torchscript (deprecated)")
    parser.add_argument("-o", "--output", help="file to write (default: beside the checkpoint, .onnx, .pt2 or .pt)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(512, 512),
                        help="example input size (the only size without --dynamic)")
    parser.add_argument("--dynamic", action="store_true", help="free height and width")
    parser.add_argument("--input", choices=("normalized", "uint8", "float"), default="normalized",
                        help="what the exported graph takes (uint8 and float embed the normalisation)")
    parser.add_argument("--image", help="image to verify with (default: the config's first validation image)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest logit difference to PyTorch, relative to the largest logit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 when verification fails, 2 on bad input)."""
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Export and verify as ``args`` says; returns the exit code (1 when verification fails)."""
    output = Path(args.output) if args.output else Path(args.model).with_suffix(SUFFIXES[args.format])
    if args.format == "torchscript":
        print("note: TorchScript (torch.jit.trace/save/load) is deprecated in PyTorch; --format pt2 writes "
              "a torch.export program, its successor", file=sys.stderr)
    if min(args.size) < 1:
        raise ConfigError(f"--size {args.size[0]} {args.size[1]}: expected a positive height and width")
    try:
        export(args.config, args.model, args.format, output, tuple(args.size), args.dynamic, args.input,
               args.image, args.tolerance)
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
