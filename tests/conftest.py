"""Shared fixtures: a tiny but complete training configuration."""
from __future__ import annotations

import copy
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CAMVID_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"

TINY_CONFIG = {
    "name": "tiny",
    "seed": 7,
    "arch": {"type": "UNet", "args": {"base_channels": 4, "depth": 2}},
    "train_loader": {"type": "SyntheticShapes", "args": {
        "split": "train", "num_samples": 24, "image_size": 32, "batch_size": 6, "shuffle": True,
        "transforms": [{"type": "RandomScale", "args": {"min_scale": 0.8, "max_scale": 1.25}},
                       {"type": "RandomCrop", "args": {"size": 32}},
                       {"type": "RandomHorizontalFlip"}]}},
    "val_loader": {"type": "SyntheticShapes", "args": {
        "split": "val", "num_samples": 8, "image_size": 32, "batch_size": 4}},
    "optimizer": {"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9}},
    "loss": "CrossEntropyLoss",
    "lr_scheduler": {"type": "Poly", "args": {"power": 0.9}},
    "trainer": {"epochs": 2, "save_dir": "saved", "monitor": "max mIoU", "tensorboard": False,
                "progress_bar": False, "log_per_iter": 1},
}


@pytest.fixture(autouse=True)
def no_worker_left_running():
    """Fails the test that leaves a child process (a data-loading worker) running: such a process
    outlives the test, and one that blocks SIGTERM once made pytest wait for ever at exit."""
    before = set(multiprocessing.active_children())
    yield
    left = [p for p in multiprocessing.active_children() if p not in before]
    for process in left:
        process.kill()
        process.join()
    assert not left, f"the test left {len(left)} child process(es) running: {left}"


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of a config that trains a 4-channel UNet on 24 synthetic images."""
    return copy.deepcopy(TINY_CONFIG)


ROOT = Path(__file__).resolve().parents[1]

# Registers the test's model without batch norm in every process, and can stop rank 0 on its n-th step.
TORCHRUN_DRIVER = """
import signal, sys
import torch
sys.path[:0] = [{root!r}, {tests!r}]
import train
from test_training_tools import NO_BN, NoBatchNormNet
from utils.registry import MODELS

MODELS.register(NoBatchNormNet, name=NO_BN)
stop_at = int(sys.argv[1])
if stop_at:
    build = train.build_trainer
    def build_and_hook(*args, **kwargs):
        trainer = build(*args, **kwargs)
        if torch.distributed.get_rank() == 0:
            loss, calls = trainer.loss, []
            def hooked(logits, target):
                if torch.is_grad_enabled():
                    calls.append(1)
                    if len(calls) == stop_at:
                        signal.raise_signal(signal.SIGINT)
                return loss(logits, target)
            trainer.loss = hooked
        return trainer
    train.build_trainer = build_and_hook
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """``launch(stop_at, *train_args)``: train.py under torchrun with 2 Gloo processes; rank 0 raises
    SIGINT on its ``stop_at``-th training step (0: never)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    folder = tmp_path_factory.mktemp("torchrun")
    driver = folder / "driver.py"
    driver.write_text(TORCHRUN_DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(stop_at: int, *args: str, device: str = "cpu") -> subprocess.CompletedProcess:
        return subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(driver), str(stop_at),
                               *args, "--device", device], capture_output=True, text=True, cwd=folder, env=env,
                              timeout=300)
    return run
