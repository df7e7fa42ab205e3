"""A model factory referenced as 'factories_for_tests:mlp' from test pipelines."""

from torch import nn


def mlp(in_chans: int = 1, num_classes: int = 10, hidden: int = 32, img: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img * img, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
