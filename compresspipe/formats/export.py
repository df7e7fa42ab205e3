"""Exported model files and their consumer check in a fresh process.

Writers for the ``export`` stage's formats, a check that pruned weights are exact zeros in what
was written, and the consumer check: the test split saved once as ``.npy``, each file loaded by
``python -I`` with only what an outside user has (numpy + onnxruntime for ONNX; torch + timm +
safetensors for the dense weights; torch for a ``torch.export`` program), its top-1 printed as
JSON. Only the ``.cpz`` container, compresspipe's own format, is read back by compresspipe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader

from ..compress.quant.conv_taps import apply_window, recorded_windows
from ..compress.quant.onnx_int8 import check_int8_masks, deployed_weights
from ..core.artifact import write_json
from ..core.errors import CompressPipeError
from ..core.measure import file_bytes

DENSE_FILE = "model.dense.safetensors"
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"
MANIFEST_FILE = "export.json"
# consumers that must not need compresspipe, and what they load the file with
PLAIN_CONSUMERS = {"onnx": "onnxruntime", "timm": "timm + safetensors",
                   "torch_export": "torch.export.load"}


@dataclass
class Exported:
    """One written format: its file, what it holds, and its consumer check."""

    format: str
    path: Path
    deployed: bool  # the file holds the model the pipeline reports (else the fp32 weights)
    reference_top1: float  # compresspipe's accuracy of the model the file holds
    consumer: str  # loader kind of the fresh-process check
    masks_checked: int  # masked tensors found in the file and checked to be zero there
    note: str = ""
    top1: float | None = None
    imported: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return file_bytes([self.path])

    def record(self) -> dict[str, Any]:
        return {"file": self.path.name, "bytes": self.bytes, "holds": "deployed model" if
                self.deployed else "fp32 weights (not the deployed model)",
                "reference_top1": self.reference_top1, "consumer": _consumer_name(self.consumer),
                "top1": self.top1, "verified": self.top1 is not None,
                "masked_tensors_checked": self.masks_checked,
                "imported_by_consumer": self.imported, "note": self.note}


# -- writers -----------------------------------------------------------------------------------


def example_inputs(dataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of a dataset, stacked: what the exporters trace with."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def write_dense_safetensors(model: nn.Module, spec: dict[str, Any], path: Path) -> None:
    """The fp32 state dict, with metadata that says how to rebuild the network: plain timm
    (``timm_model``/``timm_kwargs``) where it can, and compresspipe's spec in any case."""
    meta = {"producer": "compresspipe export", "compresspipe_spec": json.dumps(spec)}
    if timm_rebuildable(spec) is None:
        meta.update(timm_model=spec["name"], timm_kwargs=json.dumps(spec.get("kwargs", {})))
    save_model(model.cpu().eval(), str(path), metadata=meta)


def timm_rebuildable(spec: dict[str, Any]) -> str | None:
    """None when ``timm.create_model(name, **kwargs)`` rebuilds the architecture, else why not."""
    if spec.get("source") != "timm":
        return f"the model comes from a Python factory ({spec.get('factory')}), not timm"
    if spec.get("structure"):
        return ("the model was physically pruned (spec.structure): plain timm.create_model "
                "builds the unpruned widths")
    return None


def write_torch_export(model: nn.Module, example: torch.Tensor, path: Path,
                       where: str = "torch_export") -> dict[str, torch.Tensor]:
    """``torch.export`` with a dynamic batch, saved as a .pt2 archive; return its state dict."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(model.cpu().eval(), (example.cpu(),),
                                      dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types; its message is what helps
        raise CompressPipeError(f"{where}: torch.export could not capture the model: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    torch.export.save(program, str(path))
    return dict(program.state_dict)


def onnx_opset(path: Path) -> int:
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# -- what was written keeps the masks ----------------------------------------------------------


def check_onnx_zeros(path: Path, masks: dict[str, torch.Tensor], stage: str) -> int:
    """Check the pruned weights an ONNX file stores under their parameter's name and shape;
    return how many. Batch norm folded into a convolution makes a new tensor (its zeros stay
    zeros) that the exporter may name after the norm; the runner checks those weights in
    model.safetensors."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read


    proto = onnx.load(str(path))
    stored = {name: values.shape for name, (values, _, _) in deployed_weights(proto).items()}
    trimmed = recorded_windows(proto)

    def shape(name: str, mask: torch.Tensor) -> tuple[int, ...]:
        return apply_window(mask.cpu().numpy(), trimmed.get(name)).shape

    found = {name: mask for name, mask in masks.items()
             if stored.get(name) in (shape(name, mask), shape(name, mask)[::-1])}
    check_int8_masks(proto, found, stage, where=path.name)
    return len(found)


# ONNX operators that draw random numbers: a deployed model must give the same output twice
RANDOM_OPS = ("RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
              "Bernoulli", "Multinomial")


def random_nodes(path: Path) -> list[str]:
    """Nodes of an ONNX file that draw random numbers (as ``name (op)``): a training-mode
    operation left in the graph makes every run of the file differ."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    proto = onnx.load(str(path), load_external_data=False)
    return [f"{n.name or n.output[0]} ({n.op_type})" for n in proto.graph.node
            if n.op_type in RANDOM_OPS]


def refuse_random_nodes(path: Path, where: str) -> None:
    """A clear error when ``path`` draws random numbers at inference, naming the nodes."""
    found = random_nodes(path)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise CompressPipeError(f"{where}: {path.name} draws random numbers at inference "
                                f"({shown}): a training-mode operation (dropout, stochastic "
                                "depth) was captured into the graph, so no two runs agree")


# -- the consumer check ------------------------------------------------------------------------


def write_split(loader: DataLoader, directory: Path) -> tuple[Path, Path]:
    """The test split as ``x.npy`` (float32 NCHW) and ``y.npy`` (int64), streamed to disk."""
    directory.mkdir(parents=True, exist_ok=True)
    x_path, y_path = directory / "x.npy", directory / "y.npy"
    n = len(loader.dataset)
    xs, labels, i = None, np.empty(n, np.int64), 0
    for x, y in loader:
        if xs is None:
            xs = open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n, *x.shape[1:]))
        xs[i: i + len(y)] = x.float().numpy()
        labels[i: i + len(y)] = y.numpy()
        i += len(y)
    if xs is None or i != n:
        raise CompressPipeError(f"export: the test split yielded {i} of {n} images")
    xs.flush()
    del xs
    np.save(y_path, labels)
    return x_path, y_path


CONSUMER_SCRIPT = r'''
"""Top-1 of one exported model file on the saved test split, printed as JSON.
Each loader imports only what its format needs."""
import json
import sys

import numpy as np


def torch_runner(module):
    import torch

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()
    return run


def onnx(path, _):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def timm(path, _):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], pretrained=False,
                              **json.loads(meta["timm_kwargs"]))
    load_model(model, path, strict=True)
    return torch_runner(model.eval())


def torch_export(path, _):
    import torch

    return torch_runner(torch.export.load(path).module())


def compresspipe(path, trusted):
    # formats only compresspipe reads: its .cpz, or a spec timm alone cannot rebuild; the
    # parent passes its import path and the model factories its pipeline file names
    sys.path[:0] = trusted["paths"]
    from compresspipe.core.models import allow_factory

    for factory in trusted["factories"]:
        allow_factory(factory)
    if path.endswith(".cpz"):
        from compresspipe.formats.cpz_model import read_model_cpz

        return torch_runner(read_model_cpz(path).model)
    from safetensors import safe_open
    from safetensors.torch import load_model

    from compresspipe.core.models import build_from_spec

    with safe_open(path, "pt") as f:
        model = build_from_spec(json.loads(f.metadata()["compresspipe_spec"]))
    load_model(model, path, strict=True)
    return torch_runner(model.eval())


kind, path, x_path, y_path, batch, trusted = sys.argv[1:7]
predict = {"onnx": onnx, "timm": timm, "torch_export": torch_export,
           "compresspipe": compresspipe}[kind](path, json.loads(trusted))
x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
batch, correct = int(batch), 0
for i in range(0, len(y), batch):
    logits = predict(np.ascontiguousarray(x[i: i + batch]))
    correct += int((logits.argmax(1) == y[i: i + batch]).sum())
watched = {"compresspipe", "torch", "timm", "onnxruntime"}
print(json.dumps({"top1": 100.0 * correct / len(y), "images": int(len(y)),
                  "imported": sorted(watched & {m.split(".")[0] for m in sys.modules})}))
'''


def run_consumer(item: Exported, x_path: Path, y_path: Path, batch: int, timeout: float,
                 spec: dict[str, Any] | None = None, stage: str = "export") -> None:
    """Load ``item`` in a fresh ``python -I`` and record its top-1 and what it imported
    (``spec``: the model's, whose factory the compresspipe loader may import)."""
    script = x_path.parent / "consumer.py"
    if not script.is_file():
        script.write_text(CONSUMER_SCRIPT)
    # -I: no cwd, no PYTHONPATH, no user site; only the compresspipe loader gets our path
    trusted = {"paths": [], "factories": []}
    if item.consumer == "compresspipe":
        factory = (spec or {}).get("factory")
        trusted = {"paths": [p for p in sys.path if p], "factories": [factory] if factory else []}
    cmd = [sys.executable, "-I", str(script), item.consumer, str(item.path), str(x_path),
           str(y_path), str(batch), json.dumps(trusted)]
    where = (f"stage {stage!r}: format {item.format!r} ({item.path.name}, consumer "
             f"{_consumer_name(item.consumer)})")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CompressPipeError(f"{where}: the fresh-process check took over {timeout:g} s "
                                "(raise verify_timeout, or set verify: false)") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise CompressPipeError(f"{where}: the fresh-process check failed: {lines[-1]}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CompressPipeError(f"{where}: the fresh-process check printed no result "
                                f"({done.stdout[-200:]!r})") from None
    if item.consumer != "compresspipe" and "compresspipe" in result["imported"]:
        raise CompressPipeError(f"{where}: the consumer imported compresspipe")
    item.top1, item.imported = float(result["top1"]), list(result["imported"])


def _consumer_name(kind: str) -> str:
    return "compresspipe (fresh process)" if kind == "compresspipe" else PLAIN_CONSUMERS[kind]


def write_manifest(path: Path, items: list[Exported], info: dict[str, Any]) -> None:
    write_json(path, {**info, "formats": {i.format: i.record() for i in items}})
