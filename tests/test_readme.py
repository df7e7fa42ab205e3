"""The README's stage table and example list are generated from the code and must match it."""

from __future__ import annotations

from pathlib import Path

import pytest

from compresspipe.core.errors import CompressPipeError
from compresspipe.pipeline import docs
from compresspipe.stages import registry
from compresspipe.stages.base import Stage, StageConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_matches_registry_and_examples():
    text = README.read_text(encoding="utf-8")
    assert docs.render(text, README) == text, "README is out of date: python -m compresspipe.pipeline.docs"
    for name, cls in registry.list_stages().items():
        if not registry.is_dotted_path(name):
            assert f"| `{name}` | {docs.summary_line(cls.__doc__)[:20]}" in text
    for example in (README.parent / "pipelines").glob("*.yaml"):
        assert f"(pipelines/{example.name})" in text


class _Undocumented(Stage):
    """A stage nobody documented by hand."""

    class Config(StageConfig):
        level: int = 3


def test_new_stage_makes_the_check_fail(monkeypatch, tmp_path, capsys):
    copy = tmp_path / "README.md"
    copy.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "pipelines").symlink_to(README.parent / "pipelines")
    assert docs.main([str(copy), "--check"]) == 0
    registry.list_stages()  # built-ins first, so the test stage is not the only one
    monkeypatch.setitem(registry._STAGES, "my_pkg.stages:Other", _Undocumented)
    assert docs.main([str(copy), "--check"]) == 0  # third-party stages are not listed
    monkeypatch.setitem(registry._STAGES, "undocumented", _Undocumented)
    assert docs.main([str(copy), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert docs.main([str(copy)]) == 0  # regenerates
    assert ("| `undocumented` | A stage nobody documented by hand. | `level`=3 |"
            in copy.read_text(encoding="utf-8"))


def test_table_cells_escape_pipes_and_summarise_training_options():
    table = docs.stage_table()
    assert "KL(teacher\\|\\|student)" in table  # distill's docstring would split its row
    qat = next(line for line in table.splitlines() if line.startswith("| `qat`"))
    assert docs.TRAIN_LOOP in qat and "`epochs`=3" in qat and "`momentum`" not in qat
    assert all(line.count(" | ") == 2 for line in table.splitlines()[2:])


def test_missing_markers_is_one_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    with pytest.raises(CompressPipeError, match="no '<!-- stages:begin"):
        docs.render(readme.read_text(), readme)
