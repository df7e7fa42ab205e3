"""Exception types users see. Each carries a message that names what is wrong and where."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


class CompressPipeError(Exception):
    """Base of every error compresspipe raises on purpose; the CLI prints it as one line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def onnx_export_failed(exc: Exception) -> CompressPipeError:
    """One line for a failed ``torch.onnx.export``: the exporter raises many types and colours
    its messages for terminals, which a log or an MLflow tag shows as escape codes."""
    first = _ANSI.sub("", str(exc)).strip().splitlines()
    return CompressPipeError(f"ONNX export of the model failed: {type(exc).__name__}: "
                             f"{first[0] if first else ''}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a pipeline file: where (YAML path, line) and what."""

    path: str
    message: str
    line: int | None = None
    source: str | None = None  # "--set" when the value came from an override

    def render(self) -> str:
        where = [f"line {self.line}"] if self.line is not None and not self.source else []
        if self.path:
            where.append(self.path + (f" (from {self.source})" if self.source else ""))
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ConfigError(CompressPipeError):
    """A pipeline file is invalid. Holds every problem found, not just the first."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return f"{self.file}: {self.problems[0].render()}"
        lines = [f"{self.file}: {len(self.problems)} problems"]
        lines += [f"  - {p.render()}" for p in self.problems]
        return "\n".join(lines)


class ArtifactError(CompressPipeError):
    """An artifact directory is missing, incomplete or does not match its model."""


class MaskViolation(CompressPipeError):
    """A stage revived weights that an earlier pruning stage had set to zero."""


class TrackingError(CompressPipeError):
    """The MLflow tracking store refused a call, or stayed unreachable past the retry budget."""

    def __init__(self, message: str, uri: str = "", transient: bool = False,
                 error_code: str | None = None):
        super().__init__(message)
        self.uri, self.transient, self.error_code = uri, transient, error_code


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
