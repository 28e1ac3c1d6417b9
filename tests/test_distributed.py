"""Several processes under torchrun (Gloo on the CPU): the same training as one process, exact resume,
checkpoints that load in a single process, and what SyncBatchNorm does on the CPU."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.distributed as dist

import builder
from models.unet import UNet
from utils.checkpoint import load_checkpoint

from conftest import TINY_CONFIG
from test_training_tools import make_trainer, no_bn_config, no_bn_model, weights  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def two_process_runs(launch, tmp_path_factory):
    """Straight, and stopped in epoch 2 then resumed: 2 processes with batch 3 on the model without batch norm."""
    folder = tmp_path_factory.mktemp("two_process")
    config = no_bn_config(copy.deepcopy(TINY_CONFIG), 3)  # 24 images: 4 steps of 2 x 3 per epoch
    config["trainer"]["save_dir"] = str(folder / "saved")
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config))
    straight = launch(0, "-c", str(config_path), "--run-dir", str(folder / "straight"))
    assert straight.returncode == 0, straight.stderr
    stopped = launch(6, "-c", str(config_path), "--run-dir", str(folder / "stopped"))  # epoch 2, step 2
    assert stopped.returncode != 0, stopped.stderr  # torchrun exits 1 when its workers exit 130
    assert "Resume with: torchrun --nproc_per_node=2" in stopped.stderr
    interrupted = load_checkpoint(folder / "stopped" / "checkpoint.pth")
    resumed = launch(0, "--resume", str(folder / "stopped" / "checkpoint.pth"))
    assert resumed.returncode == 0, resumed.stderr
    return {"config": config, "folder": folder, "interrupted": interrupted,
            "straight": load_checkpoint(folder / "straight" / "checkpoint.pth"),
            "resumed": load_checkpoint(folder / "stopped" / "checkpoint.pth")}


@pytest.mark.slow
def test_two_processes_train_like_one_with_twice_the_batch(two_process_runs, tmp_path, no_bn_model):
    config = copy.deepcopy(two_process_runs["config"])
    one = make_trainer(no_bn_config(config, 6), tmp_path / "one")
    one.train()
    two = two_process_runs["straight"]["model"]
    for key, value in weights(one).items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6)
    assert two_process_runs["straight"]["lr_scheduler"]["last_epoch"] == 8  # 2 epochs x 4 steps


@pytest.mark.slow
def test_resume_under_torchrun_is_exact(two_process_runs):
    assert (two_process_runs["interrupted"]["epoch"], two_process_runs["interrupted"]["iteration"]) == (2, 2)
    straight, resumed = two_process_runs["straight"], two_process_runs["resumed"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert [row["train_loss"] for row in resumed["history"]] == \
        pytest.approx([row["train_loss"] for row in straight["history"]], rel=1e-6)


@pytest.mark.slow
def test_a_two_process_checkpoint_holds_the_bare_model_and_resumes_in_one_process(two_process_runs, tmp_path,
                                                                                  no_bn_model):
    state = two_process_runs["straight"]
    assert not any(key.startswith("module.") for key in state["model"])
    config = copy.deepcopy(two_process_runs["config"])
    config["trainer"]["epochs"] = 3
    single = make_trainer(config, tmp_path / "single")
    single.resume(two_process_runs["folder"] / "straight" / "checkpoint.pth")
    for key, value in state["model"].items():
        assert torch.equal(single.unwrapped_model.state_dict()[key], value)
    assert single.train()["epochs_trained"] == 3


# --- SyncBatchNorm ------------------------------------------------------------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    """A Gloo process group of one process (what torchrun gives each CPU process)."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    yield
    dist.destroy_process_group()


def test_sync_batch_norm_needs_cuda(one_process_group):
    """torch's SyncBatchNorm refuses CPU tensors in a process group; on the CPU we keep plain batch norm."""
    sync = torch.nn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        sync(torch.randn(2, 4, 3, 3))
    model = UNet(num_classes=3, base_channels=4, depth=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = builder.wrap_distributed(model, torch.device("cpu"), sync_bn=True)
    assert any("use_synch_bn: SyncBatchNorm needs CUDA" in str(w.message) for w in caught)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
    wrapped(torch.randn(2, 3, 16, 16))["out"].sum().backward()  # trains with per-process statistics


def test_a_sync_batch_norm_model_saves_the_same_weights_as_the_plain_one():
    """What a CUDA run with use_synch_bn saves loads into the plain model of a single process."""
    plain = UNet(num_classes=3, base_channels=4, depth=2)
    original = UNet(num_classes=3, base_channels=4, depth=2)
    params = [id(p) for p in original.parameters()]
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(original)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert [id(p) for p in converted.parameters()] == params  # an optimizer built before keeps working
    assert {k: v.shape for k, v in converted.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(converted.state_dict())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 CUDA devices (NCCL)")
def test_sync_batch_norm_on_two_gpus_trains_like_one_with_twice_the_batch(launch, tiny_config, tmp_path):
    tiny_config["train_loader"]["args"].update(batch_size=3, transforms=[{"type": "RandomHorizontalFlip"}])
    tiny_config.update(use_synch_bn=True)
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config))
    two = launch(0, "-c", str(config_path), "--run-dir", str(tmp_path / "two"), device="cuda")
    assert two.returncode == 0, two.stderr
    tiny_config["train_loader"]["args"]["batch_size"] = 6
    one = make_trainer(tiny_config, tmp_path / "one", device="cuda")
    one.train()
    two_weights = load_checkpoint(tmp_path / "two" / "checkpoint.pth")["model"]
    for key, value in weights(one).items():  # batch-norm statistics included
        torch.testing.assert_close(two_weights[key], value.cpu(), rtol=1e-4, atol=1e-5)
