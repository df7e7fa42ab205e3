"""Checks that need the real model: architecture names, kwargs, module names in the file."""

from __future__ import annotations

import fnmatch

from torch import nn

from .config import PipelineConfig, StageSpec
from .errors import CompressPipeError, Problem
from .registry import get_stage, suggest


def check_against_model(config: PipelineConfig, stages: list[StageSpec]) -> list[Problem]:
    """Build the model (without downloading weights) and let each stage check its names."""
    from .models import build_from_spec, model_spec

    problems: list[Problem] = []
    if config.model.name is not None:
        import timm

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
    for i, spec_ in enumerate(stages):
        stage = get_stage(spec_.type)(spec_.config, spec_.name)
        stage.earlier = stages[:i]  # stages may depend on what runs before them
        for rel, message in stage.check(model, config):
            problems.append(Problem(f"{spec_.path}.{rel}", message))
    return problems


def unmatched_pattern_problems(model: nn.Module, patterns: list[str], key: str,
                               kind: str = "parameter") -> list[tuple[str, str]]:
    """(path, message) for each fnmatch pattern that matches no parameter (or module) name."""
    names = ([n for n, _ in model.named_parameters()] if kind == "parameter"
             else [n for n, _ in model.named_modules() if n])
    problems = []
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatch(n, pattern) for n in names):
            prefixes = sorted({n.split(".")[0] for n in names})
            listing = ", ".join(prefixes[:12])
            hint = suggest(pattern.split(".")[0], prefixes) or f" (top-level names: {listing})"
            problems.append((f"{key}[{i}]", f"pattern {pattern!r} matches no {kind} of the model"
                             f"{hint}"))
    return problems
