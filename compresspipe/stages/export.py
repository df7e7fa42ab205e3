"""``export``: the final model as files other programs load, each checked in a fresh process.

Formats: ``cpz`` (compresspipe's Huffman-coded container), ``safetensors`` (fp32 dense state
dict with the timm name and kwargs in its metadata), ``onnx`` (the int8 file of ptq/qat, else an
fp32 export of the deployed model) and ``torch_export`` (a ``.pt2`` program). Each file is
loaded by ``python -I`` without compresspipe (except ``.cpz``, which only compresspipe reads)
and its test accuracy must equal compresspipe's within ``tolerance`` points. The model and its
masks are not changed and the incoming deployed form stays the artifact's deployed form, so the
stage reports the same size and accuracy as the stage before it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import nn

from ..compress.quant.onnx_int8 import DEPLOY_FORMAT, OnnxModel, export_onnx
from ..core.artifact import Artifact
from ..core.distributed import is_main
from ..core.errors import CompressPipeError
from ..core.measure import check_tensor_masks, evaluate
from ..formats.cpz_model import CPZ_FILE, read_model_cpz, read_onnx_cpz, write_model_cpz
from ..formats.export import (
    DENSE_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    PROGRAM_FILE,
    Exported,
    check_onnx_zeros,
    example_inputs,
    onnx_opset,
    refuse_random_nodes,
    run_consumer,
    timm_rebuildable,
    write_dense_safetensors,
    write_manifest,
    write_split,
    write_torch_export,
)
from .base import Stage, StageConfig
from .context import StageContext
from .registry import register_stage, stage_class
from .spec import PipelineView

ExportFormat = Literal["cpz", "safetensors", "onnx", "torch_export"]
# deploy formats whose deployed model is the spec's network with (decoded) fp32 weights
DENSE_DEPLOYS = (None, "cpz", "codebook")


class ExportConfig(StageConfig):
    """Which files to write, how to check them, and what to log to MLflow."""

    formats: list[ExportFormat] | None = Field(
        None, min_length=1, description="Files to write. Default (null) follows the incoming "
        "model: [cpz, onnx] after huffman or cluster, [onnx] (the int8 file) after ptq/qat, "
        "[safetensors, onnx] otherwise.")
    opset: int | None = Field(
        None, ge=18, le=30, description="ONNX opset of the fp32 export (null: the exporter's "
        "default). The int8 ONNX file keeps the opset its ptq/qat stage wrote.")
    trim_padding_taps: bool = Field(
        True, description="fp32 ONNX: drop convolution kernel taps that, at the model's fixed "
        "input size, only ever read zero padding (same outputs, fewer bytes; windows recorded "
        "in the file's metadata).")
    verify: bool = Field(True, description="Load every file in a fresh process and compare "
                         "its test accuracy with compresspipe's.")
    tolerance: float = Field(0.1, ge=0, le=100, description="Allowed top-1 difference, in "
                             "points (one test image is 100/N points).")
    verify_timeout: int = Field(1800, ge=1, le=86_400,
                                description="Seconds one fresh-process check may take.")
    log_model: bool = Field(True, description="Log the ONNX file as an MLflow model (onnx "
                            "flavour, pickle-free) with an input example; needs 'onnx'.")

    @field_validator("formats")
    @classmethod
    def _no_repeats(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"each format at most once, found {value}")
        return value


@dataclass
class Incoming:
    """The previous stage's saved output, as the runner measured it."""

    name: str
    directory: Path
    deploy: dict[str, Any] | None
    deployed: nn.Module  # the model the pipeline reports
    deployed_top1: float
    dense: nn.Module  # the spec's network with fp32 weights: ``deployed`` unless it is int8
    dense_top1: float

    @property
    def format(self) -> str | None:
        return self.deploy["format"] if self.deploy else None

    @property
    def file(self) -> Path:
        return self.directory / self.deploy["files"][0]

    @property
    def int8(self) -> bool:
        """Whether the deployed model is an int8 ONNX model (its file, or a .cpz of it)."""
        return isinstance(self.deployed, OnnxModel)


@register_stage("export")
class ExportStage(Stage):
    """Write the model as .cpz, safetensors, ONNX or torch.export files, each loaded in a fresh
    process and checked against the reported accuracy."""

    Config = ExportConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        cfg = self.config
        earlier = view.earlier
        problems = []
        if cfg.log_model and cfg.formats is not None and "onnx" not in cfg.formats:
            problems.append(("log_model", "the MLflow model is the exported ONNX file: add "
                             "'onnx' to formats or set log_model: false"))
        coded = earlier and (cls := stage_class(earlier[-1])) and cls.codes_incoming_deployable
        int8 = earlier[-2:-1] if coded else earlier[-1:]
        if int8 and (cls := stage_class(int8[0])) and cls.deploys_int8:  # the file or its .cpz
            earlier = int8
            if cfg.formats is not None and "torch_export" in cfg.formats:
                problems.append(("formats", f"torch_export: the model of stage "
                                 f"{earlier[-1].name!r} is deployed as an int8 ONNX file, which "
                                 "a torch.export program cannot reproduce; use 'onnx'"))
            if cfg.opset is not None:
                problems.append(("opset", f"the int8 ONNX file of stage {earlier[-1].name!r} "
                                 "is exported as is, with the opset that stage wrote"))
        return problems

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        name = ctx.previous_stage
        source = ctx.load_stage(name)  # on every rank: a collective under torchrun
        if not is_main():  # rank 0 writes and checks the files; the others take its artifact
            return artifact
        incoming = _incoming(name, source, artifact, ctx)
        # the incoming deployed form stays the deployed form: the runner measures it again
        artifact.deploy = dict(incoming.deploy) if incoming.deploy else None
        for file in (incoming.deploy or {}).get("files", []):
            artifact.outputs[file] = _copier(incoming.directory / file)

        work = ctx.work_dir / "files"
        work.mkdir(parents=True, exist_ok=True)
        items = [self._write(fmt, artifact, incoming, work, ctx)
                 for fmt in cfg.formats or _default_formats(incoming.format)]
        if cfg.verify:
            test = ctx.data.test_loader()
            x_path, y_path = write_split(test, ctx.work_dir / "split")
            for item in items:
                run_consumer(item, x_path, y_path, test.batch_size, cfg.verify_timeout,
                             artifact.spec, self.name)
                if abs(item.top1 - item.reference_top1) > cfg.tolerance:
                    raise _mismatch(self.name, item, cfg.tolerance, ctx.device)
        ctx.log_metrics(_metrics(items, incoming), None)

        onnx = next((i for i in items if i.format == "onnx"), None)
        model_uri = None
        if cfg.log_model and onnx is not None:
            model_uri = ctx.log_model(onnx.path, example_inputs(ctx.data.examples()).numpy())
        for item in items:
            artifact.outputs.setdefault(item.path.name, _copier(item.path))
        info = {"source_stage": name, "deployed_format": incoming.format or "safetensors",
                "deployed_top1": incoming.deployed_top1, "tolerance": cfg.tolerance,
                "input_shape": [None, *ctx.data.examples()[0][0].shape],
                "mlflow_model_uri": model_uri}
        artifact.outputs[MANIFEST_FILE] = lambda path: write_manifest(path, items, info)
        _print(self.name, items, incoming)
        return artifact

    def _write(self, fmt: str, artifact: Artifact, incoming: Incoming, work: Path,
               ctx: StageContext) -> Exported:
        """Write one format into ``work``, check its masks, and say which model it holds."""
        job = _Job(self.name, self.config, artifact, incoming, work,
                   example_inputs(ctx.data.examples()), f"stage {self.name!r}: format {fmt!r}")
        return _WRITERS[fmt](job)


@dataclass
class _Job:
    """What every format writer needs: the stage, the model and the incoming deployable."""

    stage: str
    config: ExportConfig
    artifact: Artifact
    incoming: Incoming
    work: Path
    example: torch.Tensor
    where: str  # the prefix of error messages

    @property
    def holds_deployed(self) -> bool:  # fp32 formats of a dense deployable hold that model
        return self.incoming.format in DENSE_DEPLOYS and not self.incoming.int8


def _write_cpz(job: _Job) -> Exported:
    incoming, masks, path = job.incoming, job.artifact.masks, job.work / CPZ_FILE
    if incoming.format == "cpz":  # the huffman stage's file, verified bit-exact there
        shutil.copyfile(incoming.file, path)
    else:
        write_model_cpz(job.artifact, path)
    if incoming.int8:  # a .cpz of the int8 ONNX model: the model it decodes to
        data, name = read_onnx_cpz(path)
        decoded = job.work / "decoded" / name
        decoded.parent.mkdir(exist_ok=True)
        decoded.write_bytes(data)
        checked = check_onnx_zeros(decoded, masks, job.stage)
        return Exported("cpz", path, True, incoming.deployed_top1, "compresspipe", checked,
                        ".cpz is compresspipe's own container: read back by compresspipe")
    decoded = read_model_cpz(path).model.state_dict()
    for key, value in incoming.dense.state_dict().items():
        if not torch.equal(decoded[key], value.detach().cpu()):
            raise CompressPipeError(f"{job.where}: {key!r} does not decode to the model's "
                                    "weights")
    checked = check_tensor_masks(decoded, masks, job.where, path.name)
    return Exported("cpz", path, job.holds_deployed, incoming.dense_top1, "compresspipe",
                    checked, ".cpz is compresspipe's own container: read back by "
                    "compresspipe")


def _write_safetensors(job: _Job) -> Exported:
    path = job.work / DENSE_FILE
    write_dense_safetensors(job.incoming.dense, job.artifact.spec, path)
    checked = check_tensor_masks(load_file(str(path)), job.artifact.masks, job.where, path.name)
    why = timm_rebuildable(job.artifact.spec)
    note = f"checked through compresspipe: {why}" if why else ""
    if why:
        print(f"[{job.stage}] safetensors: {note}", flush=True)
    return Exported("safetensors", path, job.holds_deployed, job.incoming.dense_top1,
                    "compresspipe" if why else "timm", checked, note)


def _write_onnx(job: _Job) -> Exported:
    incoming = job.incoming
    if incoming.format == DEPLOY_FORMAT:  # the int8 file the ptq/qat stage measured
        path = job.work / incoming.file.name
        shutil.copyfile(incoming.file, path)
    elif incoming.int8:  # the int8 file a .cpz decodes to, byte for byte
        data, name = read_onnx_cpz(incoming.file)
        path = job.work / name
        path.write_bytes(data)
    else:
        path = job.work / ONNX_FILE
        try:
            export_onnx(incoming.deployed, job.example, path, opset=job.config.opset,
                        trim_taps=job.config.trim_padding_taps)
        except CompressPipeError as exc:
            raise CompressPipeError(f"{job.where}: {exc}") from exc
    opset = job.config.opset
    if opset is not None and onnx_opset(path) != opset:
        raise CompressPipeError(f"{job.where}: opset {opset} requested, {path.name} has "
                                f"opset {onnx_opset(path)}")
    refuse_random_nodes(path, job.where)  # else the consumer check compares random draws
    checked = check_onnx_zeros(path, job.artifact.masks, job.stage)
    return Exported("onnx", path, True, incoming.deployed_top1, "onnx", checked)


def _write_torch_export(job: _Job) -> Exported:
    if job.incoming.int8:
        raise CompressPipeError(f"{job.where}: the model is deployed as an int8 ONNX file, "
                                "which a torch.export program cannot reproduce; use 'onnx'")
    path = job.work / PROGRAM_FILE
    state = write_torch_export(job.incoming.deployed, job.example, path, job.where)
    checked = check_tensor_masks(state, job.artifact.masks, job.where, path.name)
    return Exported("torch_export", path, True, job.incoming.deployed_top1, "torch_export",
                    checked)


# each format's writer: it writes the file, checks its masks and says which model it holds
_WRITERS = {"cpz": _write_cpz, "safetensors": _write_safetensors, "onnx": _write_onnx,
            "torch_export": _write_torch_export}


def _incoming(name: str, source: Artifact, artifact: Artifact, ctx: StageContext) -> Incoming:
    """The previous stage's deployed model and its accuracy (as the runner measured it)."""
    directory = ctx.stage_dir(name)
    deployed = source.deployed_model(directory)
    # the consumers run the test split: compare with the runner's test-split number
    top1 = ctx.incoming["test_top1"]
    fmt = source.deploy["format"] if source.deploy else None
    if fmt in DENSE_DEPLOYS and not isinstance(deployed, OnnxModel):  # not an int8 .cpz
        return Incoming(name, directory, source.deploy, deployed, top1, deployed, top1)
    # the fp32 weights behind e.g. an int8 file: a different model, with its own accuracy
    dense_top1 = evaluate(artifact.model.to(ctx.device), ctx.data.test_loader(),
                          ctx.device)["top1"]
    return Incoming(name, directory, source.deploy, deployed, top1, artifact.model, dense_top1)


def _default_formats(deploy_format: str | None) -> list[str]:
    if deploy_format in ("cpz", "codebook"):
        return ["cpz", "onnx"]
    if deploy_format is None:
        return ["safetensors", "onnx"]
    return ["onnx"]  # int8 (or another deployable): the deployed file itself


def _metrics(items: list[Exported], incoming: Incoming) -> dict[str, float]:
    metrics = {"export_deployed_top1": incoming.deployed_top1}
    for item in items:
        key = f"export_{item.format}"
        metrics.update({f"{key}_bytes": float(item.bytes),
                        f"{key}_reference_top1": item.reference_top1,
                        f"{key}_deployed": float(item.deployed),
                        f"{key}_masked_tensors_checked": float(item.masks_checked),
                        f"{key}_verified": float(item.top1 is not None)})
        if item.top1 is not None:
            metrics[f"{key}_top1"] = item.top1
            metrics[f"{key}_top1_diff"] = item.top1 - item.reference_top1
    return metrics


def _copier(src: Path):
    return lambda dest: shutil.copyfile(src, dest)


def _mismatch(stage: str, item: Exported, tolerance: float, device) -> Exception:
    hint = ""
    if device.type != "cpu":
        hint = (f" (compresspipe runs torch models on {device}, the consumers on the CPU: "
                "near-tie predictions may differ; tolerance sets by how many points)")
    return CompressPipeError(
        f"stage {stage!r}: format {item.format!r} ({item.path.name}): top1 {item.top1:.2f}% in "
        f"a fresh process ({item.record()['consumer']}) but {item.reference_top1:.2f}% in "
        f"compresspipe, more than {tolerance:g} points apart{hint}")


def _print(stage: str, items: list[Exported], incoming: Incoming) -> None:
    for item in items:
        check = (f"fresh-process top1 {item.top1:.2f}% (compresspipe {item.reference_top1:.2f}%)"
                 if item.top1 is not None else "not checked (verify: false)")
        print(f"[{stage}] {item.format}: {item.path.name}, {item.bytes:,} bytes, {check}",
              flush=True)
        if not item.deployed:
            print(f"[{stage}]   {item.path.name} holds the fp32 weights, not the deployed "
                  f"{incoming.format} model (top1 {incoming.deployed_top1:.2f}%)", flush=True)
