"""A weighted sum of registered losses, each given in the config like ``loss`` itself."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from base.base_dataset import BaseDataSet
from utils.config import LOSS_INJECTED
from utils.errors import ConfigError
from utils.registry import LOSSES, Check, did_you_mean, type_matches

TERM_KEYS = ("loss", "weight")


def check_terms(terms: list[dict], path: str) -> None:
    """Validate each term ``{"loss": spec, "weight": number}`` and its loss spec, with dotted paths."""
    if not terms:
        raise ConfigError(f"{path}: give at least one term {{\"loss\": ..., \"weight\": ...}}")
    for i, term in enumerate(terms):
        where = f"{path}[{i}]"
        unknown = sorted(set(term) - set(TERM_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key.{did_you_mean(unknown[0], TERM_KEYS)} "
                              "Expected 'loss' and 'weight'")
        if "loss" not in term:
            raise ConfigError(f"{where}.loss: missing required key")
        weight = term.get("weight", 1.0)
        if not type_matches(weight, float) or weight < 0:
            raise ConfigError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        LOSSES.validate(term["loss"], f"{where}.loss", injected=LOSS_INJECTED)


@LOSSES.register
class WeightedSumLoss(nn.Module):
    """``sum of weight_i * loss_i``, for any registered losses (CE + RMI for OCR, CE + Lovász...).

    Each term is ``{"loss": <name or {type, args}>, "weight": <number, default 1>}``;
    the terms are validated with the rest of the config and built through the
    loss registry, and receive the framework's values (``ignore_index``...) too.

    Args:
        terms: a list of ``{"loss": <name or {type, args}>, "weight": <number >= 0, default 1>}``.
        ignore_index: target value of void pixels, passed on to each term.
        num_classes: number of classes, passed on.
        train_dataset: the training split, passed on (class weights).
        cache_dir: directory of the class-weight cache, passed on.
    """

    def __init__(self, *, terms: Annotated[list[dict], Check(check_terms)], ignore_index: int = 255,
                 num_classes: int, train_dataset: BaseDataSet | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        check_terms(terms, "terms")
        self.weights = [float(term.get("weight", 1.0)) for term in terms]
        self.losses = nn.ModuleList(
            LOSSES.build(term["loss"], f"terms[{i}].loss", ignore_index=ignore_index, num_classes=num_classes,
                         train_dataset=train_dataset, cache_dir=cache_dir)
            for i, term in enumerate(terms))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        return sum(weight * loss(logits, target) for weight, loss in zip(self.weights, self.losses))
