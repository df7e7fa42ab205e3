"""``huffman``: Deep Compression's third stage — the model as a Huffman-coded ``.cpz`` file.

Clustered weights (from the ``cluster`` stage) are stored as canonical-Huffman-coded indices
with their codebook, pruned positions as coded gaps (or runs/bitmap, whichever is smaller);
other tensors raw. The ``.cpz`` becomes the artifact's deployable file: the runner measures its
bytes and evaluates the model decoded from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..registry import register_stage
from .base import Stage, StageConfig

if TYPE_CHECKING:
    from ..artifact import Artifact
    from ..context import StageContext


class HuffmanConfig(StageConfig):
    float_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage of unclustered float tensors (float16 is lossy; the "
        "reported accuracy is the decoded model's either way).")
    fold_bn: bool = Field(
        True, description="Fold BatchNorm running statistics into the affine scale and shift "
        "first, so the file stores 2 vectors per BatchNorm instead of 4 (outputs change only by "
        "float rounding; the deviation is logged as bn_fold_max_abs_diff).")


@register_stage("huffman")
class HuffmanStage(Stage):
    """Huffman-code the model into model.cpz (lossless for clustered weights)."""

    Config = HuffmanConfig

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        import tempfile
        from pathlib import Path

        import torch

        from ..coding import coding_summary, inspect_cpz
        from ..cpz_model import CPZ_FILE, read_model_cpz, write_model_cpz
        from ..errors import CompressPipeError

        dtype = self.config.float_dtype
        folded = self._fold_bn(artifact, ctx) if self.config.fold_bn else []
        # encode once here to verify the round trip before the runner writes the artifact
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / CPZ_FILE
            size = write_model_cpz(artifact, probe, dtype, folded)
            decoded = read_model_cpz(probe).model.state_dict()
            coding = coding_summary(inspect_cpz(probe))
        exact = dtype == "float32"
        for name, value in artifact.model.state_dict().items():
            got = decoded[name]
            if exact and not torch.equal(got, value.cpu()):
                hint = (" (its weights changed after the cluster stage: run cluster again)"
                        if f"cluster.{name}.indices" in artifact.extras else "")
                raise CompressPipeError(f"stage {self.name!r}: {name!r} does not decode "
                                        f"bit-exactly{hint}")
            if name in artifact.masks and torch.count_nonzero(got[~artifact.masks[name].bool()]):
                raise CompressPipeError(f"stage {self.name!r}: pruned weights of {name!r} "
                                        "are not zero after decoding")
        clustered = len(artifact.quant.get("cluster", {}).get("layers", {}))
        ctx.log_metrics({"cpz_bytes": size, "clustered_tensors": clustered,
                         "bn_folded": len(folded),
                         **{f"cpz_{k}": v for k, v in coding.items()}}, None)
        artifact.outputs[CPZ_FILE] = lambda path: write_model_cpz(artifact, path, dtype, folded)
        artifact.deploy = {"format": "cpz", "files": [CPZ_FILE], "module": "compresspipe.cpz_model"}
        return artifact

    def _fold_bn(self, artifact: Artifact, ctx: StageContext) -> list[str]:
        """Fold BatchNorm statistics in place (clustered tensors untouched); log the deviation."""
        import torch

        from ..batchnorm import fold_statistics

        model = artifact.model.eval()
        layers = set(artifact.quant.get("cluster", {}).get("layers", {}))
        inputs = next(iter(ctx.data.test_loader()))[0].to(next(model.parameters()).device)
        with torch.no_grad():
            before = model(inputs)
            folded = fold_statistics(model, skip=layers)
            deviation = (model(inputs) - before).abs().max().item()
        ctx.log_metrics({"bn_fold_max_abs_diff": deviation}, None)
        return folded
