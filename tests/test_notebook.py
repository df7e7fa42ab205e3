"""The notebook runs top to bottom in a real Jupyter kernel (nbclient), as a user would run it."""

from __future__ import annotations

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
    # the kernel is this interpreter, run in tmp_path (the notebook writes runs/notebook there)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    nbformat.validate(client.execute())
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "model.cpz" in text and "smaller than fp32" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the pictures were drawn
    assert (tmp_path / "runs" / "notebook" / "huffman" / "model.cpz").is_file()
