"""Hostile input: no unpickling or eval anywhere in compresspipe, no code chosen by saved
metadata, and no metadata-named path that reaches outside the output directory."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_pipeline

from compresspipe.core.artifact import Artifact
from compresspipe.core.errors import ArtifactError, ConfigError
from compresspipe.formats import encode_raw, pack_cpz
from compresspipe.formats.cpz_model import read_model_cpz
from compresspipe.pipeline.loader import load_pipeline

PACKAGE = ROOT / "compresspipe"

# The only places that may import a module whose name is not a literal, each for a reason the
# hostile-input rules allow: the name comes from the pipeline file, or is one of our own.
DYNAMIC_IMPORTS = {
    ("stages/registry.py", "get_stage"),  # a stage type the pipeline file names
    ("core/models.py", "import_factory"),  # a factory named by the pipeline file (checked by caller)
    ("core/artifact.py", "deployed_model"),  # only modules under compresspipe.
    ("stages/registry.py", "_load_builtins"),  # the built-in stage modules, found on disk
    ("__init__.py", "__getattr__"),  # the lazy public API, from a literal table
}


# -- the scanner ------------------------------------------------------------------------------


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (``np`` -> ``numpy``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


UNPICKLERS = {f"{m}.{f}" for m in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle",
                                   "joblib", "marshal", "shelve")
              for f in ("load", "loads", "Unpickler", "open")}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader"}


def scan(source: str, filename: str) -> list[str]:
    """Every unsafe deserialization, eval/exec and non-literal import in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    findings: list[str] = []
    scopes: dict[ast.AST, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in ast.walk(node):
                scopes.setdefault(child, node.name)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load") and not _is_const(
                _kw(node, "weights_only"), True):
            findings.append(f"{where}: torch.load without weights_only=True")
        elif name in ("torch.jit.load", "pandas.read_pickle", "numpy.lib.format.read_array"):
            findings.append(f"{where}: {name} deserializes code or pickles")
        elif name in UNPICKLERS:
            findings.append(f"{where}: {name}")
        elif name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            findings.append(f"{where}: {name}()")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                      "yaml.full_load_all"):
            findings.append(f"{where}: {name}")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, aliases) not in SAFE_YAML_LOADERS:
                findings.append(f"{where}: {name} without SafeLoader")
        elif name in ("numpy.load", "numpy.lib.npyio.load") and not (
                _kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)):
            findings.append(f"{where}: numpy.load with allow_pickle")
        elif name in ("importlib.import_module", "__import__", "importlib.__import__"):
            arg = node.args[0] if node.args else _kw(node, "name")
            if not isinstance(arg, ast.Constant) and (filename, scopes.get(node, "<module>")) \
                    not in DYNAMIC_IMPORTS:
                findings.append(f"{where}: import of a computed module name")
    return findings


def test_scanner_catches_every_pattern():
    bad = textwrap.dedent("""
        import pickle, yaml, torch, importlib
        import numpy as np
        from pickle import loads as l2
        torch.load(f)
        torch.load(f, weights_only=False)
        torch.jit.load(f)
        pickle.load(f)
        l2(b)
        eval("1")
        exec("x = 1")
        yaml.load(text)
        yaml.load(text, Loader=yaml.Loader)
        yaml.unsafe_load(text)
        np.load(f, allow_pickle=True)
        importlib.import_module(name)
    """)
    good = textwrap.dedent("""
        import torch, yaml, importlib
        import numpy as np
        torch.load(f, map_location="cpu", weights_only=True)
        yaml.load(text, Loader=yaml.SafeLoader)
        yaml.safe_load(text)
        np.load(f)
        np.load(f, allow_pickle=False)
        model.eval()
        importlib.import_module("compresspipe.stages")
    """)
    found = scan(bad, "bad.py")
    assert [int(f.split(":")[1]) for f in found] == list(range(5, 17)), found
    assert scan(good, "good.py") == []


def test_no_unsafe_deserialization_eval_or_computed_imports_in_the_package():
    findings = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        findings += scan(path.read_text(), path.relative_to(PACKAGE).as_posix())
    assert findings == []


# -- code is imported only when a pipeline file names it ---------------------------------------


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported or called."""
    name = f"evil_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "pwned"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        def make(**kwargs):
            import torch
            Path({str(marker)!r}).write_text("called")
            return torch.nn.Linear(2, 2)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def _saved_artifact(directory: Path, spec: dict, deploy=None) -> Path:
    """An artifact of a Linear(2, 2) whose artifact.json then says ``spec`` and ``deploy``."""
    import torch

    Artifact(model=torch.nn.Linear(2, 2), spec={"source": "timm", "name": "x"}).save(directory)
    meta = json.loads((directory / "artifact.json").read_text())
    meta["spec"], meta["deploy"] = spec, deploy
    (directory / "artifact.json").write_text(json.dumps(meta))
    return directory


def test_artifact_metadata_cannot_choose_a_factory(tmp_path, evil_module):
    name, marker = evil_module
    art = _saved_artifact(tmp_path / "a", {"source": "factory", "factory": f"{name}:make",
                                           "kwargs": {}})
    with pytest.raises(ArtifactError, match="no pipeline file in this process names"):
        Artifact.load(art)
    assert not marker.exists() and name not in sys.modules


def test_cpz_metadata_cannot_run_code(tmp_path, evil_module):
    from compresspipe.cli import main

    name, marker = evil_module
    tensors = {"weight": encode_raw(np.zeros((2, 2), np.float32))}
    for spec in ({"source": "factory", "factory": f"{name}:make", "kwargs": {}},
                 {"source": "factory", "factory": "os:system",
                  "kwargs": {"command": f"touch {marker}"}}):
        path = tmp_path / "evil.cpz"
        path.write_bytes(pack_cpz(tensors, {"spec": spec}))
        with pytest.raises(ArtifactError, match="never imported"):
            read_model_cpz(path)
        assert main(["decompress", str(path), "-o", str(tmp_path / "out.safetensors")]) == 1
        assert not marker.exists() and name not in sys.modules
        assert not (tmp_path / "out.safetensors").exists()


def test_metadata_cannot_name_a_weights_file(tmp_path):
    spec = {"source": "timm", "name": "test_resnet",
            "kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}}
    path = tmp_path / "m.cpz"
    path.write_bytes(pack_cpz({"w": encode_raw(np.zeros(2, np.float32))}, {"spec": spec}))
    with pytest.raises(ArtifactError, match="may not set checkpoint_path"):
        read_model_cpz(path)


def test_a_factory_named_by_the_pipeline_file_is_imported(tmp_path, evil_module):
    name, marker = evil_module
    cfg = tiny_pipeline(tmp_path / "out", model={"factory": f"{name}:make"})
    load_pipeline(cfg, check_model=False)
    assert name not in sys.modules  # validation alone, without the model check, imports nothing
    load_pipeline(cfg)  # the model check builds the named factory: trusted, so imported
    assert marker.read_text() == "called"
    art = _saved_artifact(tmp_path / "a", {"source": "factory", "factory": f"{name}:make",
                                           "kwargs": {}})
    assert isinstance(Artifact.load(art).model, __import__("torch").nn.Linear)


def test_deploy_module_outside_compresspipe_is_never_imported(tmp_path, evil_module):
    from compresspipe.core.models import allow_factory

    name, marker = evil_module
    allow_factory("torch.nn:Linear")  # the spec is trusted here; the deploy module is not
    art = _saved_artifact(tmp_path / "a", {"source": "factory", "factory": "torch.nn:Linear",
                                           "kwargs": {"in_features": 2, "out_features": 2}},
                          deploy={"format": "evil", "files": ["model.safetensors"],
                                  "module": name})
    loaded = Artifact.load(art)
    with pytest.raises(ArtifactError, match="unknown deploy format 'evil'"):
        loaded.deployed_model(art)
    assert not marker.exists() and name not in sys.modules


def test_metadata_cannot_ask_for_a_huge_model(tmp_path):
    """A spec is checked against the file's tensors on the meta device before anything is
    allocated: a 1 KB file cannot make the reader build a 1.6-billion-parameter model."""
    import resource

    huge = {"source": "timm", "name": "test_resnet", "kwargs": {"num_classes": 2**24}}
    path = tmp_path / "bomb.cpz"
    path.write_bytes(pack_cpz({"w": encode_raw(np.zeros(2, np.float32))}, {"spec": huge}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="describes 1,627,764,735 parameters"):
        read_model_cpz(path)
    art = _saved_artifact(tmp_path / "a", huge)
    with pytest.raises(ArtifactError, match="the file holds 6"):
        Artifact.load(art)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500  # the real model would need 6.5 GB


# -- names from metadata never become paths outside the output directory ------------------------


HOSTILE_NAMES = ["../escape", "..", ".", "", "a/../../escape", "/tmp/escape", "a/b", "a\\b"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_artifact_outputs_stay_inside_the_directory(tmp_path, name):
    import torch

    art = Artifact(model=torch.nn.Linear(2, 2), spec={"source": "timm", "name": "x"})
    written = []
    art.outputs[name] = lambda p: (written.append(p), Path(p).write_text("x"))
    with pytest.raises(ArtifactError, match="invalid artifact output file name"):
        art.save(tmp_path / "out" / "stage")
    assert written == [] and not (tmp_path / "out" / "stage").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]  # the temp dir is gone too


@pytest.mark.parametrize("files", [["../../victim.onnx"], ["/etc/passwd"], [".."], [], "x", None])
def test_artifact_deploy_files_must_be_inside_the_directory(tmp_path, files):
    art = _saved_artifact(tmp_path / "a", {"source": "timm", "name": "test_resnet"},
                          deploy={"format": "int8-onnx", "files": files})
    with pytest.raises(ArtifactError, match="invalid 'deploy' entry"):
        Artifact.load(art)


def test_summary_names_cannot_delete_outside_output_dir(tmp_path):
    from compresspipe.pipeline.runner import Runner

    out = tmp_path / "out"
    out.mkdir()
    victims = [tmp_path / "victim", tmp_path / "victim2"]
    for v in victims:
        v.mkdir()
        (v / "precious").write_text("keep")
    (out / "old").mkdir()
    (out / "summary.json").write_text(json.dumps({"stages": [
        {"name": "../victim"}, {"name": str(victims[1])}, {"name": ".."}, {"name": "old"}]}))
    Runner(load_pipeline(tiny_pipeline(out), check_model=False))._clear_outputs()
    assert all((v / "precious").read_text() == "keep" for v in victims)
    assert not (out / "old").exists() and not (out / "summary.json").exists()


def test_summary_of_the_wrong_shape_is_a_clear_error(tmp_path):
    from compresspipe.core.errors import CompressPipeError
    from compresspipe.pipeline.runner import Runner

    out = tmp_path / "out"
    out.mkdir()
    runner = Runner(load_pipeline(tiny_pipeline(out), check_model=False))
    for bad in ([1, 2], {"stages": "x"}, {"stages": [3]}):
        (out / "summary.json").write_text(json.dumps(bad))
        with pytest.raises(CompressPipeError, match="not a compresspipe summary"):
            runner._read_summary()


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", "..", "mlruns/../x"])
def test_stage_names_from_the_pipeline_file_cannot_be_paths(tmp_path, name):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"][0]["name"] = name
    with pytest.raises(ConfigError, match=r"stages\[0\]\.name"):
        load_pipeline(cfg, check_model=False)


def test_cpz_tensor_names_cannot_be_paths(tmp_path):
    """The reader refuses path-like tensor names; decompress writes only the file it is told."""
    from compresspipe.cli import main
    from compresspipe.formats import CpzFormatError, cpz, unpack_cpz

    # version 1: its JSON section table makes renaming easy; both versions share the name rule
    good = pack_cpz({"w": encode_raw(np.ones(3, np.float32))}, {}, version=cpz.JSON_VERSION)
    for name in ("../w", "/w", "a\\w", ".w"):
        # same length as 'w' would change offsets: rebuild the file with the name swapped in
        evil = _rename_tensor(good, "w", name)
        with pytest.raises(CpzFormatError, match="bad tensor name"):
            unpack_cpz(evil)
        path = tmp_path / "in" / "m.cpz"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(evil)
        before = sorted(tmp_path.rglob("*"))
        assert main(["decompress", str(path), "-o", str(tmp_path / "in" / "o.safetensors")]) == 1
        assert sorted(tmp_path.rglob("*")) == before


def _rename_tensor(data: bytes, old: str, new: str) -> bytes:
    """The same .cpz with one tensor renamed and every length and checksum made valid again."""
    import hashlib
    import struct
    import zlib

    from compresspipe.formats import cpz

    body = data[: -cpz._DIGEST_SIZE]
    pos = cpz._HEADER.size
    sections = []
    for _ in range(2):
        length, _crc = cpz._SECTION.unpack_from(body, pos)
        sections.append(json.loads(body[pos + 8: pos + 8 + length]))
        pos += 8 + length
    payload = body[pos:]
    for entry in sections[1]["tensors"]:
        if entry["name"] == old:
            entry["name"] = new
    blocks = [json.dumps(s).encode() for s in sections]
    size = cpz._HEADER.size + sum(8 + len(b) for b in blocks) + len(payload) + cpz._DIGEST_SIZE
    out = cpz._HEADER.pack(cpz.MAGIC, cpz.JSON_VERSION, 0, size)
    for b in blocks:
        out += struct.pack("<II", len(b), zlib.crc32(b)) + b
    out += payload
    return out + hashlib.blake2b(out, digest_size=cpz._DIGEST_SIZE).digest()
