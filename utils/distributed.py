"""Helpers that make single-process code correct under ``torchrun``.

With one process every helper is a no-op, so the trainer calls them
unconditionally.
"""
from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from utils.errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(device: torch.device) -> None:
    """Join the process group that ``torchrun`` describes in the environment."""
    if not launched_by_torchrun() or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any process (a collective: every process calls it)."""
    if not is_distributed():
        return list(flags)
    values = all_reduce_sum(torch.tensor([float(f) for f in flags], device=device))
    return [bool(v > 0) for v in values.tolist()]


def any_process_and_max(flags: list[bool], values: list[float], device: torch.device
                        ) -> tuple[list[bool], list[float]]:
    """Whether each flag is true on any process, and each value's largest over all processes.

    One collective (every process calls it): the maximum of 0/1 flags says whether any is set.
    """
    if not is_distributed():
        return list(flags), list(values)
    reduced = torch.tensor([float(f) for f in flags] + [float(v) for v in values], dtype=torch.float64,
                           device=device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    result = reduced.tolist()
    return [v > 0 for v in result[:len(flags)]], result[len(flags):]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every process."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def select_device(name: str | None) -> torch.device:
    """``cuda`` when available unless ``name`` says otherwise; under torchrun, the local GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if launched_by_torchrun():
            if name != "cuda":
                raise ConfigError(f"--device {name}: under torchrun each process takes the GPU of its "
                                  "LOCAL_RANK; use --device cuda")
            name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)
