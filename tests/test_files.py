"""Atomic writes: permissions others can read, durable renames."""
from __future__ import annotations

import os
import stat

import pytest

import builder
from utils.distributed import select_device
from utils.config import validate_config
from utils.files import atomic_write, write_json


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring it afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_json({"a": 1}, tmp_path / "summary.json")
    with atomic_write(tmp_path / "checkpoint.pth", "wb") as handle:
        handle.write(b"x")
    for name in ("summary.json", "checkpoint.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_run_files_are_readable_by_the_group_and_others(tiny_config, tmp_path, umask):
    umask(0o022)
    config = validate_config(tiny_config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    builder.build_trainer(config, select_device("cpu"), run_dir).train()
    for name in ("checkpoint.pth", "best_model.pth", "metrics.csv", "summary.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), sorted(os.listdir(tmp_path))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json({"a": 1}, tmp_path / "results.json")
    # First the file's data, then the folder once the new name is in it.
    assert [is_dir for is_dir, _ in synced] == [False, True]
    assert synced[-1][1] == ["results.json"]
