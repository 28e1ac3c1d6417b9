"""Atomic checkpoint files and safe loading.

A checkpoint is written to a temporary file in the same folder and then renamed
over the old one, so a crash or Ctrl-C while saving never leaves a truncated
``checkpoint.pth``. Loading uses ``weights_only=True``: a checkpoint can hold
tensors and plain data, never code.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.errors import CheckpointError
from utils.files import atomic_write


def save_atomic(state: dict, path: str | Path) -> None:
    """``torch.save(state, path)`` through a temporary file and an atomic rename."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on the CPU; a missing or corrupt file names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated, or not saved "
                              f"by this framework): {(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this framework (no 'model' entry)")
    return state


def check_compatible(state: dict, path: str | Path, arch: str, num_classes: int) -> None:
    """A checkpoint of another architecture or number of classes is refused, saying which."""
    saved_arch, saved_classes = state.get("arch"), state.get("num_classes")
    if saved_arch is not None and saved_arch != arch:
        raise CheckpointError(f"{path}: checkpoint is a '{saved_arch}' model, but the config builds '{arch}'")
    if saved_classes is not None and saved_classes != num_classes:
        raise CheckpointError(f"{path}: checkpoint predicts {saved_classes} classes, but the data set "
                              f"has {num_classes}")


def load_model_weights(model: nn.Module, state: dict, path: str | Path, arch: str, num_classes: int) -> None:
    """Load ``state["model"]`` into ``model``; a checkpoint of another model says so plainly."""
    check_compatible(state, path, arch, num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit the configured '{arch}' model "
                              f"(different architecture arguments?): {detail[:300]}") from exc


def rng_state() -> dict:
    """Every random generator's state, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value



def load_matching_weights(model: nn.Module, state: dict, path: str | Path) -> dict:
    """Fine-tuning start: load the checkpoint's weights whose names and shapes match ``model``'s.

    The others keep their fresh initialisation (e.g. a classifier for another
    number of classes). A checkpoint of which nothing fits is refused.

    Returns:
        ``loaded`` (names), ``reshaped`` (name -> (saved shape, model shape)),
        ``missing`` (model names absent from the checkpoint), ``unused``
        (checkpoint names the model lacks) and the checkpoint's ``meta``.
    """
    saved, own = state["model"], model.state_dict()
    common = [name for name in saved if name in own]
    loaded = [name for name in common if own[name].shape == saved[name].shape]
    if not loaded:
        raise CheckpointError(f"{path}: none of its {len(saved)} weights fits the configured model by name "
                              "and shape; init_from needs a checkpoint of a related model")
    model.load_state_dict({name: saved[name] for name in loaded}, strict=False)
    return {"loaded": loaded,
            "reshaped": {name: (tuple(saved[name].shape), tuple(own[name].shape))
                         for name in common if name not in loaded},
            "missing": [name for name in own if name not in saved],
            "unused": [name for name in saved if name not in own], "meta": state.get("meta") or {}}


def describe_init(path: str | Path, report: dict) -> str:
    """What :func:`load_matching_weights` did, for the run log."""
    total = len(report["loaded"]) + len(report["reshaped"]) + len(report["missing"])
    lines = [f"Initialised from {path}: loaded {len(report['loaded'])} of the model's {total} tensors"]
    if report["reshaped"]:
        lines.append("  not loaded, shape differs (initialised afresh): " + ", ".join(
            f"{name} {saved} -> {own}" for name, (saved, own) in report["reshaped"].items()))
    if report["missing"]:
        lines.append("  not in the checkpoint (initialised afresh): " + ", ".join(report["missing"]))
    if report["unused"]:
        lines.append("  in the checkpoint but not in the model (ignored): " + ", ".join(report["unused"]))
    return "\n".join(lines)
