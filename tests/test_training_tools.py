"""Training tools: amp modes, gradient accumulation, clipping, EMA, channels_last, compile, --init-from."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import builder
import train
from base.base_model import BaseModel
from dataloader.synthetic import SyntheticShapes
from trainer import amp_mode
from models.unet import UNet
from utils.checkpoint import load_checkpoint, save_atomic
from utils.config import validate_config
from utils.errors import CheckpointError, ConfigError
from utils.registry import DATASETS, MODELS

NO_BN = "TestNoBatchNormNet"


class NoBatchNormNet(BaseModel):
    """Two convolutions and no batch norm: its gradient over a batch is the mean of its images'.

    Args:
        width: channels of the hidden layer.
    """

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.classifier(self.features(x))}


class ThreeShapes(SyntheticShapes):
    """SyntheticShapes with 3 classes (squares, triangles and rings all count as "other")."""

    class_names = ("background", "disk", "other")
    palette = ((0, 0, 0), (230, 25, 75), (60, 180, 75))

    def load_label(self, index: int) -> np.ndarray:
        return np.minimum(super().load_label(index), 2)


@pytest.fixture
def no_bn_model(monkeypatch):
    """Registers :class:`NoBatchNormNet` for the duration of a test."""
    monkeypatch.setitem(MODELS._items, NO_BN, NoBatchNormNet)
    return NO_BN


def make_trainer(config: dict, run_dir: Path, device: str = "cpu"):
    resolved = validate_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    return builder.build_trainer(resolved, torch.device(device), run_dir)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def no_bn_config(config: dict, batch_size: int) -> dict:
    """No random crop: every pixel is labelled, so a batch's mean loss is the mean of its halves'."""
    config["arch"] = {"type": NO_BN, "args": {}}
    config["train_loader"]["args"].update(batch_size=batch_size,
                                          transforms=[{"type": "RandomHorizontalFlip"}])
    return config


# --- amp -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, device, mode", [
    (True, "cpu", "bf16"), (True, "cuda", "fp16"), (False, "cpu", "off"), (False, "cuda", "off"),
    ("off", "cuda", "off"), ("bf16", "cpu", "bf16"), ("bf16", "cuda", "bf16"), ("fp16", "cuda", "fp16")])
def test_amp_modes(value, device, mode):
    assert amp_mode(value, torch.device(device)) == mode


def test_fp16_on_the_cpu_is_a_config_error_naming_the_choices(tiny_config, tmp_path):
    tiny_config["amp"] = "fp16"
    with pytest.raises(ConfigError, match=re.escape("amp: 'fp16' needs CUDA (float16 with loss scaling) but "
                                                    "training runs on cpu; choose 'bf16' or 'off' (choices: "
                                                    "'off', 'bf16', 'fp16')")):
        make_trainer(tiny_config, tmp_path / "run")
    tiny_config["amp"] = "fp32"
    with pytest.raises(ConfigError, match="amp: expected one of 'off', 'bf16', 'fp16' or a boolean, got 'fp32'"):
        validate_config(tiny_config)


def test_bf16_string_mode_trains_in_bfloat16(tiny_config, tmp_path):
    tiny_config["amp"] = "bf16"
    tiny_config["trainer"]["epochs"] = 1
    trainer = make_trainer(tiny_config, tmp_path / "run")
    seen = []
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(out["out"].dtype))
    trainer.train()
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert seen[0] == torch.bfloat16


def test_fp16_scaler_state_is_saved_and_resumed(tiny_config, tmp_path, monkeypatch):
    """The loss scaler of fp16 (CUDA's; built here on the CPU, where torch has it too) is in the checkpoint."""
    monkeypatch.setattr(builder, "amp_mode", lambda value, device: value)  # allow fp16 on the CPU
    tiny_config["amp"] = "fp16"
    first = make_trainer(tiny_config, tmp_path / "run")
    assert first.scaler.is_enabled() and first.amp_dtype == torch.float16
    first.train()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["scaler"]
    assert saved["scale"] == 65536.0 and saved["_growth_tracker"] == 8  # 8 finite steps since the last growth
    tiny_config["trainer"]["epochs"] = 3
    second = make_trainer(tiny_config, tmp_path / "run")
    second.resume(tmp_path / "run" / "checkpoint.pth")
    assert second.scaler.state_dict()["_growth_tracker"] == 8


# --- accumulation and clipping -----------------------------------------------------------------------
def test_accumulating_two_batches_equals_one_batch_twice_as_big(tiny_config, tmp_path, no_bn_model):
    big = make_trainer(no_bn_config(tiny_config, 6), tmp_path / "big")
    big.train()
    small_config = no_bn_config(tiny_config, 3)
    small_config["trainer"]["accumulate_steps"] = 2
    small = make_trainer(small_config, tmp_path / "small")
    assert small.lr_scheduler.total_iters == big.lr_scheduler.total_iters == 8  # optimizer steps
    small.train()
    expected, actual = weights(big), weights(small)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert small.lr_scheduler.last_epoch == 8
    assert [r["train_loss"] for r in small.history] == pytest.approx([r["train_loss"] for r in big.history],
                                                                     rel=1e-5)


def test_an_epoch_that_does_not_divide_ends_with_a_shorter_group(tiny_config, tmp_path, no_bn_model):
    """5 batches with accumulate_steps 2: steps after batches 2, 4 and 5 (the last averaged over 1 batch)."""
    config = no_bn_config(tiny_config, 4)
    config["train_loader"]["args"]["num_samples"] = 20
    config["trainer"].update(accumulate_steps=2, epochs=1)
    trainer = make_trainer(config, tmp_path / "run")
    steps = []
    step = trainer._optimizer_step
    trainer._optimizer_step = lambda: (steps.append(trainer.iteration), step())[1]
    trainer.train()
    assert steps == [2, 4, 5]
    assert trainer.lr_scheduler.total_iters == 3


def test_clip_grad_norm_limits_the_step(tiny_config, tmp_path, no_bn_model):
    config = no_bn_config(tiny_config, 6)
    config["optimizer"] = {"type": "SGD", "args": {"lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}}
    config["lr_scheduler"] = "Constant"
    config["trainer"]["clip_grad_norm"] = 0.01
    trainer = make_trainer(config, tmp_path / "run")
    params = list(trainer.unwrapped_model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 3.0)  # norm far above 0.01
    trainer._optimizer_step()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert moved.norm().item() == pytest.approx(0.5 * 0.01, rel=1e-4)  # lr x the clipped norm
    assert torch.allclose(moved, moved[0])  # same direction: every component scaled alike


@pytest.mark.parametrize("key, value, message", [
    ("accumulate_steps", 0, "trainer.accumulate_steps: must be >= 1, got 0"),
    ("clip_grad_norm", -1.0, "trainer.clip_grad_norm: must be > 0 (or null to disable), got -1.0"),
    ("ema", {"decay": 1.0}, "trainer.ema.decay: must be between 0 and 1 (exclusive), got 1.0"),
    ("ema", {"decy": 0.9}, "trainer.ema.decy: unknown key. Did you mean 'decay'?"),
])
def test_training_tool_keys_are_validated(tiny_config, key, value, message):
    tiny_config["trainer"][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(tiny_config)


# --- EMA ------------------------------------------------------------------------------------------
def test_ema_is_the_moving_average_of_the_weights_and_has_its_own_best_model(tiny_config, tmp_path):
    decay = 0.8
    tiny_config["trainer"]["ema"] = {"decay": decay}
    trainer = make_trainer(tiny_config, tmp_path / "run")
    after_steps = []
    step = trainer._optimizer_step

    def recording_step():
        step()
        after_steps.append(weights(trainer))

    trainer._optimizer_step = recording_step
    summary = trainer.train()
    expected = dict(after_steps[0])  # the first average is the weights themselves
    for state in after_steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * v if v.is_floating_point() else expected[k]
                    for k, v in state.items()}
    average = trainer.ema.module.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():  # batch-norm statistics are averaged too
            torch.testing.assert_close(average[key], value, rtol=1e-5, atol=1e-6)

    history = trainer.history
    assert all("ema/mIoU" in row and "ema/iou/disk" in row for row in history)
    assert history[0]["ema/val_loss"] != history[0]["val_loss"]  # another model
    best = load_checkpoint(tmp_path / "run" / "best_model_ema.pth")
    ema_scores = [row["ema/mIoU"] for row in history]
    assert best["metrics"]["mIoU"] == max(ema_scores)
    assert best["epoch"] == summary["best_ema_epoch"] == 1 + ema_scores.index(max(ema_scores))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert int(state["ema"]["n_averaged"]) == 8
    assert state["best_ema"] == max(ema_scores)


# --- memory format and compile -----------------------------------------------------------------------
def test_channels_last_keeps_the_results(tiny_config, tmp_path):
    tiny_config["trainer"]["epochs"] = 1
    plain = make_trainer(tiny_config, tmp_path / "plain")
    plain.train()
    tiny_config["channels_last"] = True
    fast = make_trainer(tiny_config, tmp_path / "fast")
    first_conv = next(p for p in fast.unwrapped_model.parameters() if p.dim() == 4)
    assert first_conv.is_contiguous(memory_format=torch.channels_last) and not first_conv.is_contiguous()
    fast.train()
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(fast)[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tiny_config, tmp_path, no_bn_model):
    config = no_bn_config(tiny_config, 6)
    config["trainer"]["epochs"] = 1
    eager = make_trainer(config, tmp_path / "eager")
    eager.train()
    config["compile"] = True
    compiled = make_trainer(config, tmp_path / "compiled")
    assert compiled.unwrapped_model._compiled_call_impl is not None
    compiled.train()
    state = load_checkpoint(tmp_path / "compiled" / "checkpoint.pth")
    assert set(state["model"]) == set(weights(eager))  # no "_orig_mod." prefix
    for key, value in weights(eager).items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-4, atol=1e-5)


# --- init_from ------------------------------------------------------------------------------------
def test_init_from_loads_what_fits_and_starts_a_new_run(tiny_config, tmp_path, monkeypatch, capsys):
    """A 5-class checkpoint starts a 3-class run: all but the classifier is loaded."""
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    tiny_config["train_loader"]["args"]["num_samples"] = 12
    source = make_trainer(tiny_config, tmp_path / "source")
    source.train()
    checkpoint = tmp_path / "source" / "checkpoint.pth"

    monkeypatch.setitem(DATASETS._items, "ThreeShapes", ThreeShapes)
    for key in ("train_loader", "val_loader"):
        tiny_config[key]["type"] = "ThreeShapes"
    config_path = tmp_path / "three.json"
    config_path.write_text(json.dumps(tiny_config))
    loaded = {}
    build = builder.build_trainer

    def keep(*args, **kwargs):  # the weights right after initialisation, before training
        trainer = build(*args, **kwargs)
        loaded.update(weights(trainer))
        return trainer

    monkeypatch.setattr(train, "build_trainer", keep)
    assert train.main(["-c", str(config_path), "--init-from", str(checkpoint), "--run-dir",
                       str(tmp_path / "tuned"), "--device", "cpu"]) == 0
    log = (tmp_path / "tuned" / "train.log").read_text()
    source_weights = weights(source)
    head = [k for k in source_weights if source_weights[k].shape != loaded[k].shape]
    assert head == ["head.weight", "head.bias"]
    assert (f"Initialised from {checkpoint}: loaded {len(source_weights) - 2} of the model's "
            f"{len(source_weights)} tensors") in log
    assert "not loaded, shape differs (initialised afresh): head.weight (5, 4, 1, 1) -> (3, 4, 1, 1), " \
           "head.bias (5,) -> (3,)" in log
    for key, value in source_weights.items():
        if key not in head:
            assert torch.equal(loaded[key], value), key
    state = load_checkpoint(tmp_path / "tuned" / "checkpoint.pth")
    assert state["num_classes"] == 3 and len(state["history"]) == 1  # a new run: epoch 1 of its own
    assert state["config"]["init_from"] == str(checkpoint)
    assert state["meta"]["mean"] == source.meta["mean"]  # the normalisation the weights were trained with


def test_init_from_a_checkpoint_of_an_unrelated_model_is_refused(tiny_config, tmp_path, no_bn_model):
    save_atomic({"model": UNet(num_classes=5, base_channels=4, depth=2).state_dict()}, tmp_path / "unet.pth")
    config = no_bn_config(tiny_config, 6)
    config["init_from"] = str(tmp_path / "unet.pth")
    with pytest.raises(CheckpointError, match="none of its .* weights fits the configured model by name"):
        builder.build_components(validate_config(config), torch.device("cpu"))


def test_init_from_and_resume_together_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "a.pth", "--init-from", "b.pth"])
    assert "--init-from starts a new run and --resume continues one" in capsys.readouterr().err


def test_a_stop_inside_an_accumulation_group_resumes_at_its_start(tiny_config, tmp_path, no_bn_model):
    """When the data ends inside a group (a worker ended by the stop request), that group is redone."""
    from base.base_trainer import TrainingInterrupted

    config = no_bn_config(tiny_config, 6)
    config["trainer"]["accumulate_steps"] = 2
    trainer = make_trainer(config, tmp_path / "run")
    batches = trainer._batches

    def three_batches_then_stop(loader, **kwargs):
        for i, batch in enumerate(batches(loader, **kwargs)):
            if i == 3 and loader is trainer.train_loader:
                trainer._stop_requested = True
                return
            yield batch

    trainer._batches = three_batches_then_stop
    with pytest.raises(TrainingInterrupted, match="interrupted at epoch 1, iteration 2"):
        trainer.train()
    assert all(p.grad is None for p in trainer.unwrapped_model.parameters())  # batch 3's gradient dropped
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (state["iteration"], state["lr_scheduler"]["last_epoch"]) == (2, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp, dtype, scaled", [("fp16", torch.float16, True), ("bf16", torch.bfloat16, False),
                                                (True, torch.float16, True)])
def test_amp_on_cuda(tiny_config, tmp_path, amp, dtype, scaled):
    tiny_config["amp"] = amp
    tiny_config["trainer"]["epochs"] = 1
    trainer = make_trainer(tiny_config, tmp_path / "run", device="cuda")
    assert trainer.amp_dtype == dtype and trainer.scaler.is_enabled() == scaled
    trainer.train()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["scaler"]
    assert ("scale" in saved) == scaled
