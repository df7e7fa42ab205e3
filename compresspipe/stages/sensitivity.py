"""``sensitivity``: per-layer scans on the validation split — top-1 and loss with only one layer
pruned (one-shot magnitude, a sparsity grid), weight-shared (a bits grid) or int8 — no
retraining. The model passes through unchanged; the scan goes into the artifact
(``artifact_keys.sensitivity``) for ``prune``/``cluster`` allocation, and into the stage
directory as ``sensitivity.json``, ``sensitivity.md`` and a plot per layer family (logged to
MLflow with the stage's artifact).

Also the helpers other stages use to read a scan (``allocation: {rule: sensitivity, scan:
stage:NAME}``) and to pick the layers that stay float in mixed-precision int8.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from ..compress.pruning.scopes import select_targets
from ..compress.quant.config import KeepFloat
from ..compress.sensitivity import int8_drops, markdown_table, scan, validation_batches
from ..core import artifact_keys
from ..core.artifact import Artifact
from ..core.errors import CompressPipeError
from ..tracking import plots
from .base import Stage, StageConfig
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .spec import PipelineView

TYPE = "sensitivity"


class SensitivityConfig(StageConfig):
    """Which layers, which scan points, how many validation batches."""

    sparsities: list[float] = Field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
        description="Sparsities each layer is pruned to alone (one-shot magnitude); [] skips.")
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8],
                            description="Codebook bits each layer is shared at alone; [] skips.")
    int8: bool = Field(False, description="Also measure each layer alone in int8 (weights "
                       "per channel, input uint8), simulated in fp32.")
    include: list[str] = Field(default_factory=list, description="Weight-name patterns to scan "
                               "(default: every Conv/Linear weight).")
    exclude: list[str] = Field(default_factory=list, description="Weight-name patterns to skip.")
    max_batches: int = Field(8, ge=1, le=100_000,
                             description="Validation batches each scan point evaluates.")
    kmeans_iters: int = Field(30, ge=1, le=10_000, description="Lloyd iterations per bits point.")

    @field_validator("sparsities")
    @classmethod
    def _sparsity_range(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s < 1]
        if bad:
            raise ValueError(f"sparsities must lie in (0, 1), found {bad}")
        return sorted(set(v))

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 1 <= b <= 16]
        if bad:
            raise ValueError(f"bits must lie in 1..16, found {bad}")
        return sorted(set(v), reverse=True)


@register_stage(TYPE)
class SensitivityStage(Stage):
    """Per-layer sensitivity to pruning, weight sharing and int8 on the validation split; the
    model passes through unchanged."""

    Config = SensitivityConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        c = self.config
        problems = unmatched_pattern_problems(model, c.include, "include", weights=True)
        problems += unmatched_pattern_problems(model, c.exclude, "exclude", weights=True)
        if not problems and not self._names(model):
            problems.append(("include", "no conv or linear weight is left to scan"))
        if not (c.sparsities or c.bits or c.int8):
            problems.append(("sparsities", "nothing to scan: sparsities and bits are empty and "
                             "int8 is off"))
        return problems

    def _names(self, model: nn.Module) -> list[str]:
        c = self.config
        return select_targets(model, c.include, c.exclude, "include", "include", {}).names

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        c = self.config
        batches, split = validation_batches(ctx.data, c.max_batches, ctx.device)
        record = scan(artifact.model, self._names(artifact.model), batches, split=split,
                      sparsities=c.sparsities, bits=c.bits, int8=c.int8, masks=artifact.masks,
                      kmeans_iters=c.kmeans_iters, device=ctx.device)
        artifact_keys.set_sensitivity(artifact, record)
        artifact.outputs.update(report_files(record))  # the runner logs the stage directory
        ctx.log_metrics(_metrics(record), None)
        print(f"[{ctx.name}] sensitivity of {len(record['layers'])} layers on the {split} split "
              f"({record['images']} images): " + _most_sensitive(record), flush=True)
        return artifact


def report_files(record: dict[str, Any]) -> dict[str, Callable[[Path], Any]]:
    """{file name: writer}: the scan as JSON, its markdown table, a plot per layer family."""
    text = json.dumps(record, indent=1)
    table = markdown_table(record)
    files: dict[str, Callable[[Path], Any]] = {
        "sensitivity.json": lambda path: Path(path).write_text(text),
        "sensitivity.md": lambda path: Path(path).write_text(table)}
    for family in sorted({row["family"] for row in record["layers"].values()}):
        files[f"sensitivity_{family}.png"] = (
            lambda path, family=family: plots.sensitivity_plot(record, family, Path(path)))
    return files


def standalone_scan(config: SensitivityConfig, model: nn.Module, masks: dict, data,
                    device, out: Path) -> dict[str, Any]:
    """The stage's scan outside a pipeline run (``compresspipe sensitivity``): the files go to
    ``out``; nothing is tracked."""
    stage = SensitivityStage(config, "sensitivity")
    batches, split = validation_batches(data, config.max_batches, device)
    record = scan(model, stage._names(model), batches, split=split,
                  sparsities=config.sparsities, bits=config.bits, int8=config.int8, masks=masks,
                  kmeans_iters=config.kmeans_iters, device=device)
    out.mkdir(parents=True, exist_ok=True)
    for name, write in report_files(record).items():
        write(out / name)
    return record


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    """The unchanged model's validation numbers and each layer's top-1 at each scan point."""
    out = {"sensitivity_layers": float(len(record["layers"])),
           "sensitivity_images": float(record["images"]),
           "sensitivity_val_top1": record["dense"]["top1"],
           "sensitivity_val_loss": record["dense"]["loss"]}
    for name, row in record["layers"].items():
        key = name.removesuffix(".weight")
        out.update({f"sens.{key}.sparsity_{p['sparsity']:.3f}.top1": p["top1"]
                    for p in row["sparsity"]})
        out.update({f"sens.{key}.bits_{p['bits']}.top1": p["top1"] for p in row["bits"]})
        if "int8" in row:
            out[f"sens.{key}.int8.top1"] = row["int8"]["top1"]
    return out


def _most_sensitive(record: dict[str, Any]) -> str:
    base = record["dense"]["loss"]
    worst = {n: max((p["loss"] - base for p in row["sparsity"] + row["bits"]), default=0.0)
             for n, row in record["layers"].items()}
    ranked = sorted(worst, key=worst.get, reverse=True)[:3]
    return "most sensitive " + ", ".join(f"{n.removesuffix('.weight')} (+{worst[n]:.3f} loss)"
                                         for n in ranked)


# -- for the stages that use a scan -----------------------------------------------------------------


def check_scan(scan_ref: str | None, view: PipelineView, path: str) -> list[tuple[str, str]]:
    """A scan is there to read: the named stage (or, unnamed, some earlier stage) is a
    sensitivity stage."""
    earlier = {s.name: s.type for s in view.earlier}
    if scan_ref is None:
        if TYPE not in earlier.values():
            return [(path, "allocation by sensitivity needs a sensitivity stage before this one "
                     "(or scan: stage:NAME)")]
        return []
    name = scan_ref.removeprefix("stage:")
    if name in earlier and earlier[name] != TYPE:
        return [(path, f"stage {name!r} is a {earlier[name]!r} stage, not a sensitivity stage")]
    return []  # an unknown name is reported by the reference check


def resolve_scan(artifact: Artifact, ctx: StageContext, scan_ref: str | None) -> dict[str, Any]:
    """The scan a stage reads: the named stage's, else the one the incoming artifact carries."""
    source = ctx.load_stage(scan_ref.removeprefix("stage:")) if scan_ref else artifact
    record = artifact_keys.sensitivity(source)
    if record is None:
        where = f"stage {scan_ref.removeprefix('stage:')!r}" if scan_ref else "the incoming model"
        raise CompressPipeError(f"stage {ctx.name!r}: {where} carries no sensitivity scan")
    if record.get("split") == "test":  # a decision must never rest on the test set
        raise CompressPipeError(f"stage {ctx.name!r}: the sensitivity scan used the test split")
    return record


def keep_float_layers(options: KeepFloat, model: nn.Module, ctx: StageContext
                      ) -> tuple[dict[str, float], list[str]]:
    """Each conv/linear layer's validation top-1 drop when only it is int8, and the layers
    whose drop passes the threshold (they stay float)."""
    names = select_targets(model, [], [], "include", "include", {}).names
    batches, split = validation_batches(ctx.data, options.max_batches, ctx.device)
    _, drops = int8_drops(model, names, batches, ctx.device)
    model.cpu()
    floating = [n for n, d in drops.items() if d > options.sensitivity_threshold]
    ctx.log_metrics({"float_layers": float(len(floating)),
                     **{f"int8_drop_alone.{n.removesuffix('.weight')}": d
                        for n, d in drops.items()}}, None)
    print(f"[{ctx.name}] int8 sensitivity ({split} split): "
          + ", ".join(f"{n.removesuffix('.weight')} -{d:.2f}pt" + (" (float)" if n in floating
                                                                   else "")
                      for n, d in drops.items()), flush=True)
    return drops, floating


def mixed_precision_record(options: KeepFloat | None, drops: dict[str, float],
                           floating: list[str]) -> dict[str, Any]:
    """What the int8 record says about mixed precision ({} without it)."""
    if options is None:
        return {}
    return {"float_layers": floating, "int8_top1_drop_alone": drops,
            "keep_float_threshold": options.sensitivity_threshold}
