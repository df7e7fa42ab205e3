"""Checks of name patterns (fnmatch) against the real model, with a hint that names the
pattern that would work: a module's parameters for a pattern that names a module, a misspelt
first name corrected, else the model's top-level names."""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn


def unmatched_pattern_problems(model: nn.Module, patterns: list[str], key: str,
                               kind: str = "parameter", weights: bool = False,
                               by_key: bool = False) -> list[tuple[str, str]]:
    """(path, message) for each fnmatch pattern that matches no parameter (or module) name;
    the path is ``key[i]``, or ``key.PATTERN`` (``by_key``) for the keys of a mapping.

    The hint names the pattern that would work: a module's parameters for a pattern that names
    a module (``fc`` -> ``fc.*``, or ``fc.weight`` with ``weights``: patterns that select
    weights), a misspelt first name corrected, else the model's top-level names."""
    params = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    names = params if kind == "parameter" else [n for n in modules if n]
    prefixes = sorted({n.split(".")[0] for n in names})
    problems = []
    for i, pattern in enumerate(patterns):
        if any(fnmatch.fnmatch(n, pattern) for n in names):
            continue
        hint = _pattern_hint(pattern, names, modules, kind, weights, prefixes)
        path = f"{key}.{pattern}" if by_key else f"{key}[{i}]"
        problems.append((path, f"pattern {pattern!r} matches no {kind} of the model"
                         f"{hint}"))
    return problems


def _pattern_hint(pattern: str, names: list[str], modules: dict[str, nn.Module], kind: str,
                  weights: bool, prefixes: list[str]) -> str:
    if kind == "parameter":
        if (fixed := _module_form(pattern, names, modules, weights)) is not None:
            return f" but names a module; did you mean {fixed!r}?"
        if any(n.startswith(pattern) for n in names):  # a prefix of names: 'layer1.0.conv'
            return f"; did you mean {pattern + '*'!r}?"
    head, dot, rest = pattern.partition(".")
    close = [c for c in _close(head, prefixes) if c != head]
    if close:
        fixed = close[0] + dot + rest
        if any(fnmatch.fnmatch(n, fixed) for n in names):
            return f"; did you mean {fixed!r}?"
        if kind == "parameter" and (form := _module_form(fixed, names, modules, weights)):
            return f"; did you mean {form!r}?"
    if (whole := _close(pattern, names)):  # a misspelt name: 'conv1.wieght'
        return f"; did you mean {whole[0]!r}?"
    listing = ", ".join(prefixes[:12])
    return f" (top-level names: {listing})"


def _module_form(pattern: str, params: list[str], modules: dict[str, nn.Module],
                 weights: bool) -> str | None:
    """For a pattern naming modules, the pattern of their parameters (None: it names none)."""
    matched = [m for name, m in modules.items() if name and fnmatch.fnmatch(name, pattern)]
    if not matched or not any(fnmatch.fnmatch(p, pattern + ".*") for p in params):
        return None
    leaves_with_weight = all(not any(True for _ in m.children())
                             and isinstance(getattr(m, "weight", None), nn.Parameter)
                             for m in matched)
    return f"{pattern}.weight" if weights and leaves_with_weight else f"{pattern}.*"


def _close(name: str, choices: list[str]) -> list[str]:
    return difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
