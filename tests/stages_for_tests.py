"""Third-party stages referenced by dotted path from test pipelines."""

from __future__ import annotations

import torch

from compresspipe.stages.base import Stage, StageConfig


class BoomConfig(StageConfig):
    message: str = "boom"


class Boom(Stage):
    """Fails on purpose, to test that runs are closed as FAILED."""

    Config = BoomConfig

    def run(self, artifact, ctx):
        raise RuntimeError(self.config.message)


class ZeroHalfConfig(StageConfig):
    tensor: str = "fc.weight"


class ZeroHalf(Stage):
    """A toy 'pruning' stage: zeroes half of one tensor and records the mask."""

    Config = ZeroHalfConfig

    def run(self, artifact, ctx):
        param = dict(artifact.model.named_parameters())[self.config.tensor]
        mask = torch.ones_like(param, dtype=torch.bool)
        mask.view(-1)[: mask.numel() // 2] = False
        with torch.no_grad():
            param.mul_(mask)
        artifact.masks[self.config.tensor] = mask
        return artifact


class Revive(Stage):
    """Breaks composition on purpose: writes ones over every masked weight."""

    def run(self, artifact, ctx):
        params = dict(artifact.model.named_parameters())
        with torch.no_grad():
            for name in artifact.masks:
                params[name].fill_(1.0)
        return artifact
