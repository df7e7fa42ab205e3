"""The digits batch path (core/batches.py) against the per-image path it replaced in 0.3.0.

The quickstart's accuracy fell after that change; these pin what was checked when looking for the
cause: the stored images and the augmentation are those of the per-image path, value for value,
so a later change to either shows up here rather than as a quickstart regression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from compresspipe.core.config import DataConfig
from compresspipe.core.datasets import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, build_sets

SIZE = 32


def _per_image_reference() -> tuple[torch.Tensor, list[int], list[int]]:
    """The 0.2 per-image path's images: /16, bilinear resize (no antialias), (x - 0.5) / 0.5."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 0.5) / 0.5
    train, test = train_test_split(range(len(digits.target)), test_size=DIGITS_TEST_SIZE,
                                   stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    return x, train, test


def test_digits_images_are_the_per_image_paths():
    sets = build_sets(DataConfig(name="digits", image_size=SIZE, augment=True, val_split=0))
    x, train, test = _per_image_reference()
    assert sets.train.images.dtype == torch.float32
    assert torch.equal(sets.train.images, x[train])
    assert torch.equal(sets.test.images, x[test])


def test_digits_augmentation_is_the_per_image_shift():
    """Each image is the old ShiftAugment's crop: edges replicated by side // 8, offsets drawn
    uniformly from 0..2 * pad on both axes, never flipped (a mirrored digit is another symbol)."""
    sets = build_sets(DataConfig(name="digits", image_size=SIZE, augment=True, val_split=0))
    augment, pad = sets.train.augment, SIZE // 8
    params = augment.draw(4000, torch.Generator().manual_seed(0))
    assert params[:, :2].min() == 0 and params[:, :2].max() == 2 * pad
    assert not params[:, 2].any()
    index = torch.arange(64)
    batch, _ = sets.train.batch(index, params[:64])
    for i in index.tolist():
        padded = F.pad(sets.train.images[i: i + 1], (pad,) * 4, mode="replicate")[0]
        dx, dy = params[i, 0].item(), params[i, 1].item()
        assert torch.equal(batch[i], padded[:, dy: dy + SIZE, dx: dx + SIZE]), i
