"""Ctrl-C and SIGTERM sent to the whole process group, as a terminal or Slurm does, under every
start method of the data-loading workers, while the workers start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def start_training(config: dict, tmp_path: Path) -> tuple[subprocess.Popen, list[str]]:
    """``train.py`` in its own process group; its stdout lines are collected as they come."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-c", str(path), "--run-dir",
                                str(tmp_path / "run"), "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def wait_for(lines: list[str], text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert process.poll() is None, f"train.py ended early: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no '{text}' in {lines}"
        time.sleep(0.02)


@pytest.mark.parametrize("start_method, signum", [("fork", signal.SIGINT), ("spawn", signal.SIGINT),
                                                   ("forkserver", signal.SIGINT), ("spawn", signal.SIGTERM),
                                                   ("forkserver", signal.SIGTERM)])
def test_signal_to_the_group_while_workers_start_saves_and_resumes(tmp_path, tiny_config, start_method, signum):
    tiny_config["train_loader"]["args"].update(num_workers=2, start_method=start_method)
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    process, lines = start_training(tiny_config, tmp_path)
    try:
        # Printed just before the first epoch starts its workers (which take a second or two to start
        # under spawn and forkserver): the signal reaches every process while they start.
        wait_for(lines, "Input normalisation", process)
        os.killpg(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    assert process.returncode == 130, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Error" not in err, err
    assert f"checkpoint saved to {checkpoint}" in err
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and not state["epoch_done"] and 1 <= state["iteration"] <= 4

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(checkpoint), "--device",
                              "cpu"], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch_done"] and state["finished"] == "last epoch" and len(state["history"]) == 1
