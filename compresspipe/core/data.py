"""The data a pipeline uses: training, validation and test splits, and their loaders.

The validation split is held out of the training set (``data.val_split``, stratified by class,
seeded by ``data.split_seed``): every decision a pipeline makes (the training loop's per-epoch
evaluation, calibration, search, sensitivity) uses it; the test set only reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset, TensorDataset

from .batches import BatchLoader, InMemoryImages
from .config import DataConfig
from .datasets import build_sets
from .distributed import rank, world_size
from .errors import CompressPipeError

Loader = DataLoader | BatchLoader


@dataclass
class DataBundle:
    """Train, validation and test sets plus what a model needs to know about them.

    ``val`` is None when ``data.val_split`` is 0; ``val_loader`` then refuses, naming the
    purpose, so that nothing silently decides on the test set."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    config: DataConfig

    def train_loader(self, generator: torch.Generator | None = None,
                     shard: bool = True) -> Loader:
        """Shuffled loader; reseed ``generator`` each epoch for reproducible order (and, for
        in-memory sets, augmentation).

        Under torchrun (and ``shard``) each process gets its share of every epoch, so
        ``len()`` is the number of steps per epoch of one process; ``shard=False`` gives every
        process the same batches (for decisions that must come out identical on every rank).
        """
        world = world_size() if shard else 1
        if isinstance(self.train, InMemoryImages):
            return BatchLoader(self.train, self.config.batch_size, shuffle=True,
                               generator=generator, rank=rank() if world > 1 else 0, world=world)
        if world == 1:
            return DataLoader(
                self.train, batch_size=self.config.batch_size, shuffle=True, drop_last=False,
                num_workers=self.config.workers, generator=generator,
                persistent_workers=False,
            )
        sampler = ShardSampler(RandomSampler(self.train, generator=generator), rank(), world)
        return DataLoader(
            self.train, batch_size=self.config.batch_size, sampler=sampler, drop_last=False,
            num_workers=self.config.workers, generator=generator, persistent_workers=False,
        )

    def val_loader(self, shard: bool = False, purpose: str = "this step") -> Loader:
        """The whole validation split in order (with ``shard`` under torchrun, this process's
        share). ``purpose`` names what needs it, for the message when there is none."""
        if self.val is None:
            raise CompressPipeError(
                f"data.val_split is 0, but {purpose} chooses on a validation split; set "
                "data.val_split (a fraction or a count of the training set) above 0")
        return self._eval_loader(self.val, shard)

    def test_loader(self, shard: bool = False) -> Loader:
        """The whole test set in order; with ``shard`` under torchrun, this process's share.
        For reporting only: decisions use ``val_loader``."""
        return self._eval_loader(self.test, shard)

    def examples(self) -> Dataset:
        """Images to trace or calibrate with: the validation split, else the training set."""
        return self.val if self.val is not None else self.train

    def _eval_loader(self, data: Dataset, shard: bool) -> Loader:
        """In order; a shard is every world-th sample, no padding: shards add up to the set
        exactly once."""
        world = world_size()
        positions = list(range(rank(), len(data), world)) if shard and 1 < world <= len(data) \
            else None
        batch = self.config.eval_batch_size or max(self.config.batch_size, 256)
        if isinstance(data, InMemoryImages):
            return BatchLoader(data, batch, positions=positions)
        if positions is not None:
            data = Subset(data, positions)
        return DataLoader(data, batch_size=batch, shuffle=False, num_workers=self.config.workers)


class ShardSampler(Sampler[int]):
    """One process's share of ``base``'s order: every ``world``-th index from ``rank``.

    Not DistributedSampler + set_epoch: the training loop reseeds the loader's generator at every
    epoch (which makes a resumed run see the same batches), and sharding the order drawn from
    that generator keeps this, with the shards of one epoch together being exactly the
    single-process epoch. The order is padded by wrapping around to a multiple of ``world``, as
    DistributedSampler does, so every process runs the same number of steps (DDP needs that).
    """

    def __init__(self, base: Sampler[int], rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.base) / self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        total = len(self) * self.world
        while order and len(order) < total:
            order += order[: total - len(order)]
        return iter(order[self.rank: total: self.world])


def build_data(cfg: DataConfig) -> DataBundle:
    """The train/validation/test sets that ``cfg`` names."""
    if cfg.name not in ("digits", "fake") and cfg.channels not in (None, 1, 3):
        raise CompressPipeError(f"data.channels: {cfg.name!r} images can be given 1 "
                                f"(grayscale) or 3 (RGB) channels, not {cfg.channels}")
    sets = build_sets(cfg)
    train, val = sets.train, None
    if cfg.val_split:
        keep, held = stratified_split(labels_of(sets.plain), cfg.val_split, cfg.split_seed,
                                      where="data.val_split")
        train, val = take(sets.train, keep), take(sets.plain, held)
    # limits after the split: the validation split does not depend on limit_train
    train = _limited(train, cfg.limit_train)
    val = None if val is None else _limited(val, cfg.limit_val)
    test = _limited(sets.test, cfg.limit_test)
    return DataBundle(train, val, test, sets.num_classes, cfg.dataset_channels(),
                      cfg.image_size, cfg)


def stratified_split(labels: torch.Tensor, size: float, seed: int, where: str = "split"
                     ) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: ``size`` (a fraction below 1, or a count) held out, each
    class in proportion (largest remainders get the rounding), drawn with ``seed``."""
    n = len(labels)
    count = round(size * n) if size < 1 else int(size)
    if not 0 < count < n:
        raise CompressPipeError(f"{where}: {size:g} of {n} training images leaves {count} for "
                                f"validation and {n - count} for training; both need some")
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * count / n
    share = quota.floor().long()
    # the remaining images go to the classes with the largest remainders (ties: lower class)
    order = sorted(range(len(classes)), key=lambda c: (-(quota[c] - share[c]).item(), c))
    for c in order[: count - int(share.sum())]:
        share[c] += 1
    g = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for c, k in zip(classes.tolist(), share.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        held += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def labels_of(ds: Dataset) -> torch.Tensor:
    """Every label of ``ds``, without loading images where the set knows them."""
    if isinstance(ds, InMemoryImages):
        return ds.labels
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets, dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def take(ds: Dataset, indices: list[int]) -> Dataset:
    """The items of ``ds`` at ``indices`` (an in-memory set stays one)."""
    if isinstance(ds, InMemoryImages):
        return ds.subset(indices)
    return Subset(ds, indices)


def _limited(ds: Dataset, n: int | None) -> Dataset:
    if not n or n >= len(ds):
        return ds
    # a fixed random subset, not the first n, because folders are sorted by class
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return take(ds, sorted(order.tolist()))
