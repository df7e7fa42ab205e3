"""Idx files, the validation split and the in-memory batch path (core/idx, data, batches)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from compresspipe.core import data as data_module
from compresspipe.core import idx
from compresspipe.core.batches import Augment, BatchLoader, InMemoryImages, Prepare
from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.data import build_data, stratified_split
from compresspipe.core.errors import CompressPipeError
from compresspipe.core.training import Trainer


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def _write_set(directory, n_train=50, n_test=20, gz=True, side=6, seed=0):
    """Tiny idx files; pixel (0, 0) of every image is its label, to check pairing."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, side, side)).astype(np.uint8)
        images[:, 0, 0] = labels
        for part, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = _idx_bytes(array)
            name = directory / f"{prefix}-{part}"
            if gz:
                with gzip.open(name.with_name(name.name + ".gz"), "wb") as f:
                    f.write(raw)
            else:
                name.write_bytes(raw)


@pytest.mark.parametrize(("layout", "gz"), [("debian", True), ("torchvision", False),
                                            ("torchvision", True)])
def test_idx_files_in_either_layout(tmp_path, layout, gz):
    where = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    _write_set(where, gz=gz)
    d = build_data(DataConfig(name="fashion_mnist", root=tmp_path, image_size=6, val_split=10))
    assert (len(d.train), len(d.val), len(d.test)) == (40, 10, 20)
    assert d.train.images.dtype == torch.uint8  # held once, as bytes
    x, y = d.test[3]
    assert x.shape == (1, 6, 6) and int(y) == 3
    # the pairing survives: pixel (0, 0) holds the label, normalised as (v / 255 - 0.5) / 0.5
    assert x[0, 0, 0].item() == pytest.approx((3 / 255 - 0.5) / 0.5)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(CompressPipeError, match=r"^data.root: no fashion_mnist idx files in .*"
                       r"set data.download: true") as info:
        build_data(DataConfig(name="fashion_mnist", root=tmp_path))
    assert "\n" not in str(info.value)
    monkeypatch.setitem(idx.DEBIAN_ROOTS, "fashion_mnist", tmp_path / "absent")
    with pytest.raises(CompressPipeError, match="apt-get install dataset-fashion-mnist"):
        build_data(DataConfig(name="fashion_mnist"))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: raw[:-7], "truncated or corrupt"),
    (lambda raw: b"\x01\x02" + raw[2:], "bad magic number"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "element type 0x0d"),
    (lambda raw: raw[:6], "truncated idx header"),
])
def test_corrupt_idx_file_is_named(tmp_path, damage, message):
    _write_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CompressPipeError, match=message) as info:
        build_data(DataConfig(name="mnist", root=tmp_path))
    assert str(path) in str(info.value)


def test_truncated_gzip_is_named(tmp_path):
    _write_set(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(CompressPipeError, match="cannot read idx data") as info:
        build_data(DataConfig(name="mnist", root=tmp_path))
    assert str(path) in str(info.value)


def test_labels_that_do_not_match_the_images_are_refused(tmp_path):
    _write_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(CompressPipeError, match="t10k-labels-idx1-ubyte: \\(7,\\) labels for 20"):
        build_data(DataConfig(name="mnist", root=tmp_path))


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(kept + held) == list(range(100)) and not set(kept) & set(held)
    assert torch.bincount(labels[held]).tolist() == [12, 6, 2]  # the classes' proportions
    assert stratified_split(labels, 0.2, seed=0) == (kept, held)
    assert stratified_split(labels, 0.2, seed=1)[1] != held
    assert len(stratified_split(labels, 7, seed=0)[1]) == 7  # a count
    with pytest.raises(CompressPipeError, match="both need some"):
        stratified_split(labels, 100, seed=0)


def test_digits_validation_split_comes_out_of_the_training_set():
    d = build_data(DataConfig(name="digits", image_size=8))
    train = {tuple(x.flatten().tolist()) for x in d.train.images}
    val = {tuple(x.flatten().tolist()) for x in d.val.images}
    assert len(d.val) == 144 and not train & val
    assert torch.bincount(d.val.labels).min() >= 13  # every class, in proportion
    off = build_data(DataConfig(name="digits", image_size=8, val_split=0))
    assert off.val is None and len(off.train) == 1437
    with pytest.raises(CompressPipeError, match="data.val_split is 0, but the search chooses"):
        off.val_loader(purpose="the search")


def test_limits_apply_after_the_split():
    full = build_data(DataConfig(name="fake", image_size=4, train_size=200))
    limited = build_data(DataConfig(name="fake", image_size=4, train_size=200, limit_train=50,
                                    limit_val=10))
    assert (len(limited.train), len(limited.val)) == (50, 10)
    val = {tuple(x.flatten().tolist()) for x in full.val.images}
    assert {tuple(x.flatten().tolist()) for x in limited.val.images} <= val  # same split
    assert not {tuple(x.flatten().tolist()) for x in limited.train.images} & val


def _memory_set(n=37, side=8, flip=True) -> InMemoryImages:
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8)
    prepare = Prepare(size=side, scale=1 / 255, normalize=True)
    return InMemoryImages(images, torch.arange(n) % 10, prepare, Augment(1, flip=flip))


def test_batch_augmentation_is_determined_by_the_generator():
    data = _memory_set()
    g = torch.Generator()

    def epoch(seed):
        g.manual_seed(seed)
        return [b for b in BatchLoader(data, 8, shuffle=True, generator=g)]

    a, b, c = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c]))
    # each image is shifted by at most the padding, and flipped or not
    g.manual_seed(5)
    order = torch.randperm(len(data), generator=g)
    params = data.augment.draw(len(data), g)
    plain = data.prepare(data.images[order[:8]])
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1))
    for i in range(8):
        dx, dy, flip = params[i].tolist()
        want = padded[i, :, dy: dy + 8, dx: dx + 8]
        assert torch.equal(a[0][0][i], want.flip(-1) if flip else want)


def test_shards_of_an_epoch_are_the_single_process_epoch():
    data = _memory_set(n=37)
    g = torch.Generator()

    def run(rank, world):
        g.manual_seed(3)
        return list(BatchLoader(data, 4, shuffle=True, generator=g, rank=rank, world=world))

    whole = torch.cat([x for x, _ in run(0, 1)])
    shards = [run(r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    per_rank = [torch.cat([x for x, _ in s]) for s in shards]
    assert all(len(p) == 13 for p in per_rank)  # 37 wrapped to 39 = 3 x 13
    interleaved = torch.stack(per_rank, 1).flatten(0, 1)[: len(whole)]
    assert torch.equal(interleaved, whole)  # same images, same augmentation


def test_sharded_evaluation_covers_the_split_once(monkeypatch):
    d = build_data(DataConfig(name="fake", image_size=8, train_size=50, test_size=23))
    monkeypatch.setattr(data_module, "world_size", lambda: 2)
    labels = []
    for r in (0, 1):
        monkeypatch.setattr(data_module, "rank", lambda r=r: r)
        labels.append(torch.cat([y for _, y in d.test_loader(shard=True)]))
    assert len(labels[0]) + len(labels[1]) == 23
    assert torch.equal(torch.stack([labels[0][:11], labels[1]], 1).flatten(), d.test.labels[:22])


def test_training_loop_evaluates_on_the_validation_split_not_the_test_set(monkeypatch):
    d = build_data(DataConfig(name="fake", image_size=8, train_size=60, test_size=30,
                              batch_size=32))
    seen = []
    real = d.val_loader

    def watched(*args, **kwargs):
        loader = real(*args, **kwargs)
        seen.append(len(loader.dataset))
        return loader

    monkeypatch.setattr(d, "val_loader", watched)
    monkeypatch.setattr(d, "test_loader", lambda *a, **k: pytest.fail("the test set was used"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 10))
    history = Trainer(model, d, TrainConfig(epochs=2, lr=0.01), device=torch.device("cpu"),
                      seed=0).fit()
    assert seen == [6] and "val_top1" in history[-1]
    # the number is the model's accuracy on the validation split
    from compresspipe.core.measure import evaluate

    assert history[-1]["val_top1"] == evaluate(model, real())["top1"]
