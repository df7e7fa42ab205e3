"""The command line: lazy start, listing, schema, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli, tiny_pipeline, write_yaml

from compresspipe.cli import main

LAZY = """
import sys
from compresspipe.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm", "mlflow") if m in sys.modules)
print("heavy:", heavy)
"""


def test_help_does_not_import_heavy_libraries():
    result = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: compresspipe" in result.stdout
    assert result.stdout.strip().endswith("heavy: []")


def test_stages_lists_parameters_and_defaults():
    result = run_cli("stages")
    assert result.returncode == 0, result.stderr
    assert "\ntrain: Train the incoming model" in "\n" + result.stdout
    assert "epochs (int, default 10)" in result.stdout
    assert "optimizer ('sgd' | 'adamw', default 'sgd')" in result.stdout


def test_schema_is_json_schema_with_stage_parameters(tmp_path):
    result = run_cli("schema", "-o", str(tmp_path / "schema.json"))
    assert result.returncode == 0, result.stderr
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert schema["title"] == "compresspipe pipeline"
    assert schema["additionalProperties"] is False
    assert "TrainConfig" in schema["$defs"]
    assert schema["$defs"]["TrainConfig"]["properties"]["epochs"]["minimum"] == 0


def test_runtime_error_is_one_line_and_exit_1(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", epochs=1)
    cfg["stages"] = [{"stages_for_tests:Boom": {"message": "kaput"}}]
    result = run_cli("run", str(write_yaml(tmp_path / "p.yaml", cfg)))
    assert result.returncode == 1
    assert "error: RuntimeError: kaput (run with --debug for the traceback)" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("run", str(tmp_path / "p.yaml"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_missing_file_and_no_command():
    result = run_cli("validate", "does/not/exist.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: does/not/exist.yaml: file not found"
    assert run_cli().returncode == 2


def test_cache_ls_of_a_missing_directory_is_one_clear_error(tmp_path, capsys):
    assert main(["cache", "ls", "--dir", str(tmp_path / "none")]) != 0
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
