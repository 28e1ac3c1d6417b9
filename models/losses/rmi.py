"""Region mutual information loss (Zhao et al., "Region Mutual Information Loss for Semantic
Segmentation", NeurIPS 2019).

Each pixel is represented with its ``radius x radius`` neighbourhood, a vector
of ``d = radius^2`` values, for the one-hot target (Y) and for the predicted
probabilities (P) of each class. Treating those vectors as Gaussian, the paper
maximises a lower bound of the mutual information I(Y; P), which amounts to
minimising ``0.5 log det`` of the covariance of Y left unexplained by P:

    Sigma_Y|P = Sigma_Y - Sigma_YP Sigma_P^-1 Sigma_YP^T

Pixels are thus judged together with their neighbours, not one at a time.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.losses.common import full_precision, one_hot_valid
from utils.registry import LOSSES

# Added to the probabilities so that they are never exactly 0 (the paper's 1e-6).
PROB_FLOOR = 1e-6


def log_det_spd(matrix: torch.Tensor) -> torch.Tensor:
    """``log det`` of symmetric positive-definite matrices ``(..., d, d)``, from their Cholesky factor.

    ``2 sum log diag(L)`` is stabler than ``torch.logdet`` and, with
    ``cholesky_ex``, needs no host sync to check success; a matrix that is not
    positive definite gives NaN, which the trainer's NaN check reports.
    """
    factor, _ = torch.linalg.cholesky_ex(matrix)
    return 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def region_vectors(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """Each pixel's ``radius x radius`` neighbourhood as a vector (no padding: border pixels are dropped).

    Shape: ``(N, C, H, W)`` -> ``(N, C, radius^2, (H - radius + 1) (W - radius + 1))``.
    """
    n, c = maps.shape[:2]
    return F.unfold(maps, kernel_size=radius).view(n, c, radius * radius, -1)


@LOSSES.register
class RMILoss(nn.Module):
    """``bce_weight * BCE + (1 - bce_weight) * RMI``, on per-class sigmoid probabilities.

    As in the paper's code, probabilities are per-class sigmoids and the RMI
    term is paired with their binary cross-entropy (``bce_weight`` is the
    paper's lambda, 0.5); sum it with a ``CrossEntropyLoss`` through
    ``WeightedSumLoss`` for the OCR recipe. Target and probabilities are first
    downsampled by ``pool_size`` (both pooled alike) to save memory, as in the
    paper. The covariances are
    computed in float64, the inverse and the log-determinant through Cholesky
    factors of matrices with ``epsilon`` added to their diagonal. The RMI term
    is summed over classes and divided by ``radius^2``, as in the paper's code.
    The BCE term is summed over classes and divided by the number of valid pixels + 1, as in
    the authors' code (the +1 keeps an all-void batch finite).
    Void pixels count as target 0 and probability 0 in the RMI term (their
    logits are not used) and are left out of the BCE term.

    Args:
        radius: side of the square region; 3 in the paper.
        pool_size: downsampling factor (kernel and stride); 1 keeps the full resolution.
        pool: ``"avg"`` or ``"max"`` pooling for the downsampling (the authors' code
            offers both; the Lightning/Hydra seed, MIC-DKFZ's semantic_segmentation, uses ``"max"``).
        bce_weight: weight lambda of the BCE term, in [0, 1].
        epsilon: added to the covariance diagonals so they are positive definite.
        ignore_index: target value of void pixels.
    """

    def __init__(self, *, radius: int = 3, pool_size: int = 3, pool: Literal["avg", "max"] = "avg",
                 bce_weight: float = 0.5, epsilon: float = 5e-4, ignore_index: int = 255) -> None:
        super().__init__()
        if radius < 1 or pool_size < 1:
            raise ValueError(f"radius and pool_size must be >= 1, got radius={radius}, pool_size={pool_size}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if not 0.0 <= bce_weight <= 1.0:
            raise ValueError(f"bce_weight must be in [0, 1], got {bce_weight}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.radius = radius
        self.pool_size = pool_size
        self.pool = pool
        self.bce_weight = bce_weight
        self.epsilon = epsilon
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar.

        The downsampled map must be at least ``radius`` pixels high and wide.
        """
        # Covariances and Cholesky factors need full precision whatever autocast says.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = full_precision(logits)
            valid, one_hot = one_hot_valid(target, logits.shape[1], self.ignore_index, logits.dtype)
            mask = valid.unsqueeze(1).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, one_hot, weight=mask.expand_as(logits),
                                                     reduction="sum")
            # Over the valid pixels + 1, as the reference implementation (and zero when all are void).
            bce = bce / (valid.sum() + 1)
            probs = logits.sigmoid() * mask + PROB_FLOOR
            return self.bce_weight * bce + (1 - self.bce_weight) * self.rmi_lower_bound(one_hot, probs)

    def rmi_lower_bound(self, one_hot: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The RMI term: ``0.5 log det Sigma_Y|P / radius^2``, averaged over images, summed over classes.

        Shape: ``one_hot`` and ``probs`` ``(N, C, H, W)``; returns a scalar.
        """
        if self.pool_size > 1:
            pool = F.avg_pool2d if self.pool == "avg" else F.max_pool2d
            one_hot = pool(one_hot, self.pool_size, self.pool_size, padding=self.pool_size // 2)
            probs = pool(probs, self.pool_size, self.pool_size, padding=self.pool_size // 2)
        if min(probs.shape[-2:]) < self.radius:
            raise ValueError(f"RMILoss: the {probs.shape[-2]}x{probs.shape[-1]} map (after downsampling by "
                             f"{self.pool_size}) is smaller than the {self.radius}x{self.radius} region")
        y = region_vectors(one_hot, self.radius).double()
        p = region_vectors(probs, self.radius).double()
        y = y - y.mean(-1, keepdim=True)
        p = p - p.mean(-1, keepdim=True)
        # Sums of products, not means: dividing by the number of points only
        # shifts log det by a constant, and would let small entries underflow.
        eye = self.epsilon * torch.eye(y.shape[2], dtype=y.dtype, device=y.device)
        cov_y = y @ y.transpose(-2, -1)
        cov_p = p @ p.transpose(-2, -1)
        cov_yp = y @ p.transpose(-2, -1)
        # Sigma_P^-1 Sigma_YP^T through a Cholesky solve rather than an explicit inverse.
        factor, _ = torch.linalg.cholesky_ex(cov_p + eye)
        explained = cov_yp @ torch.cholesky_solve(cov_yp.transpose(-2, -1), factor)
        conditional = cov_y - explained
        conditional = 0.5 * (conditional + conditional.transpose(-2, -1))  # exactly symmetric
        rmi = 0.5 * log_det_spd(conditional + eye)  # (N, C)
        return (rmi.mean(0).sum() / (self.radius * self.radius)).to(one_hot.dtype)
