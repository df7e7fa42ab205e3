"""Data sets held in memory, and a loader that prepares whole batches with tensor ops.

For data that fits in memory (digits, the MNIST family, CIFAR, fake data) a DataLoader that
builds every image through PIL, one at a time, costs more than a small model's forward and
backward pass. Here the images are held once (uint8, or float for the sets made in memory),
and each batch is gathered by index, converted, resized, normalised and augmented in a few
tensor operations.

Randomness: ``BatchLoader`` draws the epoch's order *and* every image's augmentation from the
generator the training loop reseeds at each epoch start, all at once, before the first batch.
So a resumed run sees the same batches, and under torchrun the shards of one epoch (every
world-th position, as ``ShardSampler``) are together exactly the single-process epoch, with
the same augmentation of every image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

_MINUS_ONE = torch.tensor(-1.0)


@dataclass(frozen=True)
class Prepare:
    """Stored images -> model inputs: scale to [0, 1], resize, normalise, set the channels.

    ``None`` fields skip a step (the sets made in memory are stored ready to use)."""

    size: int | None = None
    channels: int | None = None
    scale: float | None = None  # 1/255 for uint8 storage
    normalize: bool = False     # (x - 0.5) / 0.5, as the torchvision path did

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        resize = self.size is not None and x.shape[-1] != self.size
        if self.scale is not None and self.normalize and not resize:
            # (x * scale - 0.5) / 0.5 as -1 + (2 * scale) * x: one pass after the conversion
            x = torch.add(_MINUS_ONE, x.to(torch.float32), alpha=2 * self.scale)
        else:
            x = x.float()
            if self.scale is not None:
                x = x * self.scale
            if resize:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                  align_corners=False, antialias=x.shape[-1] > self.size)
            if self.normalize:
                x = (x - 0.5) / 0.5
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1:  # RGB -> luminance (ITU-R 601-2, as PIL's convert("L"))
                weights = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * weights).sum(1, keepdim=True)
            else:  # gray replicated
                x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


@dataclass(frozen=True)
class Augment:
    """Random shift (crop of the padded image) and, for non-gray sets, horizontal flip."""

    pad: int
    pad_mode: str = "constant"  # "constant": zeros, "replicate": the edge pixels
    flip: bool = False

    def draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Parameters for ``n`` images: (n, 3) = x offset, y offset, flip."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n)
        return torch.cat([offsets, flips.long().unsqueeze(1)], 1)

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, S, S) shifted and flipped as ``params`` (from ``draw``) say."""
        b, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode=self.pad_mode) if p else x
        rows = params[:, 1, None] + torch.arange(h)        # (B, h)
        cols = params[:, 0, None] + torch.arange(w)        # (B, w)
        cols = torch.where(params[:, 2, None].bool(), cols.flip(1), cols)
        # two gathers (rows, then columns): cheaper than one 4-d advanced index
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class InMemoryImages(Dataset):
    """Images (N, C, H, W) and labels (N,) held once; ``prepare`` makes model inputs.

    ``augment`` is used by ``BatchLoader`` only: indexing one image gives it unaugmented."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, prepare: Prepare,
                 augment: Augment | None = None):
        self.images, self.labels = images, labels.long()
        self.prepare, self.augment = prepare, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.images[i: i + 1])[0], self.labels[i]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def subset(self, index: torch.Tensor | list[int], augment: bool = True) -> InMemoryImages:
        """A new set holding the images at ``index`` (copied: splits are disjoint)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return InMemoryImages(self.images[index], self.labels[index], self.prepare,
                              self.augment if augment else None)

    def batch(self, index: torch.Tensor, params: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs and labels of the images at ``index``, augmented by ``params``."""
        # index_select, not images[index]: about 20x faster for a batch (measured, CPU)
        x = self.prepare(self.images.index_select(0, index))
        if params is not None and self.augment is not None:
            x = self.augment(x, params)
        return x, self.labels.index_select(0, index)


class BatchLoader:
    """A DataLoader's interface (``len``, iteration, ``dataset``, ``batch_size``) over an
    ``InMemoryImages``, building each batch with ``InMemoryImages.batch``.

    Shuffled: every epoch (``iter``) draws a permutation and the augmentation from
    ``generator``; under ``world`` > 1 it yields this ``rank``'s share, wrapped around to a
    multiple of ``world`` like ``ShardSampler``. In order: ``positions`` (default all) as
    given, no padding.
    """

    def __init__(self, data: InMemoryImages, batch_size: int, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
                 positions: list[int] | None = None):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.generator, self.rank, self.world = generator, rank, world
        self.positions = positions

    @property
    def dataset(self) -> Dataset:
        """The images this loader yields (a ``Subset`` for an in-order shard)."""
        return self.data if self.positions is None else Subset(self.data, self.positions)

    def _count(self) -> int:
        if self.shuffle:
            return math.ceil(len(self.data) / self.world)
        return len(self.data) if self.positions is None else len(self.positions)

    def __len__(self) -> int:
        return math.ceil(self._count() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = None
        if self.shuffle:
            n = len(self.data)
            order = torch.randperm(n, generator=self.generator)
            if self.data.augment is not None:
                params = self.data.augment.draw(n, self.generator)
            total = self._count() * self.world
            if n and total > n:  # wrap around so that every process runs as many steps
                reps = math.ceil(total / n)
                order, params = order.repeat(reps)[:total], _repeat(params, reps, total)
            mine = torch.arange(self.rank, total, self.world)
            order, params = order[mine], None if params is None else params[mine]
        elif self.positions is not None:
            order = torch.as_tensor(self.positions, dtype=torch.long)
        else:
            order = torch.arange(len(self.data))
        for start in range(0, len(order), self.batch_size):
            stop = start + self.batch_size
            yield self.data.batch(order[start:stop],
                                  None if params is None else params[start:stop])


def _repeat(params: torch.Tensor | None, reps: int, total: int) -> torch.Tensor | None:
    return None if params is None else params.repeat(reps, 1)[:total]
