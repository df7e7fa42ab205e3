"""Loading a pipeline file: all-or-nothing validation.

Every problem of a file is collected and raised together as one ConfigError that names the
file, the YAML path, the line and a close match for typos."""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from ..core.config import ModelConfig
from ..core.errors import CompressPipeError, ConfigError, Problem, suggest
from ..stages.registry import get_stage, is_dotted_path, list_stages
from ..stages.spec import (
    INPUT_STAGE,
    UNKNOWN_STUDENT,
    RawConfig,
    StageSpec,
    UnparsedStage,
    plain_data,
    stage_references,
)
from .schema import NAME_PATTERN, PipelineConfig, pipeline_model, stage_item_model
from .yaml_source import PathKey, SourceMap, apply_override, format_path, parse_yaml


@dataclass
class Pipeline:
    """A loaded, validated pipeline: ``Pipeline.from_yaml(path)`` or ``Pipeline.from_dict(d)``,
    then ``.stages`` (name, type and typed config of each), ``.validate()``, ``.run()``."""

    config: PipelineConfig
    stages: list[StageSpec]
    file: str
    raw: dict[str, Any]
    source_map: SourceMap

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
            raise ConfigError("<dict>", [Problem("", f"expected a dict, found {_short(data)}")])
        return load_pipeline(plain_data(data), overrides, check_model)

    def validate(self, check_model: bool = True) -> Pipeline:
        """Check again after stage configs were edited in place: stage references, input
        paths and (``check_model``) module names against the real model. Returns self."""
        problems = _checks(self.config, self.stages, check_model, set())
        if problems:
            raise ConfigError(self.file, _locate(problems, self.source_map))
        return self

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every stage (``resume``: continue an interrupted run); return the summary."""
        from .runner import run_pipeline

        return run_pipeline(self.validate(check_model=False), resume=resume)

    @property
    def output_dir(self) -> Path:
        return self.config.resolved_output_dir()

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.name} ({s.type})" for s in self.stages)
        return f"Pipeline({self.config.name!r}, file={self.file!r}, stages=[{stages}])"

    def resolved_yaml(self) -> str:
        """The pipeline with overrides applied and every default filled in."""
        data = self.config.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [
            {"name": s.name, s.type: s.config.model_dump(mode="json")} for s in self.stages
        ]
        return yaml.safe_dump(data, sort_keys=False)


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
        raise ConfigError(file, _locate(problems, smap)) from None

    config: PipelineConfig | None = None
    broken: set[str] = set()  # top-level keys whose value failed to parse
    try:
        config = model_cls.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, model_cls, bad_items)
        config, broken = _partial_config(raw, exc, bad_items)

    stages: list[StageSpec] = []
    if config is not None:
        stages = _stage_specs(config)
        problems += _checks(config, stages, check_model, broken)

    if problems:
        raise ConfigError(file, _locate(problems, smap))
    assert config is not None
    return Pipeline(config=config, stages=stages, file=file, raw=raw, source_map=smap)


# what the checks against the model read besides the stages
_MODEL_CHECK_NEEDS = ("name", "output_dir", "model", "data", "tracking")


def _checks(config: PipelineConfig, stages: list[StageSpec], check_model: bool,
            broken: set[str]) -> list[Problem]:
    """The checks beyond the schema, each run where the parts it reads parsed: stage
    references, input paths and (``check_model``) names against the real model."""
    problems = _check_references(stages)
    problems += _check_paths(config, broken)
    if check_model and not broken.intersection(_MODEL_CHECK_NEEDS):
        from .checks import check_against_model

        problems += check_against_model(config, stages)
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
        for part in parents:
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
                                           f"found {_short(item)}"))
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


def _pydantic_problems(
    exc: ValidationError, model_cls: type[BaseModel], bad_items: set[int]
) -> list[Problem]:
    problems = []
    # With several stage types the item union is tagged and pydantic puts the tag in the loc;
    # with one type there is no tag, and stages[i].<type> is the item's own params field.
    item_type = typing.get_args(model_cls.model_fields["stages"].annotation)[0]
    tagged = typing.get_origin(item_type) is Annotated
    for err in exc.errors(include_url=False):
        loc = _strip_tag(tuple(err["loc"]), tagged)
        if len(loc) >= 2 and loc[0] == "stages" and loc[1] in bad_items:
            continue  # already reported by _prevalidate_stages
        problems.append(Problem(format_path(loc), _message(err, model_cls, tuple(err["loc"]))))
    # a misspelled required key ('modle') is one mistake: drop the 'missing' report for the key
    # that the typo's suggestion already names
    suggested = {(p.path.rpartition(".")[0], m.group(1)) for p in problems
                 if (m := re.search(r"did you mean '([^']+)'", p.message))}
    return [p for p in problems if not (p.message == "required key is missing"
                                        and tuple(p.path.rpartition(".")[::2]) in suggested)]


def _strip_tag(loc: PathKey, tagged: bool) -> PathKey:
    """Drop the union tag pydantic inserts: ('stages', 0, 'train', 'train', 'lr') -> without it."""
    if tagged and len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int):
        return loc[:2] + loc[3:]
    return loc


def _message(err: dict, model_cls: type[BaseModel], loc: PathKey) -> str:
    kind = err["type"]
    found = _short(err.get("input"))
    if kind == "extra_forbidden":
        allowed = _field_names(model_cls, loc[:-1])
        key = str(loc[-1])
        listing = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {key!r}{suggest(key, allowed)}{listing}"
    if kind == "missing":
        return "required item is missing" if isinstance(loc[-1], int) else "required key is missing"
    if kind == "too_short" and loc == ("stages",):
        return "a pipeline needs at least one stage"
    if kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == NAME_PATTERN:
        return (f"names may use letters, digits, '_', '.' and '-' and start with a letter or "
                f"digit, found {found}")
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return (f"expected one of {', '.join(map(repr, options))}, found {found}"
                f"{suggest(str(err.get('input')), options)}")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")
    return f"{msg[0].lower()}{msg[1:]}, found {found}"


def _field_names(model_cls: Any, loc: PathKey) -> list[str]:
    """Keys allowed at ``loc`` (raw pydantic loc, tag included), or [] if unknown."""
    cur: Any = model_cls
    for part in loc:
        cur = _unwrap(cur)
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            field = next((f for n, f in cur.model_fields.items() if (f.alias or n) == part), None)
            if field is None:
                # the union tag in the loc selects the stage item model
                if isinstance(part, str) and part in list_stages():
                    cur = stage_item_model(part)
                    continue
                return []
            cur = field.annotation
        elif typing.get_origin(cur) in (list, tuple):
            cur = typing.get_args(cur)[0]
        elif typing.get_origin(cur) is dict:
            cur = typing.get_args(cur)[1]
        elif isinstance(part, str) and part in list_stages():
            cur = stage_item_model(part)
        else:
            return []
    cur = _unwrap(cur)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [f.alias or n for n, f in cur.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


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


def _check_references(stages: list[StageSpec]) -> list[Problem]:
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


def _check_paths(config: PipelineConfig, broken: set[str] | None = None) -> list[Problem]:
    """Input files and directories must exist before any work starts (the sections in
    ``broken`` failed to parse and are not looked at)."""
    problems: list[Problem] = []
    ckpt = config.model.checkpoint if config.model is not None else None
    if ckpt is not None and not ckpt.is_file():
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
    elif data.name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        if data.root is None:
            problems.append(Problem("data.root", f"{data.name!r} needs a root directory"))
        elif not data.download and not data.root.is_dir():
            problems.append(Problem("data.root", f"directory not found: {data.root} "
                                    "(set download: true to fetch it)"))
    elif data.root is not None:
        problems.append(Problem("data.root", f"{data.name!r} takes no root directory"))
    return problems


def _locate(problems: list[Problem], smap: SourceMap) -> list[Problem]:
    """Problems with their line (or --set source), sorted by line; those without one last."""
    out = []
    for p in problems:
        if p.line is not None or p.source is not None:
            out.append(p)
            continue
        line, source = smap.locate(_parse_path(p.path, smap))
        out.append(Problem(p.path, p.message, line, source))
    return sorted(out, key=lambda p: (p.line is None, p.line or 0))


def _parse_path(path: str, smap: SourceMap | None = None) -> PathKey:
    """'stages[0].prune.overrides.fc.weight' -> its key tuple; with ``smap``, dotted names
    that are one key of the file ('fc.weight' in a mapping of patterns) stay one key."""
    tokens: list[str | int] = [int(index) if index else name
                               for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]
    known = set(smap.lines) | smap.overridden if smap is not None else set()
    parts: list[str | int] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if known and isinstance(token, str):
            for j in range(len(tokens), i + 1, -1):  # the longest run of names that is a key
                run = tokens[i:j]
                if all(isinstance(t, str) for t in run) and (*parts, ".".join(run)) in known:
                    token, i = ".".join(run), j - 1  # type: ignore[arg-type]
                    break
        parts.append(token)
        i += 1
    return tuple(parts)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
