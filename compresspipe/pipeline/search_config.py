"""The ``search:`` section of a pipeline file: which stage parameters to search, toward what
objective, within which budget; and its checks against the stages (YAML path and line of every
problem, like the rest of the file). Free of torch and Optuna: validating a file stays cheap."""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..core.config import StrictModel
from ..core.errors import Problem, suggest
from ..stages.spec import StageSpec

PARAM_PATH = r"^stages\.[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SearchParameter(StrictModel):
    """A range (``low``/``high``, optionally ``log`` or ``step``) or a list of ``choices``."""

    low: float | None = Field(None, description="Smallest value (with high).")
    high: float | None = Field(None, description="Largest value (with low).")
    log: bool = Field(False, description="Sample on a log scale (low > 0).")
    step: float | None = Field(None, gt=0, description="Grid step (integers when low, high "
                               "and step are whole numbers).")
    choices: list[Any] | None = Field(None, min_length=1, description="Values to choose from.")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParameter:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either 'choices' or a range (low/high), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give 'low' and 'high', or 'choices'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log' cannot be combined")
        return self

    @property
    def integer(self) -> bool:
        """Whole-number range: sampled as an int (a step of 1 unless given)."""
        values = [self.low, self.high] + ([self.step] if self.step is not None else [])
        return self.choices is None and all(float(v).is_integer() for v in values) and (
            self.step is not None or self.log)

    def extremes(self) -> list[Any]:
        """Values that show whether the stage accepts the range."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.integer else float
        return [cast(self.low), cast(self.high)]


class SearchObjective(StrictModel):
    """``min_bytes``: the smallest .cpz (or deployable) subject to a validation top-1 drop;
    ``pareto``: the front over ``metrics``."""

    kind: Literal["min_bytes", "pareto"] = "min_bytes"
    max_val_top1_drop: float = Field(
        1.0, ge=0, le=100, description="Largest validation top-1 drop, in points, against the "
        "reference stage (min_bytes; the Pareto table marks it too).")
    reference: str | None = Field(None, description="Stage whose validation top-1 is the "
                                  "reference; default: the first stage (the dense model).")
    metrics: list[Literal["bytes", "val_top1", "latency_ms"]] = Field(
        default_factory=lambda: ["bytes", "val_top1"], min_length=2,
        description="pareto: objectives (bytes and latency minimized, val_top1 maximized).")


class SearchBudget(StrictModel):
    trials: int = Field(20, ge=1, le=100_000, description="Trials in all (a resumed search "
                        "counts the ones already finished).")
    hours: float | None = Field(None, gt=0, description="Stop starting trials after this long.")


class SearchConfig(StrictModel):
    """Optuna search over stage parameters; each trial is one run of the pipeline."""

    parameters: dict[str, SearchParameter] = Field(
        min_length=1, description="By path 'stages.<stage name>.<type>.<field>', e.g. "
        "stages.prune.prune.sparsity: {low: 0.8, high: 0.97}.")
    objective: SearchObjective = Field(default_factory=SearchObjective)
    budget: SearchBudget = Field(default_factory=SearchBudget)
    sampler: Literal["tpe", "random"] = "tpe"
    prune_margin_pt: float | None = Field(
        5.0, ge=0, description="Stop a trial early when, after a stage, its validation top-1 "
        "drop exceeds max_val_top1_drop by this many points (null: never).")
    storage: str | None = Field(None, description="Optuna storage URL; default "
                                "sqlite:///<output_dir>/search.db (beside mlflow.db): a killed "
                                "search resumes from it.")
    study: str | None = Field(None, description="Study name; default: the pipeline name.")


def resolve(path: str, stages: list[StageSpec]) -> tuple[StageSpec, list[str]] | str:
    """The stage a parameter path names and the field path inside its config, or a message."""
    if not re.fullmatch(PARAM_PATH, path):
        return "expected 'stages.<stage name>.<type>.<field>'"
    rest = path[len("stages."):]
    for spec in sorted(stages, key=lambda s: -len(s.name)):  # longest name first: 'a.b' vs 'a'
        prefix = f"{spec.name}.{spec.type}."
        if rest.startswith(prefix) and len(rest) > len(prefix):
            return spec, rest[len(prefix):].split(".")
    names = [s.name for s in stages]
    name = rest.split(".")[0]
    if name in names:
        spec = next(s for s in stages if s.name == name)
        return f"stage {name!r} is a {spec.type!r} stage: write stages.{name}.{spec.type}.<field>"
    return f"no stage named {name!r}{suggest(name, names)}"


def with_value(config: BaseModel, fields: list[str], value: Any) -> BaseModel:
    """``config`` (a stage's pydantic config) with the field at ``fields`` set to ``value``,
    validated as the file would be; raises ValueError naming what is wrong."""
    data = copy.deepcopy(config.model_dump(mode="json", exclude_unset=False))
    holder: Any = data
    for part in fields[:-1]:
        if not isinstance(holder, dict) or not isinstance(holder.get(part), dict):
            raise ValueError(f"{part!r} is not a section of this stage")
        holder = holder[part]
    if not isinstance(holder, dict) or fields[-1] not in holder:
        known = list(holder) if isinstance(holder, dict) else []
        raise ValueError(f"no field {fields[-1]!r}{suggest(fields[-1], known)}")
    holder[fields[-1]] = value
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ValueError(f"value {value!r}: {first['msg']}") from None


def check_search(search: SearchConfig | None, stages: list[StageSpec]) -> list[Problem]:
    """Every parameter names a stage field that accepts its range; the reference exists."""
    if search is None:
        return []
    problems = []
    for path, param in search.parameters.items():
        where = f"search.parameters.{path}"
        found = resolve(path, stages)
        if isinstance(found, str):
            problems.append(Problem(where, found))
            continue
        spec, fields = found
        if not spec.parsed:
            continue  # the stage's own problems are reported where it is
        for value in param.extremes():
            try:
                with_value(spec.config, fields, value)
            except ValueError as exc:
                problems.append(Problem(where, str(exc)))
                break
    ref = search.objective.reference
    if ref is not None and ref not in [s.name for s in stages]:
        problems.append(Problem("search.objective.reference", f"no stage named {ref!r}"
                                f"{suggest(ref, [s.name for s in stages])}"))
    return problems
