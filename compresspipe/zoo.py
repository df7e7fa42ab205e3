"""Small reference networks that papers measure on and timm does not ship, as model factories.

A pipeline names one with ``model: {factory: compresspipe.zoo:lenet_300_100}`` (or
``lenet_5``); the runner passes ``in_chans`` and ``num_classes`` from the dataset. Both are the
networks of Deep Compression's MNIST table (Han, Mao, Dally 2016), the LeNets of Caffe's example:

- LeNet-300-100: fully connected 784-300-100-10 with ReLU, 266,610 parameters (1,066,440 B fp32;
  the paper's 1070 KB).
- LeNet-5 (Caffe): conv 5×5×20 → max-pool → conv 5×5×50 → max-pool → fc 500 → fc 10, with ReLU
  after the first fc only, 431,080 parameters (1,724,320 B fp32; the paper's 1720 KB).
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet300100(nn.Module):
    """784-300-100-10 multilayer perceptron; the image is flattened."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.in_features = in_chans * image_size * image_size
        self.fc1 = nn.Linear(self.in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.act = nn.ReLU()

    def get_classifier(self) -> nn.Module:
        """The output layer (timm's accessor, which the pruning edge-layer policy reads)."""
        return self.fc3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe's LeNet: two 5×5 conv + max-pool blocks, then fc 500 → fc num_classes."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16 px, got image_size={image_size}")
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.act = nn.ReLU()

    def get_classifier(self) -> nn.Module:
        """The output layer (timm's accessor, which the pruning edge-layer policy reads)."""
        return self.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        return self.fc2(self.act(self.fc1(torch.flatten(x, 1))))


def lenet_300_100(in_chans: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """LeNet-300-100 (Deep Compression, LTH): ``model: {factory: compresspipe.zoo:lenet_300_100}``."""
    return LeNet300100(in_chans, num_classes, image_size)


def lenet_5(in_chans: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """Caffe's LeNet-5 (Deep Compression): ``model: {factory: compresspipe.zoo:lenet_5}``."""
    return LeNet5(in_chans, num_classes, image_size)
