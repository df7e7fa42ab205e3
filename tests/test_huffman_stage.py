"""The huffman stage: prune -> cluster -> huffman gives a .cpz whose decoded model is the model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import compresspipe
from compresspipe.core.errors import ArtifactError
from compresspipe.formats.cpz_model import read_model_cpz


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc")
    summary = compresspipe.run({
        "name": "dc", "output_dir": str(out), "tracking": {"enabled": False},
        "model": {"name": "test_resnet"},
        "data": {"name": "digits", "image_size": 16, "batch_size": 64},
        "stages": [
            {"name": "dense", "train": {"epochs": 2, "lr": 0.05}},
            {"name": "prune", "prune": {"sparsity": 0.9, "train": {"epochs": 1, "lr": 0.02}}},
            {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 4,
                                            "finetune": {"epochs": 1, "lr": 0.01}}},
            {"name": "huffman", "huffman": {}},
        ],
    })
    return out, summary


def test_cpz_is_the_measured_deployable(chain):
    out, summary = chain
    rec = {s["name"]: s for s in summary["stages"]}
    huff = rec["huffman"]
    assert huff["model_files"] == ["model.cpz"]
    assert huff["metrics"]["model_bytes"] == (out / "huffman" / "model.cpz").stat().st_size
    # the decoded model is the clustered model but for the 1-D tensors stored as float16 or a
    # small codebook, which the stage keeps only when they change nothing on its decision data
    # (the validation split); the choice is recorded in the file
    from compresspipe.formats import read_cpz

    tensors, metadata = read_cpz(out / "huffman" / "model.cpz")
    coded = {n: h for n, h in metadata["encoding"].items() if h.startswith("vector")}
    assert coded and all(tensors[n].to_dense().ndim == 1 for n in coded)
    assert abs(huff["metrics"]["test_top1"] - rec["cluster"]["metrics"]["test_top1"]) <= 1.0  # reported
    # 90% pruning + 4-bit indices, Huffman-coded: far smaller than the fp32 file and than the
    # cluster stage's dense index file (measured here: 19.5x vs 3.8x)
    assert huff["metrics"]["compression_ratio"] > 15
    assert huff["metrics"]["model_bytes"] < rec["cluster"]["metrics"]["model_bytes"] / 4


def test_decoded_weights_bit_exact_in_fresh_process(chain):
    out, _ = chain
    clustered = compresspipe.load(out / "huffman")
    code = ("import sys, torch; from compresspipe.formats.cpz_model import read_model_cpz;"
            "m = read_model_cpz(sys.argv[1]).model;"
            "from safetensors.torch import save_file;"
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[2])")
    result = subprocess.run([sys.executable, "-c", code, str(out / "huffman" / "model.cpz"),
                             str(out / "decoded.safetensors")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    decoded = load_file(str(out / "decoded.safetensors"))
    for name, value in clustered.model.state_dict().items():
        assert torch.equal(decoded[name], value), name
    for name, mask in clustered.masks.items():
        assert torch.count_nonzero(decoded[name][~mask]) == 0


def test_corrupt_cpz_is_one_clear_error(chain, tmp_path):
    out, _ = chain
    data = bytearray((out / "huffman" / "model.cpz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.cpz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="bad.cpz"):
        read_model_cpz(bad)


def test_batchnorm_statistics_are_folded_out_of_the_file(chain):
    from compresspipe.formats import read_cpz

    out, summary = chain
    tensors, metadata = read_cpz(out / "huffman" / "model.cpz")
    model = compresspipe.load(out / "huffman").model
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted(metadata["bn_folded"]) == sorted(bns) and bns
    assert not [n for n in tensors if n.endswith(("running_mean", "running_var",
                                                  "num_batches_tracked"))]
    assert all(f"{bn}.weight" in tensors and f"{bn}.bias" in tensors for bn in bns)


def test_hostile_bn_folded_metadata_is_rejected(chain, tmp_path):
    from compresspipe.formats import read_cpz, write_cpz

    out, _ = chain
    tensors, metadata = read_cpz(out / "huffman" / "model.cpz")
    from compresspipe.formats import encode_raw

    raw = {n: encode_raw(np.asarray(t.to_dense())) for n, t in tensors.items()}
    for bad in (["fc"], ["../../etc"], "bn1", [3]):
        path = tmp_path / "bad.cpz"
        write_cpz(path, raw, {**metadata, "bn_folded": bad})
        with pytest.raises(ArtifactError, match="bn_folded"):
            read_model_cpz(path)


def test_fold_statistics_keeps_outputs_and_shrinks_the_file(tmp_path):
    import timm

    from compresspipe.compress.quant.batchnorm import fold_statistics, folded_variance
    from compresspipe.core.artifact import Artifact
    from compresspipe.formats.cpz_model import write_model_cpz

    for eps in (1e-5, 1e-3, 0.1):
        assert np.float32(folded_variance(eps)) + np.float32(eps) == np.float32(1.0)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(16, 1, 16, 16) * 3 + 1)
    x = torch.randn(8, 1, 16, 16)
    artifact = Artifact(model=model.eval(), spec={"source": "timm", "name": "test_resnet", "kwargs": {
        "num_classes": 10, "in_chans": 1}})
    before = model(x)
    plain = write_model_cpz(artifact, tmp_path / "plain.cpz")
    folded = fold_statistics(model)
    assert folded and torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)
    smaller = write_model_cpz(artifact, tmp_path / "folded.cpz", bn_folded=folded)
    assert smaller < plain
    decoded = read_model_cpz(tmp_path / "folded.cpz").model
    assert torch.equal(decoded(x), model(x))


def test_lineage_detail_trims_only_provenance(chain, tmp_path):
    """'metrics' drops the stage configs, 'none' the whole lineage; the decoded model is the same
    and each level is smaller than the one before."""
    from compresspipe.core.artifact import Artifact
    from compresspipe.formats import read_cpz
    from compresspipe.formats.cpz_model import write_model_cpz

    out, _ = chain
    artifact = Artifact.load(out / "cluster")
    sizes, lineages, states = [], [], []
    for detail in ("full", "metrics", "none"):
        path = tmp_path / f"{detail}.cpz"
        sizes.append(write_model_cpz(artifact, path, lineage=detail))
        lineages.append(read_cpz(path)[1]["lineage"])
        states.append(read_model_cpz(path).model.state_dict())
    assert sizes[0] > sizes[1] > sizes[2]
    full, metrics, none = lineages
    assert [e["name"] for e in full] == [e["name"] for e in metrics] == [
        "input", "dense", "prune", "cluster"]
    assert all("config" in e for e in full) and not any("config" in e for e in metrics)
    assert [e["metrics"] for e in metrics] == [e["metrics"] for e in full] and none == []
    for state in states[1:]:
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    with pytest.raises(ValueError, match="lineage detail 'some'"):
        write_model_cpz(artifact, tmp_path / "bad.cpz", lineage="some")


def test_coding_summary_matches_the_file(chain):
    from compresspipe.formats import coding_summary, inspect_cpz

    out, _ = chain
    path = out / "huffman" / "model.cpz"
    rows = inspect_cpz(path)
    s = coding_summary(rows)
    model = compresspipe.load(out / "huffman")
    coded_nonzero = sum(int(torch.count_nonzero(model.masks[n])) for n in model.masks)
    assert s["coded_nonzero"] >= coded_nonzero > 0
    for stream in ("positions", "values"):
        # a Huffman code never beats the Shannon bound, and stays close to it
        assert s[f"{stream}_entropy_bits_per_nonzero"] <= s[f"{stream}_bits_per_nonzero"]
        assert s[f"{stream}_bits_per_nonzero"] < 1.1 * s[f"{stream}_entropy_bits_per_nonzero"] + 0.1
    parts = s["positions_bytes"] + s["values_bytes"] + s["table_bytes"] + s["raw_bytes"]
    assert parts < path.stat().st_size < parts + 64 * 1024  # the rest: header, metadata, table


def test_decompress_output_path_problems_are_one_clear_error(chain, tmp_path, capsys):
    from compresspipe.cli import main as cli_main

    out, _ = chain
    src = str(out / "huffman" / "model.cpz")
    assert cli_main(["decompress", src, "-o", str(tmp_path / "no" / "m.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["decompress", src, "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert cli_main(["decompress", src, "-o", str(tmp_path / "m.safetensors")]) == 0
    from safetensors.torch import load_file

    decoded = load_file(str(tmp_path / "m.safetensors"))
    for name, value in compresspipe.load(out / "huffman").model.state_dict().items():
        assert torch.equal(decoded[name], value), name
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left
