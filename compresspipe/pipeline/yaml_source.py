"""YAML reading that remembers where each value came from, so errors can cite line numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..core.errors import Problem

PathKey = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Line of every key and value in a YAML document, by path; and which paths --set touched."""

    lines: dict[PathKey, int] = field(default_factory=dict)
    overridden: set[PathKey] = field(default_factory=set)

    def locate(self, path: PathKey) -> tuple[int | None, str | None]:
        """(line, source) for the deepest known prefix of ``path``."""
        for n in range(len(path), -1, -1):
            prefix = path[:n]
            if prefix in self.overridden:
                return None, "--set"
            if prefix in self.lines:
                return self.lines[prefix], None
        return None, None


def format_path(path: PathKey) -> str:
    """('stages', 2, 'prune', 'sparsity') -> 'stages[2].prune.sparsity'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_yaml(text: str) -> tuple[Any, SourceMap, list[Problem]]:
    """Parse ``text`` safely; return data, the source map and structural problems (duplicate keys).

    Raises yaml.YAMLError on syntax errors.
    """
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    smap = SourceMap()
    problems: list[Problem] = []
    if node is None:
        return None, smap, problems
    _walk(node, (), smap, problems)
    data = yaml.safe_load(text)
    return data, smap, problems


def _walk(node: yaml.Node, path: PathKey, smap: SourceMap, problems: list[Problem]) -> None:
    smap.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(format_path((*path, key)),
                            f"duplicate key (first defined on line {seen[key]})", line)
                )
                continue
            seen[key] = line
            smap.lines[(*path, key)] = line
            _walk(value_node, (*path, key), smap, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), smap, problems)


def apply_override(data: dict, assignment: str, smap: SourceMap) -> Problem | None:
    """Apply one ``a.b.0.c=value`` override in place; value is parsed as YAML."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key:
        return Problem(assignment, "an override must look like 'path.to.key=value'", source="--set")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return Problem(key, f"value {raw_value!r} is not valid YAML: {reason}", source="--set")
    parts: list[str | int] = [int(p) if p.lstrip("-").isdigit() else p for p in key.split(".")]
    cursor: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = format_path(tuple(parts[: depth + 1]))
        if isinstance(cursor, list):
            if not isinstance(part, int) or not -len(cursor) <= part < len(cursor):
                return Problem(here, f"no list item {part!r} (the list has {len(cursor)})",
                               source="--set")
            parts[depth] = part % len(cursor)  # record the item set, so errors cite --set
            cursor = cursor[part]
        elif isinstance(cursor, dict):
            cursor = cursor.setdefault(part, {})
        else:
            return Problem(here, f"cannot descend into a {type(cursor).__name__}", source="--set")
    last = parts[-1]
    here = format_path(tuple(parts))
    if isinstance(cursor, list):
        if not isinstance(last, int) or not -len(cursor) <= last < len(cursor):
            return Problem(here, f"no list item {last!r} (the list has {len(cursor)})",
                           source="--set")
        parts[-1] = last = last % len(cursor)
    elif not isinstance(cursor, dict):
        return Problem(here, f"cannot set a key inside a {type(cursor).__name__}", source="--set")
    cursor[last] = value
    smap.overridden.add(tuple(parts))
    return None
