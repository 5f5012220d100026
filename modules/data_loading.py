"""Training data order and augmentation that survive worker processes and resumes.

A DataLoader with ``persistent_workers`` forks its workers once: a dataset attribute set later in
the main process (``dataset.set_epoch(e)``) never reaches them, so augmentations that depend on
the epoch would freeze at epoch 0. Here the epoch travels with every index instead:
:class:`EpochSampler` yields keys ``(epoch, index)``, and the training datasets
(:class:`EpochSeeded` here; ``FlipAugmented`` and ``CachedLatentDataset`` in
``modules/latent_cache.py``) take such keys. A sample's augmentation is then a function of
(seed, epoch, index) alone: the same in any worker, on any number of processes, and after a resume.
"""
from __future__ import annotations

from typing import Any, Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from modules.preemption import ignore_stop_signals, kill_workers_at_exit


def derive_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(n) & 0xFFFFFFFFFFFFFFFF for n in numbers]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def epoch_key(key: Any) -> Tuple[int, int]:
    """``(epoch, index)`` of a key from :class:`EpochSampler`; anything else is a TypeError."""
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return int(key[0]), int(key[1])
    raise TypeError(f"this dataset takes (epoch, index) keys from modules.data_loading.EpochSampler, got {key!r}")


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for every index of a dataset once per epoch, shuffled or in order.

    The permutation is a function of (seed, epoch) only, the same on every process (Accelerate
    shards the batches it forms), and :meth:`set_epoch` (called through ``loader.set_epoch``)
    selects the epoch.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return iter([(epoch, index) for index in order])


class EpochSeeded(Dataset):
    """``dataset`` whose random augmentation of sample ``i`` in epoch ``e`` is a function of (seed, e, i).

    Image transforms draw crops and flips from torch's global RNG. Drawn there directly, they would
    depend on which process or worker loads a sample and how far the loader has prefetched. Here
    each sample is loaded under a forked RNG seeded from (seed, epoch, index): the training RNG is
    left untouched and the augmentation is the same for any number of processes or workers.
    Keys are ``(epoch, index)`` (:class:`EpochSampler`).
    """

    epoch_keyed = True

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        epoch, index = epoch_key(key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            return self.dataset[index]


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, drop_last: bool,
                     seed: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """The DataLoader of every stage.

    ``shuffle=True`` (training): the order comes from an :class:`EpochSampler` and ``dataset``
    must take its ``(epoch, index)`` keys (``epoch_keyed``; wrap plain datasets in
    :class:`EpochSeeded`). ``shuffle=False`` (evaluation, encoding): plain indices in order.
    Training workers persist across epochs (no re-spawn of many workers per epoch); memory is pinned on
    GPU machines so the copy to the device can overlap compute (``non_blocking``). The loader's
    own generator seeds the workers, so creating an iterator never shifts the training randomness.
    Workers ignore SIGTERM and SIGINT, so a stop request reaches the training loop with the
    workers still serving the step in flight (:mod:`modules.preemption`).
    """
    sampler = None
    if shuffle:
        if not getattr(dataset, "epoch_keyed", False):
            raise TypeError(f"{type(dataset).__name__} does not take (epoch, index) keys; wrap it in EpochSeeded")
        sampler = EpochSampler(len(dataset), seed, shuffle=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers > 0:
        kill_workers_at_exit()  # they ignore SIGTERM, which multiprocessing's exit would wait on
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=shuffle and num_workers > 0,  # training loaders only: evaluation ones end their workers
        generator=generator,
        collate_fn=collate_fn,
        worker_init_fn=ignore_stop_signals,  # SIGTERM/SIGINT are the main process's to handle (modules/preemption.py)
    )
