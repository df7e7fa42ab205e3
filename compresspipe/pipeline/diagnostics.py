"""What a pipeline file's problems say: pydantic's errors turned into one message each (the key
that is unknown and the closest allowed one, the options of a choice), and each problem placed
at its line in the file (or the --set that gave the value)."""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from ..core.errors import Problem, suggest
from ..stages.registry import list_stages
from .schema import NAME_PATTERN, stage_item_model
from .yaml_source import PathKey, SourceMap, format_path


def pydantic_problems(
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
    found = short(err.get("input"))
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
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def locate(problems: list[Problem], smap: SourceMap) -> list[Problem]:
    """Problems with their line (or --set source), sorted by line; those without one last."""
    out = []
    for p in problems:
        if p.line is not None or p.source is not None:
            out.append(p)
            continue
        line, source = smap.locate(parse_path(p.path, smap))
        out.append(Problem(p.path, p.message, line, source))
    return sorted(out, key=lambda p: (p.line is None, p.line or 0))


def parse_path(path: str, smap: SourceMap | None = None) -> PathKey:
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


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
