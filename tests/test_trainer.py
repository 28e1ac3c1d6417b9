"""The training loop: exact resume, checkpoints, Ctrl-C, NaN, early stop and run outputs."""
from __future__ import annotations

import csv
import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import builder
from base.base_trainer import TrainingInterrupted
from utils.checkpoint import load_checkpoint, save_atomic
from utils.config import validate_config
from utils.errors import CheckpointError, ConfigError, TrainingError


def make_trainer(config: dict, run_dir: Path):
    resolved = validate_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    return builder.build_trainer(resolved, torch.device("cpu"), run_dir)


class LossHook(nn.Module):
    """Wraps the real loss and acts on its n-th training call (1-based)."""

    def __init__(self, loss: nn.Module, at_call: int, action: str) -> None:
        super().__init__()
        self.loss, self.at_call, self.action, self.calls = loss, at_call, action, 0

    def forward(self, logits, target):
        value = self.loss(logits, target)
        if torch.is_grad_enabled():  # training, not validation
            self.calls += 1
            if self.calls == self.at_call:
                if self.action in ("sigint", "sigterm"):
                    signal.raise_signal(signal.SIGINT if self.action == "sigint" else signal.SIGTERM)
                elif self.action == "nan":
                    value = value * float("nan")
        return value


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def interrupt_then_resume(config: dict, tmp_path: Path, at_call: int, action: str = "sigint"):
    """Run with a Ctrl-C (or SIGTERM) on training call ``at_call``; resume in a fresh trainer."""
    first = make_trainer(config, tmp_path / "interrupted")
    first.loss = LossHook(first.loss, at_call, action)
    with pytest.raises(TrainingInterrupted) as info:
        first.train()
    second = make_trainer(config, tmp_path / "interrupted")
    second.resume(info.value.checkpoint)
    summary = second.train()
    return second, summary, info.value.checkpoint


DEEPLAB = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}  # has dropout (in ASPP)


# Accumulation over 2 batches, gradient clipping, a weight average and channels-last weights.
TOOLS = {"trainer": {"accumulate_steps": 2, "clip_grad_norm": 0.5, "ema": {"decay": 0.9}}, "channels_last": True}


@pytest.mark.parametrize("at_call, arch, tools", [(8, None, {}), (9, DEEPLAB, {}), (9, None, TOOLS)],
                         ids=["end_of_epoch_2", "mid_epoch_3", "mid_epoch_3_with_training_tools"])
def test_resume_is_bit_exact(tiny_config, tmp_path, at_call, arch, tools):
    """4 epochs straight == interrupted (at an epoch end, or mid-epoch) and resumed."""
    tiny_config["trainer"]["epochs"] = 4  # 24 images / batch 6 = 4 iterations per epoch
    if arch is not None:
        tiny_config["arch"] = arch
    tiny_config["trainer"].update(tools.get("trainer", {}))
    tiny_config.update({k: v for k, v in tools.items() if k != "trainer"})
    straight = make_trainer(tiny_config, tmp_path / "straight")
    straight_summary = straight.train()

    resumed, resumed_summary, checkpoint = interrupt_then_resume(tiny_config, tmp_path, at_call)
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 4 and state["epoch_done"]

    expected, actual = weights(straight), weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    for a, b in zip(straight.optimizer.state_dict()["state"].values(),
                    resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    if tools:  # stopped on batch 1 of epoch 3, i.e. after the step of its first group of 2 batches
        assert "epoch 3, iteration 2" in (tmp_path / "interrupted" / "train.log").read_text()
        for key, value in straight.ema.state_dict().items():
            assert torch.equal(value, resumed.ema.state_dict()[key]), key
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert drop_time(straight.history) == drop_time(resumed.history)
    assert straight_summary["best_epoch"] == resumed_summary["best_epoch"]


@pytest.mark.parametrize("action", ["sigint", "sigterm"])
def test_interrupt_records_where_it_stopped(tiny_config, tmp_path, action):
    tiny_config["trainer"]["epochs"] = 3
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 6, action)  # epoch 2, iteration 2
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 2, iteration 2"):
        trainer.train()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["iteration"], state["epoch_done"]) == (2, 2, False)
    assert len(state["history"]) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_checkpoint_contents(tiny_config, tmp_path):
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.train()
    state = torch.load(tmp_path / "run" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "iteration", "epoch_done", "best",
            "best_epoch", "not_improved", "rng", "config", "meta", "arch", "num_classes"} <= set(state)
    assert state["arch"] == "UNet" and state["num_classes"] == 5
    assert state["epoch"] == 2 and state["epoch_done"] is True
    assert state["lr_scheduler"]["last_epoch"] == 8  # stepped per iteration
    assert state["meta"]["class_names"] == ["background", "disk", "square", "triangle", "ring"]
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["finished"] == "last epoch"
    best = load_checkpoint(tmp_path / "run" / "best_model.pth")
    # What inference and fine-tuning need, and no training state (half the size of checkpoint.pth).
    assert set(best) == {"arch", "num_classes", "meta", "model", "config", "epoch", "monitor", "metrics"}
    assert best["epoch"] == state["best_epoch"]
    assert best["metrics"]["mIoU"] == max(row["mIoU"] for row in state["history"]) == state["best"]
    assert best["metrics"] == next(row for row in state["history"] if row["epoch"] == best["epoch"])
    for key, value in best["model"].items():
        assert value.shape == state["model"][key].shape


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary left


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.pth: not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_resume_with_other_model_is_refused(tiny_config, tmp_path):
    make_trainer(tiny_config, tmp_path / "run").train()
    tiny_config["arch"]["args"]["base_channels"] = 8
    other = make_trainer(tiny_config, tmp_path / "other")
    with pytest.raises(CheckpointError, match="weights do not fit the configured 'UNet' model"):
        other.resume(tmp_path / "run" / "checkpoint.pth")
    tiny_config["arch"] = {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}}
    other = make_trainer(tiny_config, tmp_path / "other2")
    with pytest.raises(CheckpointError, match="checkpoint is a 'UNet' model, but the config builds 'DeepLabV3Plus'"):
        other.resume(tmp_path / "run" / "checkpoint.pth")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    tiny_config["trainer"]["epochs"] = 3
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 7, "nan")  # epoch 2, iteration 3
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, iteration 3; stopped"):
        trainer.train()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert state["epoch"] == 1 and state["epoch_done"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_early_stop_counts_validations_without_improvement(tiny_config, tmp_path):
    tiny_config["trainer"].update(epochs=10, early_stop=2, monitor="max mIoU")
    trainer = make_trainer(tiny_config, tmp_path / "run")
    scores = iter([0.5, 0.6, 0.55, 0.6, 0.7])  # best at epoch 2; 3 and 4 do not beat it

    def fake_validation(epoch):
        return {"val_loss": 1.0, "mIoU": next(scores)}

    trainer._valid_epoch = fake_validation
    summary = trainer.train()
    assert summary["epochs_trained"] == 4
    assert summary["best_epoch"] == 2 and summary["best_metrics"]["mIoU"] == 0.6
    assert load_checkpoint(tmp_path / "run" / "best_model.pth")["epoch"] == 2
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["not_improved"]) == (4, 2)


def test_validation_schedule_and_run_outputs(tiny_config, tmp_path):
    tiny_config["trainer"].update(epochs=3, val_per_epochs=2, tensorboard=True)
    run_dir = tmp_path / "run"
    trainer = make_trainer(tiny_config, run_dir)
    summary = trainer.train()
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["2", "3"]  # one row per validation: epoch 2 and the last
    assert all(row["mIoU"] and row["train_loss"] and row["iou/disk"] for row in rows)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["best_epoch"] == summary["best_epoch"] in (2, 3)
    assert math.isclose(saved["best_metrics"]["mIoU"], max(float(r["mIoU"]) for r in rows), rel_tol=1e-5)
    assert saved["epochs_trained"] == 3
    assert (run_dir / "learning_curves.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_gets_scalars_and_image_grid(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_config["trainer"]["tensorboard"] = True
    run_dir = tmp_path / "run"
    make_trainer(tiny_config, run_dir).train()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr/0", "val/mIoU", "val/val_loss", "val/iou/disk"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 8  # log_per_iter 1, 4 iterations x 2 epochs
    image = events.Images("val/image_groundtruth_prediction")[-1]
    assert (image.width, image.height) == (3 * 32, 4 * 32)  # image | truth | prediction, 4 rows


def test_mixed_precision_on_the_cpu(tiny_config, tmp_path):
    tiny_config["amp"] = True
    trainer = make_trainer(tiny_config, tmp_path / "run")
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    summary = trainer.train()
    assert math.isfinite(summary["last_metrics"]["train_loss"])
    assert all(v.dtype == torch.float32 for v in trainer.unwrapped_model.state_dict().values()
               if v.is_floating_point())  # autocast keeps float32 master weights


def test_resume_with_float16_scaler_from_a_run_without_it(tiny_config, tmp_path):
    """A checkpoint saved without loss scaling (CPU, or amp off) resumes with scaling on."""
    make_trainer(tiny_config, tmp_path / "run").train()
    tiny_config["trainer"]["epochs"] = 3
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what CUDA with amp true builds
    trainer.resume(tmp_path / "run" / "checkpoint.pth")
    assert trainer.start_epoch == 3 and trainer.scaler.get_scale() == 65536.0  # fresh scaler state


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train_loader"]["args"].update(batch_size=4), "train_loader.args.batch_size 6, now 4"),
    (lambda c: c["train_loader"]["args"].update(drop_last=False), "train_loader.args.drop_last True, now False"),
    (lambda c: c["train_loader"]["args"].update(subset=18), "train_loader.args.subset None, now 18"),
    (lambda c: c["train_loader"]["args"].update(shuffle=False), "train_loader.args.shuffle True, now False"),
    (lambda c: c.update(seed=8), "seed 7, now 8"),
    (lambda c: c["trainer"].update(accumulate_steps=2), "trainer.accumulate_steps 1, now 2"),
    (lambda c: c["train_loader"]["args"].update(num_samples=30), "number of training samples 24, now 30"),
], ids=["batch_size", "drop_last", "subset", "shuffle", "seed", "accumulate_steps", "samples"])
def test_mid_epoch_resume_needs_the_same_batches(tiny_config, tmp_path, change, message):
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 2, "sigint")
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    change(tiny_config)
    other = make_trainer(tiny_config, tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"stopped in the middle of epoch 1 with {re.escape(message)}; "
                                          "resume it with the same value"):
        other.resume(tmp_path / "run" / "checkpoint.pth")


def test_mid_epoch_resume_needs_the_same_number_of_processes(tiny_config, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 2, "sigint")
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    state["position"]["number of processes (torchrun --nproc_per_node x nodes)"] = 2  # as if saved by 2
    with pytest.raises(ConfigError, match=r"number of processes \(torchrun --nproc_per_node x nodes\) 2, now 1"):
        make_trainer(tiny_config, tmp_path / "run").resume(tmp_path / "run" / "checkpoint.pth", state)


def test_resume_at_an_epoch_boundary_accepts_new_settings(tiny_config, tmp_path):
    trainer = make_trainer(tiny_config, tmp_path / "run")
    trainer.loss = LossHook(trainer.loss, 4, "sigint")  # the last iteration of epoch 1
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (1, 4)
    tiny_config["train_loader"]["args"]["batch_size"] = 4
    tiny_config["trainer"]["epochs"] = 2
    other = make_trainer(tiny_config, tmp_path / "run")
    other.resume(tmp_path / "run" / "checkpoint.pth")
    assert other.train()["epochs_trained"] == 2


def test_single_image_batch_in_a_batch_norm_pooling_model_is_explained(tiny_config, tmp_path, monkeypatch):
    tiny_config["arch"] = DEEPLAB
    tiny_config["train_loader"]["args"]["batch_size"] = 1
    # Caught before training by the dry forward pass (tests/test_norm.py)...
    with pytest.raises(ConfigError, match="batch_size 1 makes DeepLabV3Plus's layer aspp.image_pool.1.1"):
        make_trainer(tiny_config, tmp_path / "run")
    # ... and explained by the trainer where that pass cannot run (a model without meta kernels).
    monkeypatch.setattr(builder, "check_norm_batches", lambda *args: None)
    with pytest.raises(TrainingError, match="a training batch has a single image"):
        make_trainer(tiny_config, tmp_path / "run").train()
