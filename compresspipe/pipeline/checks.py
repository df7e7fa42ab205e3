"""Checks that need the real model: architecture names, kwargs, the checkpoint's tensors, and
the module names each stage mentions, against the network that stage will really receive."""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from ..compress.distill.config import DistillConfig
from ..core.config import ModelConfig
from ..core.errors import CompressPipeError, Problem, suggest
from ..core.models import build_from_spec, model_spec, read_checkpoint, weight_mismatches
from ..stages.architecture import passed_on
from ..stages.registry import get_stage
from ..stages.spec import INPUT_STAGE, StageSpec, stage_references
from .checkpoints import local_model_config
from .schema import PipelineConfig, view_of


def check_against_model(config: PipelineConfig, stages: list[StageSpec],
                        notes: list[str] | None = None) -> list[Problem]:
    """Build the model (without downloading weights, with the checkpoint's) and let each stage
    check its names against the architecture it receives: the pipeline's model, or the
    ``student`` of the last distill stage before it. Each distinct architecture is built once.

    Stages whose config did not parse (``parsed`` False) are not checked; after one that may
    switch to a network the file does not tell, no later stage is. A stage whose ``stage:``
    references are unresolved is not checked either: its teacher is unknown. What a check
    found worth telling without being a problem (a structured stage's dry run) goes to
    ``notes``."""
    problems: list[Problem] = []
    if config.model.name is not None:
        import timm  # lazy: importing timm takes seconds; only model building needs it

        if not timm.is_model(config.model.name):
            names = timm.list_models()
            return [Problem("model.name", f"unknown timm model {config.model.name!r}"
                            f"{suggest(config.model.name, names)}")]
    spec = model_spec(config.model, config.data)
    kwargs = config.model.kwargs
    expected = config.data.dataset_num_classes()
    if expected is not None and "num_classes" in kwargs and kwargs["num_classes"] != expected:
        problems.append(Problem("model.kwargs.num_classes",
                                f"the model has {kwargs['num_classes']} classes but dataset "
                                f"{config.data.name!r} has {expected}"))
    try:
        model = build_from_spec(spec)
    except CompressPipeError as exc:
        return [*problems, Problem("model.factory" if config.model.factory else "model", str(exc))]
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        return [*problems, Problem("model.kwargs", f"cannot build the model with "
                                   f"{spec['kwargs']}: {type(exc).__name__}: {exc}")]
    # an image folder whose classes cannot be counted (its root is broken, which is reported):
    # the model has timm's default head, so nothing that depends on the class count is said
    classes_known = "num_classes" in spec["kwargs"]
    if classes_known:
        try:
            problems += _checkpoint_problems(model, local_model_config(config))
        except CompressPipeError as exc:  # an MLflow checkpoint that cannot be fetched
            problems.append(Problem("model.checkpoint", str(exc).removeprefix(
                "model.checkpoint: ")))

    built: dict[str, nn.Module | None] = {_key(spec): model}
    current: dict[str, Any] | None = spec
    for i, stage_spec in enumerate(stages):
        if current is None:
            break  # the network this stage receives is unknown
        model = built[_key(current)]
        if (model is not None and stage_spec.parsed
                and _references_resolve(stage_spec, stages[:i])
                and (classes_known or not _uses_teacher(stage_spec.config))):
            stage = get_stage(stage_spec.type)(stage_spec.config, stage_spec.name)
            for rel, message in stage.check(model, view_of(config, stages, i)):
                problems.append(Problem(f"{stage_spec.path}.{rel}", message))
            if notes is not None:
                notes += stage.notes
        current = passed_on(stage_spec, current, view_of(config, stages, i))
        if current is not None and _key(current) not in built:
            built[_key(current)] = _build_quietly(current)
    return problems


def _key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def _build_quietly(spec: dict[str, Any]) -> nn.Module | None:
    """The architecture, or None where it cannot be built (the stage that names it says why)."""
    try:
        return build_from_spec(spec)
    except Exception:  # noqa: BLE001 - the distill stage's own check reports the reason
        return None


def _references_resolve(stage: StageSpec, earlier: list[StageSpec]) -> bool:
    """Every 'stage:NAME' of ``stage`` names exactly one earlier stage (and the file tells
    the name of every earlier stage: an unnamed one might be the stage meant)."""
    refs = [ref for _, ref in stage_references(stage)]
    if refs and not all(s.known_name for s in earlier):
        return False
    names = [s.name for s in earlier]
    return all(ref == INPUT_STAGE or names.count(ref) == 1 for ref in refs)


def _uses_teacher(config: Any) -> bool:
    return isinstance(config, DistillConfig) or isinstance(getattr(config, "distill", None),
                                                           DistillConfig)


def _checkpoint_problems(model: nn.Module, model_cfg: ModelConfig) -> list[Problem]:
    """Load ``model.checkpoint`` (never unpickling) into the model built for the checks; its
    tensors must be exactly the model's, with the model's shapes."""
    path = model_cfg.checkpoint
    if path is None or not path.is_file():
        return []  # a missing file is reported with the paths
    try:
        tensors = read_checkpoint(path)
    except CompressPipeError as exc:
        return [Problem("model.checkpoint", str(exc))]
    mismatches = weight_mismatches(model, tensors)
    if mismatches:
        return [Problem("model.checkpoint", f"{path.name}: the weights do not fit model "
                        f"{model_cfg.name or model_cfg.factory!r}: {'; '.join(mismatches)}")]
    model.load_state_dict(tensors, strict=True)
    return []


