"""Data loading whose order is a pure function of ``(seed, epoch)``.

The sampler draws the permutation of an epoch from a generator seeded with the
run's seed and the epoch, shards it by rank for ``torchrun``, and can skip the
batches already seen, so that an interrupted epoch resumes exactly where it
stopped. Together with the data set's per-sample randomness (see
:class:`base.base_dataset.BaseDataSet`) this makes resumed training bit-exact.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import distributed
from utils.errors import DataError


class EpochSampler(Sampler[int]):
    """Indices of one epoch: seeded shuffle, rank sharding and resumable skipping.

    Args:
        dataset_len: number of samples.
        shuffle: permute the indices each epoch.
        seed: the run's seed.
        even_shards: under torchrun, give every rank the same number of indices
            (repeating a few, as training needs); otherwise each index goes to
            exactly one rank (validation, where repeats would count twice).
    """

    def __init__(self, dataset_len: int, shuffle: bool, seed: int, even_shards: bool = True) -> None:
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.even_shards = even_shards
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select ``epoch``'s order; ``skip`` drops that many of this rank's first indices."""
        self.epoch, self.skip = epoch, skip

    def _per_rank(self) -> int:
        if self.even_shards:
            return math.ceil(self.dataset_len / self.world_size)
        return len(range(self.rank, self.dataset_len, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = math.ceil(self.dataset_len / self.world_size) * self.world_size
        if self.even_shards and total > len(order):  # pad by repeating so every rank gets the same count
            order = (order * math.ceil(total / len(order)))[:total]
        mine = order[self.rank::self.world_size]
        return iter(mine[self.skip:])

    def __len__(self) -> int:
        return max(self._per_rank() - self.skip, 0)


def collate_pairs(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` pairs; mixed sizes get an error that says what to change."""
    sizes = {tuple(image.shape[-2:]) for image, _ in batch}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise DataError(f"a batch mixes image sizes (height x width) {shown}; add a RandomCrop or Resize "
                        "to the loader's transforms, or use batch_size 1")
    return torch.stack([image for image, _ in batch]), torch.stack([label for _, label in batch])


class BaseDataLoader(DataLoader):
    """A ``DataLoader`` over a segmentation data set with an :class:`EpochSampler`.

    Workers are not persistent: they are started for each epoch and so see the
    data set's current epoch (its augmentation randomness) without messaging.
    The loader has its own random generator (which only seeds the workers)
    because the default would draw from the global one at every epoch and
    change the model's dropout masks after a resume.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 8, shuffle: bool = False,
                 num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False,
                 seed: int = 0, even_shards: bool = True) -> None:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, even_shards=even_shards)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                         drop_last=drop_last, pin_memory=pin_memory, collate_fn=collate_pairs,
                         generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Prepare ``epoch`` (1-based); skip the first ``skip_batches`` batches of it."""
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
