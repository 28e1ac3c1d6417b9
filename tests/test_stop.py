"""Ctrl-C and SIGTERM sent to the whole process group, as a terminal or Slurm does, under every
start method of the data-loading workers, while the workers start; how soon a stop request is acted
on (after the iteration under way, whatever log_per_iter; under torchrun within about a second);
a second Ctrl-C."""
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
from test_trainer import LossHook, make_trainer

from base.base_trainer import FORCE_QUIT_AFTER, TrainingInterrupted

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
        # Printed once the stop handlers are in place, just before the first epoch starts its workers
        # (which take a second or two to start under spawn and forkserver): the signal reaches every
        # process while they start. (An earlier line could come before the handlers.)
        wait_for(lines, "Run folder:", process)
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
    # Iteration 0 when the signal came while the loop waited for the first batch, which it leaves at once.
    assert state["epoch"] == 1 and not state["epoch_done"] and 0 <= state["iteration"] <= 4

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(checkpoint), "--device",
                              "cpu"], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch_done"] and state["finished"] == "last epoch" and len(state["history"]) == 1


# --- how soon a stop request is acted on ------------------------------------------------------------
# train.py whose training loss prints "training call N" (rank 0) and sleeps: argv[1] seconds per call,
# argv[2] seconds more on call argv[3]; with argv[4] > 0, rank 0 raises SIGINT on that call.
SLOW_DRIVER = """
import os, signal, sys, time
import torch
sys.path[:0] = [{root!r}]
import train


def build_and_hook(*args, **kwargs):
    delay, extra, extra_at, signal_at = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    trainer = build(*args, **kwargs)
    loss, calls = trainer.loss, []
    rank0 = os.environ.get("RANK", "0") == "0"
    def hooked(logits, target):
        if torch.is_grad_enabled():
            calls.append(1)
            if rank0:
                print(f"training call {{len(calls)}}", flush=True)
                if len(calls) == signal_at:
                    signal.raise_signal(signal.SIGINT)
            time.sleep(delay + (extra if len(calls) == extra_at else 0.0))
        return loss(logits, target)
    trainer.loss = hooked
    return trainer


if __name__ == "__main__":  # not when forkserver or spawn workers import it
    build, train.build_trainer = train.build_trainer, build_and_hook
    sys.exit(train.main(sys.argv[5:]))
"""


def write_driver(tmp_path: Path) -> Path:
    driver = tmp_path / "slow_driver.py"
    driver.write_text(SLOW_DRIVER.format(root=str(ROOT)))
    return driver


def start_slow_training(config: dict, tmp_path: Path, delay: float, extra: float = 0.0, extra_at: int = 0
                        ) -> tuple[subprocess.Popen, list[str]]:
    """Like :func:`start_training`, with a training loss that sleeps ``delay`` s per call and prints its calls."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(write_driver(tmp_path)), str(delay), str(extra), str(extra_at),
                                "0", "-c", str(path), "--run-dir", str(tmp_path / "run"), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                               start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    process.reader = reader
    return process, lines


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Wait for the end of a run of :func:`start_slow_training` and its last lines; its stderr."""
    process.wait(timeout=timeout)
    process.reader.join(timeout=10)
    return process.stderr.read()


def last_call(lines: list[str]) -> int:
    return max(int(line.split()[-1]) for line in list(lines) if line.startswith("training call"))


def long_epoch(config: dict, log_per_iter: int = 1000) -> dict:
    """48 training images in batches of 2: 24 iterations per epoch, checks far apart."""
    config["train_loader"]["args"].update(num_samples=48, batch_size=2)
    config["trainer"].update(epochs=1, log_per_iter=log_per_iter)
    return config


@pytest.mark.parametrize("accumulate, saved", [(1, 6), (4, 8)])
def test_one_process_stops_after_the_iteration_of_the_signal_not_at_the_next_check(tiny_config, tmp_path,
                                                                                   accumulate, saved):
    """The request is read after every optimizer step (with accumulation, at the end of the group)."""
    trainer = make_trainer(long_epoch(tiny_config) | {"trainer": {**tiny_config["trainer"],
                                                                    "accumulate_steps": accumulate}},
                           tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 6, "sigterm")  # during iteration 6 of 24; log_per_iter 1000
    with pytest.raises(TrainingInterrupted, match=f"interrupted at epoch 1, iteration {saved};"):
        trainer.train()
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["iteration"], state["epoch_done"]) == (1, saved, False)
    assert state["partial"]["count"] == saved  # the losses since the last check are counted
    assert trainer.lr_scheduler.last_epoch == saved // accumulate


def test_a_stop_while_waiting_for_a_batch_does_not_wait_for_it(tiny_config, tmp_path, monkeypatch):
    """The loader is slow (here a sample that takes a minute, loaded in this process): the loop leaves
    the wait at once and saves the iterations done, without the batch."""
    trainer = make_trainer(long_epoch(tiny_config), tmp_path / "run")
    dataset_type, calls = type(trainer.train_loader.dataset), []
    load = dataset_type.__getitem__

    def slow(self, item):
        calls.append(item)
        if len(calls) == 11:  # the first sample of batch 6
            signal.raise_signal(signal.SIGTERM)
            time.sleep(60)
        return load(self, item)

    monkeypatch.setattr(dataset_type, "__getitem__", slow)
    started = time.monotonic()
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 1, iteration 5;"):
        trainer.train()
    assert time.monotonic() - started < 30
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (state["iteration"], state["partial"]["count"]) == (5, 5)


def test_sigterm_to_the_group_saves_the_iteration_it_arrived_in(tmp_path, tiny_config):
    """The issue's run: forkserver workers, checks every 1000 iterations, a real SIGTERM to the group."""
    long_epoch(tiny_config)
    tiny_config["train_loader"]["args"].update(num_workers=2, start_method="forkserver")
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    process, lines = start_slow_training(tiny_config, tmp_path, delay=0.3)
    try:
        wait_for(lines, "training call 4", process)
        os.killpg(process.pid, signal.SIGTERM)
        arrived = last_call(lines)  # the iteration running when the signal arrived (or the one before)
        err = finish(process, 120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert any("SIGTERM: stopping after this iteration" in line for line in lines), lines
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert arrived <= state["iteration"] <= arrived + 1 < 24, (arrived, state["iteration"])


def test_a_second_ctrl_c_quits_at_once_with_one_line(tmp_path, tiny_config):
    long_epoch(tiny_config)
    tiny_config["train_loader"]["args"].update(num_workers=2)
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    process, lines = start_slow_training(tiny_config, tmp_path, delay=0.05, extra=60, extra_at=3)
    try:
        wait_for(lines, "training call 3", process)  # an iteration of a minute: the first Ctrl-C waits
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(FORCE_QUIT_AFTER + 0.5)
        assert process.poll() is None, process.stderr.read()
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        err = finish(process, 30)
        quit_s = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    assert quit_s < 15, quit_s
    assert [line for line in lines if "quitting" in line] == ["SIGINT again: quitting without saving\n"], lines
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_torchrun_processes_agree_every_second_of_training_not_every_iteration(monkeypatch):
    """The agreements (collectives) come about every STOP_AGREEMENT_SECONDS of training, at the same
    iterations on every process: their next one follows from the slowest process's time."""
    import trainer as trainer_module

    clock, agreements = [0.0], []

    def agree(flags, values, device):  # rank 0's view; the other process is 1.5x slower
        agreements.append(iteration)
        return flags, [max(values[0], 1.5 * 0.1)]

    monkeypatch.setattr(trainer_module.distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(trainer_module.distributed, "any_process_and_max", agree)
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    stops = trainer_module.StopSchedule(log_per_iter=1000, seconds=1.0)
    stops.start(0)
    stopped_at = None
    for iteration in range(1, 101):
        clock[0] += 0.1  # rank 0: 0.1 s per iteration
        if stops.due(iteration) and stops.agree(iteration >= 50, iteration, torch.device("cpu")):
            stopped_at = iteration
            break
    assert agreements[:4] == [1, 7, 13, 19]  # then every 1 s / 0.15 s = 6 iterations
    assert stopped_at == 55  # asked during iteration 50
    assert trainer_module.StopSchedule(log_per_iter=4, seconds=1.0).limit == 4  # never rarer than the log checks


@pytest.mark.slow
def test_torchrun_processes_agree_on_a_stop_within_about_a_second(tmp_path, tiny_config):
    """Rank 0 alone is signalled on its 20th call; iterations of at least 0.1 s: the processes agree
    at most ~10 iterations later (1 s of training), not at the check every 1000 iterations."""
    long_epoch(tiny_config)
    tiny_config["train_loader"]["args"]["num_samples"] = 160  # 2 ranks x batch 2: 40 iterations per epoch
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(write_driver(tmp_path)),
                             "0.1", "0", "0", "20", "-c", str(config), "--run-dir", str(tmp_path / "run"),
                             "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)
    assert "Resume with: torchrun --nproc_per_node=2" in result.stderr, result.stderr
    assert "SIGINT: stopping within about 1 s of training, where all processes agree," in result.stdout
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["epoch_done"]) == (1, False)
    assert 20 <= state["iteration"] <= 31, state["iteration"]
