"""The notebook's code cells run top to bottom (plain exec: no kernel needed in CI)."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the notebook writes runs/notebook relative to its cwd
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert namespace["summary"]["status"] == "finished"
    assert len(namespace["runs"]) == 2
    assert (tmp_path / "runs" / "notebook" / "ticket" / "model.safetensors").is_file()
