"""Loading a pipeline file: all-or-nothing validation.

Every problem of a file is collected and raised together as one ConfigError that names the
file, the YAML path, the line and a close match for typos."""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from ..core.config import ModelConfig
from ..core.errors import CompressPipeError, ConfigError, Problem, suggest
from ..stages.registry import get_stage, is_dotted_path, list_stages
from ..stages.spec import (
    UNKNOWN_STUDENT,
    RawConfig,
    StageSpec,
    UnparsedStage,
    plain_data,
)
from .diagnostics import locate, pydantic_problems, short
from .references import check_paths, check_references, check_register
from .schema import NAME_PATTERN, PipelineConfig, PipelineFile, pipeline_model, stage_item_model
from .search_config import check_search
from .yaml_source import SourceMap, apply_override, parse_yaml


class Pipeline(PipelineFile):
    """A loaded, validated pipeline: ``Pipeline.from_yaml(path)`` or ``Pipeline.from_dict(d)``,
    then ``.stages`` (name, type and typed config of each), ``.validate()``, ``.run()``."""

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                  check_model: bool = True) -> Pipeline:
        """Read and validate a pipeline file; ``overrides`` like ``["stages.0.train.epochs=2"]``."""
        return load_pipeline(path, overrides, check_model)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                  check_model: bool = True) -> Pipeline:
        """Validate a pipeline given as a dict; stage parameters may be stage ``Config``
        objects, e.g. ``{"train": TrainStage.Config(epochs=2)}``."""
        if not isinstance(data, dict):
            raise ConfigError("<dict>", [Problem("", f"expected a dict, found {short(data)}")])
        return load_pipeline(plain_data(data), overrides, check_model)

    def validate(self, check_model: bool = True) -> Pipeline:
        """Check again after stage configs were edited in place: stage references, input
        paths and (``check_model``) module names against the real model. Returns self."""
        problems = _checks(self.config, self.stages, check_model, set())
        if problems:
            raise ConfigError(self.file, locate(problems, self.source_map))
        return self

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every stage (``resume``: continue an interrupted run); return the summary."""
        from .runner import run_pipeline  # lazy: running loads torch; loading a file does not

        return run_pipeline(self.validate(check_model=False), resume=resume)


# ---------------------------------------------------------------------------------------------
# Loading


def load_pipeline(
    source: str | os.PathLike | dict, overrides: list[str] | tuple[str, ...] = (),
    check_model: bool = True,
) -> Pipeline:
    """Read, override and validate a pipeline; raise ConfigError listing every problem.

    ``check_model`` also builds the model to check module names the file mentions.
    """
    file, raw, smap, problems = _read(source)
    for assignment in overrides:
        if (p := apply_override(raw, assignment, smap)) is not None:
            problems.append(p)
    if problems and not isinstance(raw, dict):
        raise ConfigError(file, problems)

    stage_types, bad_items = _prevalidate_stages(raw, problems)
    try:
        model_cls = pipeline_model(stage_types)
    except CompressPipeError as exc:
        problems.append(Problem("stages", str(exc)))
        raise ConfigError(file, locate(problems, smap)) from None

    config: PipelineConfig | None = None
    broken: set[str] = set()  # top-level keys whose value failed to parse
    try:
        config = model_cls.model_validate(raw)
    except ValidationError as exc:
        problems += pydantic_problems(exc, model_cls, bad_items)
        config, broken = _partial_config(raw, exc, bad_items)

    stages: list[StageSpec] = []
    notes: list[str] = []
    if config is not None:
        stages = _stage_specs(config)
        problems += _checks(config, stages, check_model, broken, notes)

    if problems:
        raise ConfigError(file, locate(problems, smap))
    assert config is not None
    return Pipeline(config=config, stages=stages, file=file, raw=raw, source_map=smap,
                    notes=notes)


# what the checks against the model read besides the stages
_MODEL_CHECK_NEEDS = ("name", "output_dir", "model", "data", "tracking")


def _checks(config: PipelineConfig, stages: list[StageSpec], check_model: bool,
            broken: set[str], notes: list[str] | None = None) -> list[Problem]:
    """The checks beyond the schema, each run where the parts it reads parsed: stage
    references, input paths and (``check_model``) names against the real model."""
    problems = check_references(stages)
    if "tracking" not in broken:
        problems += check_register(config, stages)
    problems += check_paths(config, broken)
    if "search" not in broken:
        problems += check_search(config.search, stages)
    if check_model and not broken.intersection(_MODEL_CHECK_NEEDS):
        # lazy: the model checks load torch and timm; a file is validated without them first
        from .checks import check_against_model

        problems += check_against_model(config, stages, notes)
    return problems


def _partial_config(raw: dict, exc: ValidationError,
                    bad_items: set[int]) -> tuple[PipelineConfig | None, set[str]]:
    """What parsed of a file that failed validation: the sections without errors (a broken
    one is None) and every stage item, parsed or as an ``UnparsedStage``; and the names of the
    broken top-level keys. None when not even that can be assembled."""
    broken: set[str] = set()
    failed: set[int] = set(bad_items)
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = tuple(err["loc"])
        if not loc:
            return None, broken
        broken.add(str(loc[0]))
        if loc[0] == "stages" and len(loc) >= 2 and isinstance(loc[1], int):
            failed.add(loc[1])
    fields = PipelineConfig.model_fields
    good = {k: v for k, v in raw.items() if k in fields and k != "stages" and k not in broken}
    # stand-ins for broken required keys, replaced by None below
    stand_in = {"name": "x", "model": {"name": "x"}}
    try:
        base = PipelineConfig.model_validate({**stand_in, **good, "stages": [None]})
    except ValidationError:
        return None, broken | set(_MODEL_CHECK_NEEDS)
    values = {k: (None if k in broken else getattr(base, k)) for k in fields if k != "stages"}
    items: list[Any] = []
    if isinstance(raw.get("stages"), list) and not any(tuple(e["loc"]) == ("stages",)
                                                       for e in errors):
        items = [_unparsed(item) if i in failed else _parsed_item(item)
                 for i, item in enumerate(raw["stages"])]
    return PipelineConfig.model_construct(**values, stages=items), broken


def _parsed_item(item: dict) -> Any:
    type_name = next(k for k in item if k != "name")
    try:
        return stage_item_model(type_name).model_validate(item)
    except (ValidationError, CompressPipeError):  # cannot happen: the whole list parsed it
        return _unparsed(item)


def _unparsed(item: Any) -> UnparsedStage:
    """What the file says of a stage item that failed to parse."""
    if not isinstance(item, dict):
        return UnparsedStage(None, "", RawConfig(student=_student_of("", item)))
    name = item.get("name")
    named = name is None or (isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None)
    name = name if named else None
    keys = [k for k in item if k != "name"]
    if len(keys) != 1 or not isinstance(keys[0], str):
        values = {k: v for k, v in item.items() if k != "name"}
        return UnparsedStage(name, "", RawConfig(student=_student_of("", values)), named)
    type_name = keys[0]
    params = item[type_name]
    if isinstance(params, dict) and (config := _without_unknown_keys(type_name, params)):
        # only the item's name, or keys that mean nothing, are wrong: checking the rest
        # against the model is checking what the stage would run with
        return UnparsedStage(name, type_name, config, named)
    raw_params = {k: v for k, v in params.items() if isinstance(k, str)} \
        if isinstance(params, dict) else {}
    return UnparsedStage(name, type_name, RawConfig(**{**raw_params, "student":
                                                         _student_of(type_name, params)}), named)


def _without_unknown_keys(type_name: str, params: dict) -> BaseModel | None:
    """The stage's config parsed without its unknown keys (misspelt ones), or None when
    anything else is wrong with it."""
    try:
        config_cls = get_stage(type_name).Config
    except CompressPipeError:
        return None
    try:
        return config_cls.model_validate(params)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    if any(e["type"] != "extra_forbidden" for e in errors):
        return None
    params = copy.deepcopy(params)
    for err in errors:
        *parents, key = err["loc"]
        holder: Any = params
        for part in parents:  # a tagged union's tag is in the loc, not in the params
            if not isinstance(holder, dict) or part in holder:
                holder = holder[part]
        holder.pop(key, None)
    try:
        return config_cls.model_validate(params)
    except ValidationError:
        return None


def _student_of(type_name: str, params: Any) -> Any:
    """The network a stage that failed to parse switches to: None (it keeps the incoming
    model), a ModelConfig, or UNKNOWN_STUDENT. Only a distill stage's ``student`` switches;
    any other key like 'student' may be a misspelt one, so the model after it is unknown."""
    keys = [k for k in params if isinstance(k, str)] if isinstance(params, dict) else []
    if isinstance(params, dict) and type_name == "":  # several type keys: look inside each
        inner = [_student_of("", v) for v in params.values()]
        return UNKNOWN_STUDENT if any(s is not None for s in inner) else None
    close = [k for k in keys if difflib.get_close_matches(k.lower(), ["student"], 1, 0.75)]
    if not close:
        return None
    if type_name == "distill" and close == ["student"]:
        try:
            return ModelConfig.model_validate(params["student"])
        except ValidationError:
            pass
    return UNKNOWN_STUDENT


def _read(source: str | os.PathLike | dict) -> tuple[str, Any, SourceMap, list[Problem]]:
    if isinstance(source, dict):
        return "<dict>", copy.deepcopy(source), SourceMap(), []
    path = Path(source)
    file = str(source)
    try:
        if not path.is_file():
            raise ConfigError(file, [Problem("", "file not found" if not path.exists()
                                             else "not a file")])
    except (OSError, ValueError) as exc:  # a name too long, or with a NUL byte
        raise ConfigError(file[:200], [Problem("", f"cannot read: {str(exc)[:200]}")]) from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, [Problem("", f"cannot read: {exc}")]) from None
    try:
        raw, smap, problems = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            file, [Problem("", f"invalid YAML: {reason}", mark.line + 1 if mark else None)]
        ) from None
    if not isinstance(raw, dict):
        found = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(file, [Problem("", f"expected a mapping at the top level, found {found}")])
    return file, raw, smap, problems


def _prevalidate_stages(raw: dict, problems: list[Problem]) -> tuple[list[str], set[int]]:
    """Check each stage item names exactly one known type; return the types and bad indices."""
    items = raw.get("stages")
    known = list(list_stages())
    types: list[str] = []
    bad: set[int] = set()
    if not isinstance(items, list):
        return types, bad
    for i, item in enumerate(items):
        where = f"stages[{i}]"
        if not isinstance(item, dict):
            problems.append(Problem(where, f"expected a mapping like '- train: {{...}}', "
                                           f"found {short(item)}"))
            bad.add(i)
            continue
        keys = [k for k in item if k != "name"]
        if len(keys) != 1:
            found = ", ".join(map(repr, keys)) or "none"
            problems.append(Problem(where, f"expected exactly one stage type key besides 'name', "
                                           f"found {found}"))
            bad.add(i)
            continue
        key = keys[0]
        if not isinstance(key, str) or (key not in known and not is_dotted_path(key)):
            problems.append(Problem(f"{where}.{key}", f"unknown stage type {key!r}"
                                    f"{suggest(str(key), known)} (known: {', '.join(known)})"))
            bad.add(i)
            continue
        try:
            get_stage(key)
        except CompressPipeError as exc:
            problems.append(Problem(f"{where}.{key}", str(exc)))
            bad.add(i)
            continue
        types.append(key)
    return types or known, bad


def _stage_specs(config: PipelineConfig) -> list[StageSpec]:
    specs: list[StageSpec] = []
    counts: dict[str, int] = {}
    for i, item in enumerate(config.stages):
        if isinstance(item, UnparsedStage):
            type_name, params, explicit, named = item.type, item.params, item.name, item.named
        else:
            type_name, params = type(item).model_fields["params"].alias, item.params
            explicit, named = item.name, True
        if type_name:
            counts[type_name] = counts.get(type_name, 0) + 1
        if explicit:
            name = explicit
        elif type_name and named:
            name = type_name if counts[type_name] == 1 else f"{type_name}-{counts[type_name]}"
        else:  # the file does not tell; no reference can name this ('[' is not allowed)
            name = f"stages[{i}]"
        specs.append(StageSpec(index=i, name=name.replace(":", "_"), type=type_name,
                               config=params, parsed=isinstance(params, BaseModel),
                               known_name=named and bool(explicit or type_name)))
    return specs


