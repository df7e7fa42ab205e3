"""CIFAR's binary version (core/cifar): records, both variants, and refusing the pickle one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compresspipe.core import cifar
from compresspipe.core.config import DataConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import CompressPipeError


def _records(n: int, label_bytes: int, classes: int, seed: int) -> tuple[bytes, np.ndarray]:
    """``n`` records; the red plane's first pixel is the label, the blue plane's first pixel
    is 200, so channel order and pairing can both be checked."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    pixels = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    pixels[:, 0, 0, 0] = labels
    pixels[:, 2, 0, 0] = 200
    head = np.zeros((n, label_bytes), np.uint8)
    head[:, -1] = labels
    if label_bytes == 2:
        head[:, 0] = labels % 20  # the coarse label, which must not be the one used
    return np.concatenate([head, pixels.reshape(n, -1)], axis=1).tobytes(), labels


def _write(root, name: str, per_file: int = 12) -> None:
    layout = cifar.LAYOUTS[name]
    directory = root / layout.directory
    directory.mkdir(parents=True)
    for i, f in enumerate(layout.train_files + layout.test_files):
        raw, _ = _records(per_file, layout.label_bytes, layout.classes, seed=i)
        (directory / f).write_bytes(raw)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_binary_records_load_with_labels_and_channel_order(tmp_path, name):
    _write(tmp_path, name, per_file=20 if name == "cifar10" else 100)
    d = build_data(DataConfig(name=name, root=tmp_path, image_size=32, val_split=0))
    layout = cifar.LAYOUTS[name]
    n_train = (20 if name == "cifar10" else 100) * len(layout.train_files)
    assert (len(d.train), len(d.test), d.num_classes) == (n_train, len(d.test), layout.classes)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (3, 32, 32)
    x, y = d.test[7]
    assert int(y) == 7  # the fine label for CIFAR-100 (its coarse byte holds 7 % 20 too: n < 20)
    assert x[0, 0, 0].item() == pytest.approx((7 / 255 - 0.5) / 0.5)
    assert x[2, 0, 0].item() == pytest.approx((200 / 255 - 0.5) / 0.5)


def test_cifar100_trains_on_the_fine_label_not_the_coarse_one(tmp_path):
    _write(tmp_path, "cifar100", per_file=100)
    d = build_data(DataConfig(name="cifar100", root=tmp_path, image_size=32, val_split=0))
    x, y = d.test[57]  # coarse byte 57 % 20 = 17
    assert int(y) == 57


def test_files_directly_in_root_are_found(tmp_path):
    _write(tmp_path, "cifar10")
    for f in (tmp_path / "cifar-10-batches-bin").iterdir():
        f.rename(tmp_path / f.name)
    assert len(cifar.load_cifar_set("cifar10", tmp_path)["test_labels"]) == 12


def test_pickle_version_is_refused_with_the_way_to_the_binary_one(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04not opened")
    with pytest.raises(CompressPipeError, match=r"^data.root: no cifar10 binary files in") as info:
        build_data(DataConfig(name="cifar10", root=tmp_path, image_size=32))
    message = str(info.value)
    assert "Python-pickle version, which compresspipe does not open" in message
    assert "data.download: true" in message and "cifar-10-binary.tar.gz" in message


def test_truncated_file_is_named(tmp_path):
    _write(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CompressPipeError, match="data_batch_3.bin: 36871 bytes is not a whole "
                       "number of 3073-byte"):
        build_data(DataConfig(name="cifar10", root=tmp_path, image_size=32))


def test_label_outside_the_classes_is_named(tmp_path):
    _write(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[3 * 3073] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(CompressPipeError, match="test_batch.bin: record 3 has label 10, outside "
                       "the 10 classes"):
        build_data(DataConfig(name="cifar10", root=tmp_path, image_size=32))


def test_download_fetches_the_binary_archive_checked_against_its_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, md5=None, remove_finished=False):
        calls.append((url, md5))
        _write(tmp_path, "cifar10")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", fake_download)
    d = build_data(DataConfig(name="cifar10", root=tmp_path, image_size=32, download=True,
                              val_split=0))
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                      "c32a1d4ab5d03f1284b67883e8d87530")]
    assert len(d.test) == 12
    build_data(DataConfig(name="cifar10", root=tmp_path, image_size=32, download=True))
    assert len(calls) == 1  # already there: nothing fetched again


def test_no_root_is_one_line():
    with pytest.raises(CompressPipeError, match=r"^data.root: 'cifar100' needs a root directory"):
        build_data(DataConfig(name="cifar100", image_size=32))
