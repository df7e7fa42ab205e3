"""Checks of a pipeline file that need no model (so no torch): stage names are unique and every
``stage:NAME`` names an earlier stage, and the input files and directories exist."""

from __future__ import annotations

from pathlib import Path

from ..core.cifar import missing_message as cifar_missing_message
from ..core.errors import Problem, suggest
from ..core.idx import missing_message
from ..stages.spec import INPUT_STAGE, StageSpec, stage_references
from .schema import PipelineConfig


def check_references(stages: list[StageSpec]) -> list[Problem]:
    """Unique stage names; every 'stage:NAME' value refers to an earlier stage or to
    'stage:input', the model the pipeline starts from. After a stage whose name the file does
    not tell, a reference that matches no name is not reported."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    uncertain = False
    for spec in stages:
        if spec.known_name and spec.name == INPUT_STAGE:
            problems.append(Problem(f"stages[{spec.index}].name", f"{INPUT_STAGE!r} is the "
                                    "pipeline's starting model (output_dir/input); give the "
                                    "stage another name"))
        if spec.known_name and spec.name in seen:
            problems.append(Problem(f"stages[{spec.index}].name", f"stage name {spec.name!r} "
                                    f"is already used by stages[{seen[spec.name]}]"))
        for rel, ref in stage_references(spec):
            if ref not in seen and ref != INPUT_STAGE and not uncertain:
                earlier = list(seen)
                hint = suggest(ref, earlier) or (f" (earlier stages: {', '.join(earlier)})"
                                                 if earlier else " (no stage runs before this one)")
                problems.append(Problem(f"{spec.path}.{rel}",
                                        f"'stage:{ref}' does not name an earlier stage{hint}"))
        if spec.known_name:
            seen.setdefault(spec.name, spec.index)
        else:
            uncertain = True
    return problems


def check_register(config: PipelineConfig, stages: list[StageSpec]) -> list[Problem]:
    """``tracking.register.stage`` names a stage of the pipeline."""
    tracking = config.tracking
    wanted = tracking.registration.stage if tracking is not None and tracking.registration else None
    names = [s.name for s in stages if s.known_name]
    if wanted is None or wanted in names or len(names) < len(stages):
        return []
    hint = suggest(wanted, names) or f" (stages: {', '.join(names)})"
    return [Problem("tracking.register.stage", f"{wanted!r} is not a stage of this "
                    f"pipeline{hint}")]


MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(path: Path | str | None) -> bool:
    """Whether a ``model.checkpoint`` names an MLflow model (fetched when the model is built)
    rather than a file."""
    return path is not None and str(path).startswith(MLFLOW_SCHEMES)


def check_paths(config: PipelineConfig, broken: set[str] | None = None) -> list[Problem]:
    """Input files and directories must exist before any work starts (the sections in
    ``broken`` failed to parse and are not looked at)."""
    problems: list[Problem] = []
    ckpt = config.model.checkpoint if config.model is not None else None
    if ckpt is not None and not is_mlflow_uri(ckpt) and not ckpt.is_file():
        problems.append(Problem("model.checkpoint", f"file not found: {ckpt}"))
    data = config.data
    if data is None or "data" in (broken or ()):
        return problems
    if data.channels not in (None, 1, 3) and data.name not in ("digits", "fake"):
        problems.append(Problem("data.channels", f"{data.name!r} images can be given 1 "
                                f"(grayscale) or 3 (RGB) channels, not {data.channels}"))
    if data.name == "imagefolder":
        if data.root is None:
            problems.append(Problem("data.root", "'imagefolder' needs a root directory"))
        elif not data.root.is_dir():
            problems.append(Problem("data.root", f"directory not found: {data.root}"))
        else:
            if not (data.root / "train").is_dir():
                problems.append(Problem("data.root", f"no 'train' subdirectory in {data.root}"))
            if not any((data.root / d).is_dir() for d in ("val", "test", "validation")):
                problems.append(Problem("data.root",
                                        f"no 'val' or 'test' subdirectory in {data.root}"))
    elif data.name in ("mnist", "fashion_mnist"):
        missing = None if data.download else missing_message(data.name, data.root)
        if missing:
            problems.append(Problem("data.root", missing))
    elif data.name in ("cifar10", "cifar100"):
        if data.root is None:
            problems.append(Problem("data.root", f"{data.name!r} needs a root directory"))
        elif not data.download:
            missing = cifar_missing_message(data.name, data.root)
            if missing:
                problems.append(Problem("data.root", missing))
    elif data.root is not None:
        problems.append(Problem("data.root", f"{data.name!r} takes no root directory"))
    return problems
