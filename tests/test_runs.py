"""The foundation's edges: finished runs, TensorBoard on interrupt, suggested commands, slim best
models, image decoding, input normalisation, the loader's GPU-friendly defaults and host syncs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train
from base.base_dataloader import BaseDataLoader
from utils.images import read_image
from base.base_trainer import TrainingInterrupted
from builder import build_loader, gives_fixed_size
from utils.checkpoint import load_checkpoint
from utils.config import validate_config
from utils.registry import TRANSFORMS

from test_trainer import LossHook, make_trainer



def write_config(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


# --- finished runs ------------------------------------------------------------------------------
def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(run_dir)]) == 0
    checkpoint = run_dir / "checkpoint.pth"
    before = checkpoint.read_bytes()
    capsys.readouterr()

    assert train.main(["--resume", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "the run already finished (last epoch at epoch 2 of 2); nothing to resume" in out
    assert "--set trainer.epochs=N (N > 2)" in out
    assert checkpoint.read_bytes() == before  # not retrained, not rewritten

    # Raising the epochs trains the one more epoch.
    assert train.main(["--resume", str(checkpoint), "--set", "trainer.epochs=3"]) == 0
    state = load_checkpoint(checkpoint)
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3] and state["finished"] == "last epoch"


def test_an_early_stopped_run_is_finished_too():
    state = {"finished": "early stop", "epoch": 4, "config": {"trainer": {"epochs": 10}}}
    message = train.finished_message(state, {"trainer": {"epochs": 10}}, "run/checkpoint.pth")
    assert message.startswith("run/checkpoint.pth: the run already finished (early stop at epoch 4 of 10)")
    assert train.finished_message(state, {"trainer": {"epochs": 11}}, "run/checkpoint.pth") is None
    assert train.finished_message({**state, "finished": None}, {"trainer": {"epochs": 10}}, "x") is None


# --- TensorBoard sees completed epochs only -------------------------------------------------------
class ValidationStop(torch.nn.Module):
    """Sends SIGINT on the n-th validation call of the loss: the stop lands inside a validation."""

    def __init__(self, loss: torch.nn.Module, at_call: int) -> None:
        super().__init__()
        self.loss, self.at_call, self.calls = loss, at_call, 0

    def forward(self, logits, target):
        if not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at_call:
                import signal
                signal.raise_signal(signal.SIGINT)
        return self.loss(logits, target)


def scalar_steps(folder: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events_file in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in events.Scalars(tag))
    return steps


def test_an_interrupted_epoch_reaches_tensorboard_once_complete(tiny_config, tmp_path):
    tiny_config["trainer"].update(tensorboard=True, epochs=2)
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = ValidationStop(trainer.loss, 1)  # the first validation batch of epoch 1
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    steps = scalar_steps(tmp_path / "run" / "tensorboard")
    assert not [tag for tag in steps if tag.startswith("val/") or tag == "train/epoch_loss"], steps
    assert steps["train/loss"] == [1, 2, 3, 4]  # the per-iteration losses are final already

    resumed = make_trainer(tiny_config, tmp_path / "run")
    resumed.resume(tmp_path / "run" / "checkpoint.pth")
    resumed.train()
    steps = scalar_steps(tmp_path / "run" / "tensorboard")
    assert steps["train/epoch_loss"] == [1, 2] and steps["val/mIoU"] == [1, 2]  # each epoch once
    assert steps["train/loss"] == list(range(1, 9))


# --- commands the CLI suggests --------------------------------------------------------------------
def test_the_resume_command_is_the_one_that_was_used(monkeypatch):
    args = train.parse_args(["-c", "config.json", "--device", "cpu"])
    checkpoint = Path("saved/run/checkpoint.pth")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.resume_command(checkpoint, args) == f"python train.py --resume {checkpoint} --device cpu"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert train.resume_command(checkpoint, args) == (
        f"torchrun --nproc_per_node=4 train.py --resume {checkpoint} --device cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert train.resume_command(checkpoint, args).startswith("torchrun --nproc_per_node=2 --nnodes=2 ")


def test_n_gpu_above_one_names_the_torchrun_command(tmp_path, tiny_config, capsys):
    tiny_config["n_gpu"] = 2
    config_path = write_config(tmp_path, tiny_config)
    assert train.main(["-c", config_path, "--set", "trainer.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: n_gpu is 2 but this is a single process: run torchrun --nproc_per_node=2 "
                   f"train.py -c {config_path} --set trainer.epochs=1 (or set n_gpu to 1)")
    assert not (tmp_path / "saved").exists()  # stopped before anything was written


# --- run files ------------------------------------------------------------------------------------
def test_best_model_holds_what_inference_and_fine_tuning_need(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(run_dir)]) == 0
    best = torch.load(run_dir / "best_model.pth", weights_only=True)
    assert set(best) == {"arch", "num_classes", "meta", "model", "config", "epoch", "monitor", "metrics"}
    full = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert {"optimizer", "lr_scheduler", "rng", "history"} <= set(full)
    assert (run_dir / "best_model.pth").stat().st_size < (run_dir / "checkpoint.pth").stat().st_size
    assert best["metrics"]["mIoU"] == max(row["mIoU"] for row in full["history"])
    # Inference runs from it alone.
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((32, 32, 3), np.uint8))
    assert inference.main(["-m", str(run_dir / "best_model.pth"), "-i", str(images), "-o",
                           str(tmp_path / "out"), "--device", "cpu"]) == 0


def test_inference_keeps_images_that_share_a_stem(tmp_path, trained_run):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "a.jpg"), np.full((32, 40, 3), 200, np.uint8))
    cv2.imwrite(str(images / "b.png"), np.zeros((32, 32, 3), np.uint8))
    out = tmp_path / "out"
    assert inference.main(["-m", str(trained_run), "-i", str(images), "-o", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a.jpg.png", "a.jpg_overlay.png", "a.png.png", "a.png_overlay.png", "b.png", "b_overlay.png"]
    assert Image.open(out / "a.jpg.png").size == (40, 32) and Image.open(out / "a.png.png").size == (32, 32)


@pytest.fixture
def trained_run(tmp_path_factory, tiny_config) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    tiny_config["trainer"]["epochs"] = 1
    assert train.main(["-c", write_config(run_dir.parent, tiny_config), "--run-dir", str(run_dir)]) == 0
    return run_dir / "checkpoint.pth"


# --- decoding -------------------------------------------------------------------------------------
def test_the_exif_orientation_of_a_jpeg_is_ignored_like_a_labels(tmp_path):
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    # OpenCV's default decoding would apply the rotation: the red half would move to the top.
    assert cv2.imread(str(path))[:32, :, 2].mean() > 200 and cv2.imread(str(path))[32:, :, 2].mean() < 50
    image = read_image(path)
    assert image[:, :32, 0].mean() > 240 and image[:, 32:, 0].mean() < 15  # the stored grid, RGB


# --- input normalisation ---------------------------------------------------------------------------
def test_the_input_normalisation_follows_the_encoders_pretraining(tmp_path, tiny_config, capsys):
    from torchvision.models import resnet18

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    tiny_config["trainer"]["epochs"] = 1
    tiny_config["arch"] = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18", "pretrained": True,
                                                             "weights_path": str(weights)}}
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(tmp_path / "pre")]) == 0
    assert ("Input normalisation: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) "
            "(the pretrained encoder's)") in capsys.readouterr().out
    meta = load_checkpoint(tmp_path / "pre" / "checkpoint.pth")["meta"]
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]

    tiny_config["arch"]["args"].update(pretrained=False, weights_path=None)
    assert train.main(["-c", write_config(tmp_path, tiny_config), "--run-dir", str(tmp_path / "scratch")]) == 0
    assert ("Input normalisation: mean (0.500, 0.500, 0.500), std (0.250, 0.250, 0.250) "
            "(the data set's (SyntheticShapes))") in capsys.readouterr().out


# --- a loop that suits a GPU ------------------------------------------------------------------------
def test_pin_memory_defaults_to_the_device(tiny_config):
    config = validate_config(tiny_config)
    assert build_loader(config, "train_loader", torch.device("cuda")).pin_memory is True
    assert build_loader(config, "train_loader", torch.device("cpu")).pin_memory is False
    tiny_config["train_loader"]["args"]["pin_memory"] = False
    assert build_loader(validate_config(tiny_config), "train_loader", torch.device("cuda")).pin_memory is False


def test_cudnn_benchmark_only_for_fixed_size_training():
    def built(*specs):
        return [TRANSFORMS.build(spec, "t", ignore_index=255) for spec in specs]

    crop = {"type": "RandomCrop", "args": {"size": 32}}
    scale = {"type": "RandomScale", "args": {"min_scale": 0.5, "max_scale": 2.0}}
    assert gives_fixed_size(built(scale, crop, "RandomHorizontalFlip"))
    assert not gives_fixed_size(built(crop, scale))  # the scale after the crop changes the size again
    assert not gives_fixed_size(built("RandomHorizontalFlip"))  # the data set's own sizes


class ThreadCount(torch.utils.data.Dataset):
    """Reports OpenCV's thread count inside the loading process."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, item):
        count = torch.tensor([[cv2.getNumThreads()]])
        return count, count


@pytest.mark.parametrize("workers", [0, 1])
def test_workers_leave_parallelism_to_the_workers(workers):
    loader = BaseDataLoader(ThreadCount(), batch_size=2, num_workers=workers, start_method="fork")
    loader.set_epoch(1)
    counts, _ = next(iter(loader))
    loader.shutdown()
    if workers:  # cv2.setNumThreads(0) in every worker: OpenCV then runs sequentially (1 thread)
        assert counts.flatten().tolist() == [1, 1]
    else:  # the main process keeps its own setting
        assert counts.flatten().tolist() == [cv2.getNumThreads()] * 2


# The worker gets stuck in the second batch (image 2 never loads) while the script ends with the loader
# alive. The data set receives (epoch, index) pairs.
STUCK_WORKER_SCRIPT = """
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
from base.base_dataloader import BaseDataLoader

FLAG = Path({flag!r})

class Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, item):
        if item[1] == 2:
            FLAG.touch()
            time.sleep(3600)
        return torch.zeros(1), torch.zeros(1)

loader = BaseDataLoader(Stuck(), batch_size=2, num_workers=1, start_method="fork")
loader.set_epoch(1)
batches = iter(loader)
next(batches)  # the worker goes on to the second batch
deadline = time.monotonic() + 60
while not FLAG.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print("stuck" if FLAG.exists() else "not stuck", flush=True)
"""


def test_the_interpreter_exits_with_a_live_loader_and_a_stuck_worker(tmp_path):
    """Workers block SIGTERM, so multiprocessing's exit hook (terminate, then join) would wait for
    ever; the loader's own exit hook asks them to stop and kills the one that cannot (after
    torch's two 5 s waits)."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_WORKER_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]),
                                                 flag=str(tmp_path / "stuck")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stuck\n"


def test_shutdown_stops_the_workers_while_the_iterator_is_still_referenced():
    loader = BaseDataLoader(ThreadCount(), batch_size=1, num_workers=2, start_method="fork")
    loader.set_epoch(1)
    batches = iter(loader)  # held here, as a traceback or a suspended generator would hold it
    next(batches)
    workers = list(batches._workers)
    assert all(w.is_alive() for w in workers)
    loader.shutdown()
    assert not any(w.is_alive() for w in workers)
    loader.set_epoch(2)
    assert len(list(loader)) == 2  # the loader starts new workers when it is used again
    loader.shutdown()


def test_the_loss_is_read_on_the_host_every_log_per_iter(tiny_config, tmp_path, monkeypatch):
    import trainer as trainer_module

    reads = []
    original = trainer_module.LossWindow.read
    monkeypatch.setattr(trainer_module.LossWindow, "read", lambda self: reads.append(self.count) or original(self))
    tiny_config["trainer"].update(log_per_iter=3, epochs=1)  # 4 iterations: checks after 3 and at the end
    make_trainer(tiny_config, tmp_path / "run").train()
    assert reads == [3, 1]


def test_a_nan_between_checks_is_reported_with_its_iteration(tiny_config, tmp_path):
    from utils.errors import TrainingError

    tiny_config["trainer"].update(log_per_iter=4)
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 6, "nan")  # epoch 2, iteration 2; checked at iteration 4
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, iteration 2; stopped"):
        trainer.train()


# --- torchrun: a mid-epoch resume keeps every rank's share of the epoch's loss -----------------------
@pytest.mark.slow
def test_torchrun_mid_epoch_resume_keeps_the_epoch_loss(tmp_path, tiny_config, launch):
    tiny_config["trainer"].update(epochs=2, save_dir=str(tmp_path / "saved"))
    tiny_config["train_loader"]["args"]["batch_size"] = 2  # 6 iterations per epoch on each of 2 ranks
    config_path = write_config(tmp_path, tiny_config)
    straight = launch(0, "-c", config_path, "--run-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    # Rank 0 asks to stop on its 3rd training step; all ranks agree.
    stopped = launch(3, "-c", config_path, "--run-dir", str(tmp_path / "stopped"))
    assert "Resume with: torchrun --nproc_per_node=2" in stopped.stderr, stopped.stderr
    state = load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")
    assert (state["epoch"], state["iteration"], state["epoch_done"]) == (1, 3, False)
    resumed = launch(0, "--resume", str(tmp_path / "stopped" / "checkpoint.pth"))
    assert resumed.returncode == 0, resumed.stderr

    history = [load_checkpoint(tmp_path / run / "checkpoint.pth")["history"] for run in ("straight", "stopped")]
    for key in ("train_loss", "val_loss", "mIoU"):
        assert [row[key] for row in history[1]] == pytest.approx([row[key] for row in history[0]], rel=1e-6)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("straight", "stopped")]
    assert summaries[1]["last_metrics"]["train_loss"] == pytest.approx(summaries[0]["last_metrics"]["train_loss"],
                                                                       rel=1e-6)


def test_normalising_a_float_batch_leaves_it_unchanged():
    from utils.images import normalize_batch

    images = torch.rand(2, 4, 5, 3) * 255
    before = images.clone()
    out = normalize_batch(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(images, before)
    assert torch.allclose(out, (before.permute(0, 3, 1, 2) / 255 - 0.5) / 0.25, atol=1e-6)
