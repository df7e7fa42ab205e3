"""``huffman``: Deep Compression's third stage — the model as a Huffman-coded ``.cpz`` file.

Clustered weights (from the ``cluster`` stage) are stored as canonical-Huffman-coded indices
with their codebook, pruned positions as coded gaps (or runs/bitmap, whichever is smaller);
1-D float tensors as float16 or a small codebook when the decision data shows no change
(``vectors``, compresspipe.stages.vector_choice), other tensors raw. With ``onnx_cpz`` the stage
also writes model.onnx.cpz, the ONNX graph with the same coded weights, for devices that have
only numpy and onnxruntime (compresspipe/formats/cpz_onnx_reader.py). The ``.cpz`` becomes the artifact's deployable file: the runner measures its
bytes and evaluates the model decoded from it.

After ``ptq``/``qat`` the deployed model is their int8 ONNX file, and that is what gets coded:
int8 weights Huffman-coded (zero-point entries as positions), the rest of the file losslessly,
so the decoded model is that file byte for byte and runs in onnxruntime.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..compress.quant.batchnorm import STATISTICS, fold_statistics
from ..compress.quant.onnx_int8 import DEPLOY_FORMAT, check_int8_masks
from ..core import artifact_keys
from ..core.artifact import Artifact
from ..core.distributed import is_main
from ..core.errors import CompressPipeError
from ..formats import coding_summary, container_parts, inspect_cpz
from ..formats.cpz_model import (
    CPZ_FILE,
    LINEAGE_DETAIL,
    read_model_cpz,
    read_onnx_cpz,
    write_int8_cpz,
    write_model_cpz,
)
from ..formats.cpz_onnx import ONNX_CPZ_FILE, write_onnx_cpz
from ..formats.export import example_inputs
from .base import Stage, StageConfig
from .context import StageContext
from .registry import register_stage, stage_class
from .spec import PipelineView
from .vector_choice import choose_vectors


class HuffmanConfig(StageConfig):
    float_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage of unclustered float tensors (float16 is lossy; the "
        "reported accuracy is the decoded model's either way).")
    fold_bn: bool = Field(
        True, description="Fold BatchNorm running statistics into the affine scale and shift "
        "first, so the file stores 2 vectors per BatchNorm instead of 4 (outputs change only by "
        "float rounding; the deviation is logged as bn_fold_max_abs_diff).")
    vectors: Literal["auto", "float32", "float16"] = Field(
        "auto", description="Storage of 1-D float tensors (BatchNorm scales and shifts, biases): "
        "'auto' tries per-tensor codebooks of 4 to 8 bits, then float16, for all of them at once "
        "and keeps the coarsest that leaves top-1 and loss on validation data (the training data "
        "when the pipeline has no validation split; never the test set) unchanged; when none "
        "does, it decides tensor by tensor, largest first (a validation pass per tensor and "
        "coding tried, at most 5 per tensor), and a tensor no coding leaves unchanged stays "
        "float32. The choice per tensor is in the file's metadata 'encoding'.")
    lineage: Literal[LINEAGE_DETAIL] = Field(
        "full", description="What model.cpz keeps of how the model was made: every stage's name, "
        "type, config and metrics ('full'), the same without configs ('metrics'), or nothing "
        "('none': only what decoding needs, for the smallest files). MLflow keeps the whole "
        "record either way.")
    onnx_cpz: bool = Field(
        False, description="Also write model.onnx.cpz: the model's ONNX graph with its weights "
        "coded as in model.cpz (sparse, shared), readable on a device with only numpy and "
        "onnxruntime by the single file compresspipe/formats/cpz_onnx_reader.py.")


@register_stage("huffman")
class HuffmanStage(Stage):
    """Huffman-code the model into model.cpz (lossless for clustered weights)."""

    Config = HuffmanConfig
    codes_incoming_deployable = True

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        earlier = view.earlier
        previous = stage_class(earlier[-1]) if earlier else None
        if previous and previous.deploys_int8 and self.config.float_dtype != "float32":
            return [("float_dtype", f"the int8 ONNX model of stage {earlier[-1].name!r} is "
                     "coded losslessly, float tensors included; use float32")]
        return []

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        onnx_file = self._incoming_int8(ctx)
        if onnx_file is not None:
            return self._run_int8(artifact, ctx, onnx_file)

        dtype, lineage = self.config.float_dtype, self.config.lineage
        folded = self._fold_bn(artifact, ctx) if self.config.fold_bn else []
        omitted = {f"{bn}.{stat}" for bn in folded for stat in STATISTICS}
        vectors, expected = choose_vectors(artifact, ctx, self.config.vectors, omitted)
        state = artifact.model.state_dict()
        with torch.no_grad():  # the artifact is the model the file decodes to, vectors included
            for name, value in expected.items():
                state[name].copy_(value)
        # encode once here to verify the round trip before the runner writes the artifact
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / CPZ_FILE
            size = write_model_cpz(artifact, probe, dtype, folded, vectors, lineage)
            decoded = read_model_cpz(probe).model.state_dict()
            rows = inspect_cpz(probe)
            coding, parts = coding_summary(rows), container_parts(probe, rows)
        exact = dtype == "float32"
        for name, value in artifact.model.state_dict().items():
            got = decoded[name]
            value = value.cpu()
            # stale codebooks cannot cause this: the runner drops weight sharing a stage undid
            if exact and not torch.equal(got, value):
                raise CompressPipeError(f"stage {self.name!r}: {name!r} does not decode "
                                        "bit-exactly")
            if name in artifact.masks and torch.count_nonzero(got[~artifact.masks[name].bool()]):
                raise CompressPipeError(f"stage {self.name!r}: pruned weights of {name!r} "
                                        "are not zero after decoding")
        clustered = len(artifact_keys.cluster_layers(artifact))
        ctx.log_metrics({"cpz_bytes": size, "clustered_tensors": clustered,
                         "bn_folded": len(folded),
                         "cpz_overhead_fraction": parts["overhead"] / size,
                         **{f"cpz_{k}": v for k, v in coding.items()}}, None)
        artifact.outputs[CPZ_FILE] = lambda path: write_model_cpz(artifact, path, dtype, folded,
                                                                  vectors, lineage)
        if self.config.onnx_cpz:
            example = example_inputs(ctx.data.train)  # shapes only
            artifact.outputs[ONNX_CPZ_FILE] = lambda path: write_onnx_cpz(artifact, example, path,
                                                                          vectors)
        artifact.deploy = {"format": "cpz", "files": [CPZ_FILE], "module": "compresspipe.formats.cpz_model"}
        return artifact

    def _fold_bn(self, artifact: Artifact, ctx: StageContext) -> list[str]:
        """Fold BatchNorm statistics in place (clustered tensors untouched); log the deviation."""

        model = artifact.model.eval()
        layers = set(artifact_keys.cluster_layers(artifact))
        examples = ctx.data.examples()  # the validation split: the test set only reports
        inputs = torch.stack([examples[i][0] for i in range(min(len(examples), 256))])
        inputs = inputs.to(next(model.parameters()).device)
        with torch.no_grad():
            before = model(inputs)
            folded = fold_statistics(model, skip=layers)
            deviation = (model(inputs) - before).abs().max().item()
        ctx.log_metrics({"bn_fold_max_abs_diff": deviation}, None)
        return folded

    def _incoming_int8(self, ctx: StageContext) -> Path | None:
        """The int8 ONNX file the previous stage deploys, if it deploys one."""
        name = ctx.previous_stage
        deploy = ctx.load_stage(name).deploy  # on every rank: a collective under torchrun
        if not deploy or deploy.get("format") != DEPLOY_FORMAT:
            return None
        return ctx.stage_dir(name) / deploy["files"][0]

    def _run_int8(self, artifact: Artifact, ctx: StageContext, source: Path) -> Artifact:
        """Code the int8 ONNX file; check it decodes to the same file with the masks kept."""

        import onnx  # lazy: onnx loads only where ONNX files are written or read


        artifact.deploy = {"format": "cpz", "files": [CPZ_FILE], "module": "compresspipe.formats.cpz_model"}
        if not is_main():  # rank 0 writes the file; the others go on with its artifact
            return artifact
        path = ctx.work_dir / CPZ_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        size = write_int8_cpz(artifact, source, path, self.config.lineage)
        decoded, _ = read_onnx_cpz(path)
        original = source.read_bytes()
        identical = decoded == original
        # another protobuf build may order bytes differently: the model must still be the same
        if not identical and onnx.load_from_string(decoded) != onnx.load_from_string(original):
            raise CompressPipeError(f"stage {self.name!r}: {CPZ_FILE} does not decode to "
                                    f"{source.name}")
        absent = check_int8_masks(onnx.load_from_string(decoded), artifact.masks, self.name,
                                  f"decoded from {CPZ_FILE}")
        rows = inspect_cpz(path)
        ctx.log_metrics({"cpz_bytes": size, "int8_onnx_bytes": len(original),
                         "int8_tensors": sum(r["kind"] == "int8" for r in rows),
                         "clustered_tensors": 0, "bn_folded": 0,
                         "cpz_onnx_byte_identical": float(identical),
                         "int8_masked_tensors_checked": len(artifact.masks) - len(absent),
                         **{f"cpz_{k}": v for k, v in coding_summary(rows).items()}}, None)
        print(f"[{self.name}] int8 model {source.name} {len(original):,} bytes -> {CPZ_FILE} "
              f"{size:,} bytes", flush=True)
        artifact.outputs[CPZ_FILE] = lambda dest, src=path: shutil.copyfile(src, dest)
        return artifact
