"""The config sections the core uses: where the model comes from, the data, and the training
loop's settings. Strict pydantic models: unknown keys are errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)


def usable_path(value: Path) -> Path:
    """A path the file system can look up: checking one with a NUL byte, an unencodable
    character or an over-long name raises instead of answering 'no such file'."""
    text = str(value)
    if "\x00" in text:
        raise ValueError("a path cannot contain a NUL character")
    try:
        parts = [os.fsencode(part) for part in value.parts]
    except UnicodeEncodeError:
        raise ValueError("the path has characters this file system cannot encode") from None
    if sum(map(len, parts)) > 4000 or any(len(part) > 255 for part in parts):
        raise ValueError("path too long (at most 255 bytes per name, 4000 in all)")
    return value


UsablePath = Annotated[Path, AfterValidator(usable_path)]


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """Where the network comes from: a timm name or a Python factory, plus weights."""

    name: str | None = Field(None, description="timm model name, e.g. 'resnet18'.")
    factory: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="Python factory 'package.module:function' returning an nn.Module.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for timm.create_model / the factory "
        "(in_chans and num_classes default to the dataset's).",
    )
    pretrained: bool = Field(False, description="Load timm hub weights (needs internet).")
    checkpoint: UsablePath | None = Field(
        None, description="Weights to start from: .safetensors, or a state dict (weights_only)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of 'name' (a timm model) or 'factory'")
        if self.pretrained and self.factory:
            raise ValueError("'pretrained' applies to timm models, not to a factory")
        return self


DatasetName = Literal["digits", "imagefolder", "mnist", "fashion_mnist", "cifar10", "cifar100", "fake"]


class DataConfig(StrictModel):
    """The dataset, its preprocessing and loaders."""

    name: DatasetName = Field("digits", description="Built-in dataset or 'imagefolder'.")
    root: UsablePath | None = Field(
        None, description="Dataset directory. mnist/fashion_mnist: idx files (.gz or not) in "
        "the Debian layout (<root>/train-images-idx3-ubyte.gz) or torchvision's "
        "(<root>/FashionMNIST/raw/...); omitted, the Debian package's "
        "/usr/share/datasets/fashion-mnist (or .../mnist). cifar10/cifar100: CIFAR's binary "
        "version (<root>/cifar-10-batches-bin/, <root>/cifar-100-binary/); its Python-pickle "
        "version is not read.")
    download: bool = Field(False, description="Download the dataset into root first (MNIST family "
                          "through torchvision; CIFAR's binary archive, MD5-checked).")
    image_size: int = Field(32, ge=4, le=2048, description="Images are resized to this side.")
    channels: int | None = Field(
        None, ge=1, le=4, description="Force this many input channels (grayscale is replicated)."
    )
    batch_size: int = Field(64, ge=1, le=65536)
    eval_batch_size: int | None = Field(None, ge=1, le=65536)
    workers: int = Field(0, ge=0, le=128, description="DataLoader worker processes.")
    augment: bool = Field(False, description="Training augmentation (random crop/flip/shift).")
    limit_train: int | None = Field(None, ge=1, description="Use only N training images (a "
                                    "fixed random subset, taken after the validation split).")
    limit_test: int | None = Field(None, ge=1, description="Use only N test images (a fixed "
                                   "random subset).")
    limit_val: int | None = Field(None, ge=1, description="Use only N validation images.")
    val_split: float = Field(
        0.1, ge=0, description="Validation split held out of the training set, stratified by "
        "class: a fraction (< 1) or a count (>= 1); 0 turns it off (then anything that must "
        "choose, e.g. the per-epoch evaluation, has no split to choose on).")
    split_seed: int = Field(0, ge=0, description="Seed of the validation split (fixed, not the "
                            "pipeline's seed, so that every run holds out the same images).")
    num_classes: int | None = Field(None, ge=2, le=100000, description="'fake' only.")
    train_size: int = Field(256, ge=1, le=10_000_000, description="'fake' only.")
    test_size: int = Field(64, ge=1, le=10_000_000, description="'fake' only.")

    @model_validator(mode="after")
    def _fake_only_keys(self) -> DataConfig:
        if self.name != "fake" and self.num_classes is not None:
            raise ValueError("'num_classes' is set by the dataset; only 'fake' takes it")
        if self.val_split >= 1 and self.val_split != int(self.val_split):
            raise ValueError(f"val_split {self.val_split} is neither a fraction below 1 nor a "
                             "whole number of images")
        if self.download and self.root is None:
            raise ValueError("'download' needs a 'root' to download into")
        return self

    def dataset_num_classes(self) -> int | None:
        """Class count known without reading the data (None for imagefolder)."""
        fixed = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
        if self.name == "fake":
            return self.num_classes or 10
        return fixed.get(self.name)

    def dataset_channels(self) -> int:
        """Input channels the model sees."""
        if self.channels is not None:
            return self.channels
        return 1 if self.name in ("digits", "mnist", "fashion_mnist") else 3


class TrainConfig(StrictModel):
    """The one training loop's settings, shared by every stage that trains."""

    epochs: int = Field(10, ge=0, le=100_000)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["constant", "step", "cosine", "linear", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up from 0, in epochs.")
    step_size: int = Field(30, ge=1, description="'step': epochs between LR drops.")
    gamma: float = Field(0.1, gt=0, le=1, description="'step': LR factor at each drop.")
    min_lr: float = Field(0.0, ge=0, description="Floor of cosine/linear decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="Max global gradient norm.")
    eval_every: int = Field(1, ge=1, description="Evaluate every N epochs (and the last).")
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameter-name patterns (fnmatch) kept frozen, e.g. 'stem.*'.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if self.min_lr >= self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be below lr ({self.lr})")
        return self
