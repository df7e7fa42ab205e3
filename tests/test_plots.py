"""Pictures logged per stage: weight histograms of quantizing stages, the bit budget of a .cpz.

One tracked pipeline (dense -> prune -> cluster -> huffman -> dynamic int8) on test_resnet.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_pipeline
from mlflow.tracking import MlflowClient

import compresspipe
from compresspipe.formats import inspect_cpz
from compresspipe.tracking import plots


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    cfg = tiny_pipeline(out, epochs=1)
    cfg["stages"] = [
        cfg["stages"][0],
        {"name": "prune", "prune": {"sparsity": 0.8, "train": {"epochs": 1, "lr": 0.02}}},
        {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 3,
                                        "finetune": {"epochs": 1, "lr": 0.01}}},
        {"name": "huffman", "huffman": {}},
        {"name": "int8", "ptq": {"mode": "dynamic", "latency_repeats": 0}},
    ]
    return out, compresspipe.run(cfg)


def _plots(summary, stage):
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    return {a.path for a in client.list_artifacts(summary["stage_runs"][stage], "plots")}


def test_plots_logged_where_they_belong(tracked):
    out, summary = tracked
    assert "plots/cluster_weights.png" in _plots(summary, "cluster")
    assert "plots/int8_weights.png" in _plots(summary, "int8")
    assert "plots/huffman_cpz_bits.png" in _plots(summary, "huffman")
    assert not {p for p in _plots(summary, "prune") if "weights" in p or "cpz" in p}
    assert not {p for p in _plots(summary, "huffman") if "weights" in p}
    assert (out / ".work" / "plots" / "cluster_weights.png").read_bytes()[:4] == b"\x89PNG"


def test_cpz_breakdown_accounts_for_every_byte(tracked):
    out, summary = tracked
    path = out / "huffman" / "model.cpz"
    rows = inspect_cpz(path)
    huffman = next(s for s in summary["stages"] if s["name"] == "huffman")["metrics"]
    bars = plots.cpz_breakdown(rows, path.stat().st_size, int(huffman["params"]))
    layers = {r["name"]: r for r in rows if len(r["shape"]) >= 2}
    assert [n for n, _ in bars[:-1]] == list(layers)
    for name, parts in bars[:-1]:
        assert sum(parts.values()) == pytest.approx(layers[name]["bits_per_weight"])
        assert parts["raw"] == 0  # every conv and linear weight is clustered
    assert sum(parts["positions"] > 0 for _, parts in bars[:-1]) > len(layers) / 2  # pruned
    whole = bars[-1][1]
    # the whole-file bar is the runner's bits_per_weight: every byte of the file, nothing else
    assert sum(whole.values()) == pytest.approx(huffman["bits_per_weight"])
    assert whole["raw"] > 0 and whole["container"] > 0


def test_clustered_weights_are_codebook_values(tracked):
    out, _ = tracked
    before = plots.weight_arrays(compresspipe.load(out / "prune").model)
    art = compresspipe.load(out / "cluster")
    pairs, normalized = plots.deployed_weight_pairs(before, art.deployed_model(out / "cluster"))
    assert not normalized and set(pairs) == set(before)
    bits = {n: d["bits"] for n, d in art.quant["cluster"]["layers"].items()}
    for name, (b, a) in pairs.items():
        assert np.array_equal(b == 0, a == 0)  # pruned stay pruned, no weight is lost
        assert len(np.unique(a[a != 0])) < 2 ** bits[name]
        assert plots._distinct_per_channel(a) < 2 ** bits[name]


def test_int8_weights_compared_per_channel(tracked):
    out, _ = tracked
    before = plots.weight_arrays(compresspipe.load(out / "huffman").model)
    deployed = compresspipe.load(out / "int8").deployed_model(out / "int8")
    pairs, normalized = plots.deployed_weight_pairs(before, deployed)
    assert normalized and "fc.weight" in pairs  # dynamic int8: the Linear layer is int8
    b, a = pairs["fc.weight"]
    assert np.abs(a).max() == pytest.approx(1.0) and np.abs(b).max() == pytest.approx(1.0)
    # the int8 grid is within half a step (1/254 of the channel's range) of the fp32 weights
    assert np.abs(a - b).max() <= 1 / 127
    assert plots._distinct_per_channel(a) <= 255
