"""Training speed and peak memory of every model of the zoo next to the same architecture elsewhere.

    python -m tools.bench.models [--size 512] [--batch-size 2] [--steps 2] [--only DeepLabV3 FCN ...]
                                 [--device cpu|cuda] [--threads N]

Each entry is one SGD step (forward, cross-entropy on ``out``, backward, update) on
random ``batch x 3 x size x size`` images in fp32, timed after one warm-up step:
images/s is ``batch * steps / seconds``. Peers are built in the same run, alternating
with ours: torchvision's ``deeplabv3_resnet50``, ``fcn_resnet50``,
``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large``, and
segmentation-models-pytorch's ``Unet``, ``FPN``, ``PSPNet``, ``DeepLabV3Plus`` and
``UPerNet`` on the same encoder (``DeepLabV3Plus`` twice: smp's default full ASPP
convolutions and, as ours and the paper, separable ones; skipped with a message when smp is not importable;
it is not a runtime requirement). Auxiliary heads are off on both sides.

Every measurement runs in a fresh process, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the growth of the process's peak
resident memory over the step (``ru_maxrss`` minus the resident size once the
model is built). GFLOPs are one image's forward pass (``torch.utils.flop_counter``).
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

NUM_CLASSES = 19

# (row label, our config arch, peer name or None); peers are built by ``build_peer``.
ENTRIES: list[tuple[str, dict, str | None]] = [
    ("DeepLabV3 R50 OS8", {"type": "DeepLabV3", "args": {"backbone": "resnet50"}}, "tv:deeplabv3_resnet50"),
    ("FCN R50 OS8", {"type": "FCN", "args": {"backbone": "resnet50"}}, "tv:fcn_resnet50"),
    ("DeepLabV3 MNv3-L OS16", {"type": "DeepLabV3", "args": {"backbone": "mobilenet_v3_large", "output_stride": 16}},
     "tv:deeplabv3_mobilenet_v3_large"),
    ("DeepLabV3+ MNv3-L OS16 (vs LR-ASPP)",
     {"type": "DeepLabV3Plus", "args": {"backbone": "mobilenet_v3_large", "output_stride": 16}},
     "tv:lraspp_mobilenet_v3_large"),
    ("DeepLabV3+ R50 OS16", {"type": "DeepLabV3Plus", "args": {"backbone": "resnet50"}}, "smp:DeepLabV3Plus"),
    ("DeepLabV3+ R50 OS16 (vs separable)", {"type": "DeepLabV3Plus", "args": {"backbone": "resnet50"}},
     "smp:DeepLabV3Plus-separable"),
    ("UNet R50", {"type": "UNet", "args": {"backbone": "resnet50"}}, "smp:Unet"),
    ("FPN R50", {"type": "FPN", "args": {"backbone": "resnet50"}}, "smp:FPN"),
    ("PSPNet R50 OS8", {"type": "PSPNet", "args": {"backbone": "resnet50", "aux_head": False}}, "smp:PSPNet"),
    ("UPerNet R50", {"type": "UPerNet", "args": {"backbone": "resnet50", "aux_head": False}}, "smp:UPerNet"),
    ("UNet (paper, 64)", {"type": "UNet", "args": {}}, None),
    ("FCN-8s VGG16-BN", {"type": "FCN8s", "args": {}}, None),
    ("GCN R50", {"type": "GCN", "args": {"backbone": "resnet50"}}, None),
    ("DUC-HDC R101", {"type": "DUCHDC", "args": {}}, None),
]


def build_ours(arch: dict):
    from utils.registry import MODELS

    return MODELS.build(arch, "arch", num_classes=NUM_CLASSES)


def build_peer(name: str):
    """A torchvision (``tv:``) or segmentation-models-pytorch (``smp:``) model, random weights."""
    family, model = name.split(":")
    if family == "tv":
        from torchvision.models import segmentation

        return getattr(segmentation, model)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    import segmentation_models_pytorch as smp

    # smp's DeepLabV3Plus defaults to full 3x3 ASPP convolutions; "-separable" is the paper's (and ours).
    model, _, variant = model.partition("-")
    extra = {"DeepLabV3Plus": {"encoder_output_stride": 16, "decoder_aspp_separable": variant == "separable"}}
    return getattr(smp, model)("resnet50", encoder_weights=None, classes=NUM_CLASSES, **extra.get(model, {}))


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def measure(spec: tuple[str, object], size: int, batch: int, steps: int, device: str, threads: int | None,
            queue) -> None:
    """Run in a child process: put ``(images/s, peak MiB, GFLOPs)`` or an error string on ``queue``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        kind, what = spec
        model = (build_ours(what) if kind == "ours" else build_peer(what)).to(device)
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model.eval()(torch.randn(1, 3, size, size, device=device))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)

        def step() -> None:
            out = model(images)
            logits = out["out"] if isinstance(out, dict) else out
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up: allocator, cudnn autotuning, momentum buffers
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        baseline = _rss_kib()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024)
        queue.put((batch * steps / seconds, peak, flops.get_total_flops() / 1e9))
    except Exception as exc:  # report and go on with the other rows
        queue.put(f"{type(exc).__name__}: {exc}")


def run(spec: tuple[str, object], args: argparse.Namespace):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(spec, args.size, args.batch_size, args.steps, args.device,
                                                    args.threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def smp_available() -> bool:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=None, help="rows whose label starts with one of these")
    args = parser.parse_args(argv)
    have_smp = smp_available()
    if not have_smp:
        print("segmentation-models-pytorch is not importable: its rows are skipped "
              "(pip install segmentation-models-pytorch to compare)")
    print(f"{args.batch_size} x 3 x {args.size} x {args.size}, fp32 SGD, {args.device}, {args.steps} timed steps\n")
    print(f"| model | ours img/s | ours peak MiB | ours GFLOPs | peer | peer img/s | peer peak MiB | peer GFLOPs "
          f"| speed ours/peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, arch, peer in ENTRIES:
        if args.only and not any(label.startswith(prefix) for prefix in args.only):
            continue
        ours = run(("ours", arch), args)
        if peer is not None and peer.startswith("smp:") and not have_smp:
            peer = None
        theirs = run(("peer", peer), args) if peer is not None else None
        cells = [label]
        cells += ([f"{ours[0]:.3f}", f"{ours[1]:.0f}", f"{ours[2]:.1f}"] if isinstance(ours, tuple)
                  else [ours, "", ""])
        if theirs is None:
            cells += ["-", "", "", "", ""]
        elif isinstance(theirs, tuple):
            ratio = f"{ours[0] / theirs[0]:.2f}" if isinstance(ours, tuple) else ""
            cells += [peer, f"{theirs[0]:.3f}", f"{theirs[1]:.0f}", f"{theirs[2]:.1f}", ratio]
        else:
            cells += [peer, theirs, "", "", ""]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
