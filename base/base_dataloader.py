"""Data loading whose order is a pure function of ``(seed, epoch)``.

The sampler draws the permutation of an epoch from a generator seeded with the
run's seed and the epoch, shards it by rank for ``torchrun``, and can skip the
batches already seen, so that an interrupted epoch resumes exactly where it
stopped. It yields ``(epoch, index)`` pairs: the data set's per-sample
randomness is a function of them (see :class:`base.base_dataset.BaseDataSet`),
which makes resumed training bit-exact and lets worker processes live for the
whole run (they learn the epoch from each request).

Stopping is the main process's job: worker processes block SIGINT and SIGTERM,
which a terminal or a cluster scheduler sends to the whole process group, so a
stop request never kills a worker in the middle of a batch. Because of that,
``Process.terminate`` (a SIGTERM) cannot end them either, and multiprocessing's own
exit hook would wait for them for ever: the loader stops its workers itself, when
training ends and, for loaders still alive, when the interpreter exits.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import multiprocessing
import multiprocessing.util  # registers its exit hook now, before ours (see below)
import signal
import weakref
from collections.abc import Iterator
from multiprocessing import forkserver, resource_tracker
from typing import Literal

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import distributed
from utils.errors import DataError

#: Signals that ask training to stop; only the main process acts on them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

StartMethod = Literal["fork", "spawn", "forkserver"]

#: Loaders whose worker processes may be running (stopped by :func:`_stop_all_workers` at exit).
_LOADERS_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


def _stop_all_workers() -> None:
    for loader in list(_LOADERS_WITH_WORKERS):
        loader.shutdown()


# atexit runs its hooks last-registered first: this one runs before multiprocessing's (which joins
# every child process, and would wait for ever for a worker that blocks SIGTERM) and before
# torch's exit flag turns the iterator's own shutdown into a no-op.
atexit.register(_stop_all_workers)


class EpochSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` pairs of one epoch: seeded shuffle, rank sharding and resumable skipping.

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
        return ((self.epoch, index) for index in mine[self.skip:])

    def __len__(self) -> int:
        return max(self._per_rank() - self.skip, 0)


def collate_pairs(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack ``(image, label)`` pairs (or ``(image, label, instances)`` triples, field by field).

    Mixed sizes get an error that says what to change.
    """
    sizes = {tuple(item[0].shape[:2]) for item in batch}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise DataError(f"a batch mixes image sizes (height x width) {shown}; add a RandomCrop or Resize "
                        "to the loader's transforms, or use batch_size 1")
    return tuple(torch.stack(field) for field in zip(*batch))


def init_worker(worker_id: int) -> None:
    """Run in each worker process when it starts."""
    # Workers usually inherit the blocked mask (see BaseDataLoader.__iter__); a forkserver
    # started earlier does not pass it on, so block here too.
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # The workers are the parallelism: OpenCV's own threads would only compete with them.
    cv2.setNumThreads(0)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (they are delivered on exit); processes started meanwhile inherit the block."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_helper_processes(context) -> None:
    """Start multiprocessing's resource tracker (and forkserver) before the workers, signals handled.

    The resource tracker, which ``spawn`` and ``forkserver`` workers need, *unblocks* SIGINT and
    SIGTERM in the calling process after starting (CPython's ``resource_tracker.ensure_running``):
    started inside :func:`signals_blocked`, it would let the workers started after it inherit
    unblocked signals and die of a Ctrl-C while they import. So it starts first, and the
    forkserver (whose forked workers inherit its mask) starts with the signals blocked.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return
    method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
    if method in ("spawn", "forkserver"):
        resource_tracker.ensure_running()
    if method == "forkserver":
        with signals_blocked():
            forkserver.ensure_running()


def is_worker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the loader's report of a worker process that died (not a data error)."""
    text = str(exc)
    return isinstance(exc, (BrokenPipeError, ConnectionResetError, EOFError)) or (
        isinstance(exc, RuntimeError) and "DataLoader worker" in text and "exited unexpectedly" in text)


class BaseDataLoader(DataLoader):
    """A ``DataLoader`` over a segmentation data set with an :class:`EpochSampler`.

    With ``num_workers > 0`` the worker processes are persistent: started by
    the first epoch and reused (they receive the epoch with every index).
    The loader has its own random generator (which only seeds the workers)
    because the default would draw from the global one at every epoch and
    change the model's dropout masks after a resume.

    Args:
        start_method: how workers are started (``fork``, ``spawn`` or
            ``forkserver``); ``None`` is Python's default for the platform.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 8, shuffle: bool = False,
                 num_workers: int = 0, drop_last: bool = False, pin_memory: bool = False,
                 seed: int = 0, even_shards: bool = True, start_method: StartMethod | None = None) -> None:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, even_shards=even_shards)
        workers = {}
        if num_workers > 0:
            workers = {"persistent_workers": True, "worker_init_fn": init_worker,
                       "multiprocessing_context": start_method}
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                         drop_last=drop_last, pin_memory=pin_memory, collate_fn=collate_pairs,
                         generator=torch.Generator().manual_seed(seed), **workers)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Prepare ``epoch`` (1-based); skip the first ``skip_batches`` batches of it."""
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)

    def __iter__(self):
        if self.num_workers > 0 and self._iterator is None:
            # The first iteration starts the workers: they inherit blocked stop signals, and a
            # Ctrl-C meanwhile reaches the main process once they are up.
            start_helper_processes(self.multiprocessing_context)
            _LOADERS_WITH_WORKERS.add(self)
            with signals_blocked():
                return super().__iter__()
        return super().__iter__()

    def shutdown(self) -> None:
        """Stop the persistent worker processes (they are started again if the loader is reused).

        The workers are stopped here rather than by the iterator's finaliser: a traceback
        or a suspended generator can keep the iterator alive long after training ended.
        """
        iterator, self._iterator = self._iterator, None
        _LOADERS_WITH_WORKERS.discard(self)
        workers = getattr(iterator, "_workers", None)
        if not workers:  # no worker processes (num_workers 0, or never iterated)
            return
        iterator._shutdown_workers()  # asks each worker to exit, and waits for it
        for worker in workers:
            if worker.is_alive():  # stuck in a batch: terminate() cannot reach it (SIGTERM blocked)
                worker.kill()
                worker.join()
