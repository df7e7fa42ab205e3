"""Per-layer sensitivity scans read the validation split (never the test set) and leave the
model as it was; mixed-precision int8 keeps the layer whose int8 sensitivity passes the
threshold in float; the sensitivity stage feeds prune and cluster allocation in a pipeline."""

from __future__ import annotations

import json
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from compresspipe.compress.sensitivity import (
    bits_curves,
    int8_drops,
    loss_curves,
    markdown_table,
    scan,
    validation_batches,
)
from compresspipe.core.artifact import Artifact
from compresspipe.core.config import DataConfig
from compresspipe.core.data import DataBundle
from compresspipe.core.errors import CompressPipeError
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.pipeline.runner import run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


class Untouchable(Dataset):
    """A test split that fails the test the moment anything reads it."""

    def __len__(self) -> int:
        raise AssertionError("the test split was read")

    def __getitem__(self, i):
        raise AssertionError("the test split was read")


def _bundle(val_size: int = 12) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 1, 8, 8, generator=g), torch.randint(0, 10, (120,), generator=g)
    val = TensorDataset(x[:val_size], y[:val_size]) if val_size else None
    return DataBundle(TensorDataset(x[val_size:], y[val_size:]), val, Untouchable(), 10, 1, 8,
                      DataConfig(name="fake", image_size=8, batch_size=16, eval_batch_size=16))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 8, 3, padding=1), act=nn.ReLU(),
        dw=nn.Conv2d(8, 8, 3, padding=1, groups=8), pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), fc=nn.Linear(8, 10)))


def test_scan_structure_on_the_validation_split_and_model_unchanged():
    model = _convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, split = validation_batches(_bundle(), max_batches=2)
    assert split == "val" and len(batches) == 1  # 12 validation images, one batch
    names = ["conv.weight", "dw.weight", "fc.weight"]
    masks = {"fc.weight": torch.rand(10, 8) > 0.5}
    record = scan(model, names, batches, split=split, sparsities=[0.5, 0.9], bits=[4, 2],
                  int8=True, masks=masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(record["layers"]) == names
    assert {n: r["family"] for n, r in record["layers"].items()} == {
        "conv.weight": "conv", "dw.weight": "depthwise", "fc.weight": "linear"}
    for row in record["layers"].values():
        assert [p["bits"] for p in row["bits"]] == [4, 2] and "int8" in row
        assert all(0 <= p["top1"] <= 100 and p["loss"] > 0 for p in row["sparsity"] + row["bits"])
    # the sparsity is the layer's real one: fc's mask already prunes about half of it
    fc = record["layers"]["fc.weight"]["sparsity"]
    assert fc[0]["sparsity"] >= 1 - masks["fc.weight"].float().mean().item() - 1e-9
    assert [p["sparsity"] for p in record["layers"]["conv.weight"]["sparsity"]] == pytest.approx(
        [0.5, 0.9], abs=1 / 72)
    assert record["images"] == 12
    curves = loss_curves(record)
    assert curves["dw.weight"][1][1] == pytest.approx(
        record["layers"]["dw.weight"]["sparsity"][1]["loss"] - record["dense"]["loss"])
    assert set(bits_curves(record)) == set(names)
    table = markdown_table(record)
    assert table.count("\n| ") == 1 + len(names) and "val" in table
    json.dumps(record)  # the record is plain JSON (it goes into artifact.json)


def test_scan_batches_are_capped_and_refused_without_a_validation_split():
    batches, split = validation_batches(_bundle(val_size=40), max_batches=2)
    assert split == "val" and sum(len(y) for _, y in batches) == 32  # capped at 2 batches of 16
    with pytest.raises(CompressPipeError, match="val_split"):
        validation_batches(_bundle(val_size=0), max_batches=2)


def _outlier_head() -> nn.Module:
    """Float: logits are 0.01·x[1+c], always right. int8 per channel: the 1000 on an input
    that is always 0 sets each row's scale, and the 0.01 weights round to zero."""
    model = nn.Sequential(OrderedDict(flat=nn.Flatten(), pre=nn.Linear(16, 16),
                                      head=nn.Linear(16, 10)))
    with torch.no_grad():
        model.pre.weight.copy_(torch.eye(16))
        model.pre.bias.zero_()
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[:, 0] = 1000.0
        model.head.weight[torch.arange(10), torch.arange(1, 11)] = 0.01
    return model


def _outlier_data(n: int = 64):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    x[:, 0, 0, 0] = 0.0
    return TensorDataset(x, x.flatten(1)[:, 1:11].argmax(1))


def test_mixed_precision_keeps_the_sensitive_layer_float(tmp_path):
    from compresspipe.compress.quant.pt2e import calibrate, convert, prepare_ptq
    from compresspipe.compress.quant.qdq import QDQScheme
    from compresspipe.stages.sensitivity import KeepFloat, keep_float_layers

    model, data = _outlier_head(), _outlier_data()
    bundle = DataBundle(data, data, Untouchable(), 10, 1, 4, DataConfig(name="fake", image_size=4,
                                                                  batch_size=32))
    _, drops = int8_drops(model, ["pre.weight", "head.weight"], [data.tensors])
    assert drops["head.weight"] > 50 > 5 > drops["pre.weight"]
    logged = {}
    ctx = SimpleNamespace(data=bundle, device="cpu", name="ptq",
                          log_metrics=lambda m, step: logged.update(m))
    drops, floating = keep_float_layers(KeepFloat(sensitivity_threshold=20), model, ctx)
    assert floating == ["head.weight"] and logged["float_layers"] == 1

    example = data.tensors[0][:2]
    scheme = QDQScheme(float_weights=frozenset(floating))
    prepared = prepare_ptq(model, example, scheme)
    calibrate(prepared, DataLoader(data, batch_size=32), 2)
    converted = convert(prepared)
    # the int8 graph: a quantized linear reads its weight through a dequantize node, the
    # float one reads the fp32 parameter itself
    weight_from = {}
    for node in converted.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            w = node.args[1]
            weight_from[len(weight_from)] = "dequantize" in str(w.target)
    assert weight_from == {0: True, 1: False}
    x, y = data.tensors
    with torch.no_grad():  # (an exported graph has no eval(); convert left it in eval form)
        assert (converted(x).argmax(1) == y).float().mean() > 0.9


def _sensitivity_pipeline(out) -> dict:
    return {
        "name": "sens", "seed": 0, "output_dir": str(out), "device": "cpu",
        "tracking": {"enabled": False},
        "model": {"factory": "factories_for_tests:mlp", "kwargs": {"img": 8}},
        "data": {"name": "digits", "image_size": 8, "batch_size": 64},
        "stages": [
            {"name": "dense", "train": {"epochs": 2, "lr": 0.1, "warmup_epochs": 0}},
            {"name": "sens", "sensitivity": {"sparsities": [0.5, 0.9], "bits": [6, 4, 2],
                                             "max_batches": 1, "kmeans_iters": 3}},
            {"name": "pruned", "prune": {"sparsity": 0.8, "train": {"epochs": 0},
                                         "allocation": {"rule": "sensitivity",
                                                        "scan": "stage:sens"}}},
            {"name": "shared", "cluster": {"finetune": {"epochs": 0}, "kmeans_iters": 3,
                                           "allocation": {"budget_bytes": 600}}},
            {"name": "int8", "ptq": {"calibration_batches": 1, "latency_repeats": 0,
                                     "keep_float": {"sensitivity_threshold": 0.01,
                                                    "max_batches": 1}}},
        ],
    }


def test_pipeline_sensitivity_feeds_prune_and_cluster(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_sensitivity_pipeline(tmp_path / "run")))
    summary = run_pipeline(load_pipeline(path))
    assert summary["status"] == "finished"
    sens = tmp_path / "run" / "sens"
    assert {"sensitivity.json", "sensitivity.md", "sensitivity_linear.png"} <= {
        p.name for p in sens.iterdir()}
    record = json.loads((sens / "sensitivity.json").read_text())
    pruned = json.loads((tmp_path / "run" / "pruned" / "artifact.json").read_text())["meta"]
    per_layer = pruned["pruning"]["layer_sparsity"]
    assert pruned["pruning"]["allocation"] == "sensitivity"
    assert set(per_layer) == set(record["layers"])

    masks = Artifact.load(tmp_path / "run" / "pruned").masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    quant = json.loads((tmp_path / "run" / "shared" / "artifact.json").read_text())["quant"]
    shared = quant["cluster"]["layers"]  # a pruned layer stores its survivors' indices only
    index_bits = sum(d["bits"] * (torch.Size(d["shape"]).numel() - d["pruned"])
                     for d in shared.values())
    assert (index_bits + 7) // 8 + sum(4 * 2 ** d["bits"] for d in shared.values()) <= 600
    int8 = json.loads((tmp_path / "run" / "int8" / "artifact.json").read_text())["quant"]["int8"]
    drops = int8["int8_top1_drop_alone"]
    assert set(drops) == set(record["layers"])
    assert int8["float_layers"] == [n for n, d in drops.items() if d > 0.01]


def test_cli_scans_the_input_model(tmp_path, capsys):
    from compresspipe.cli import main

    path = tmp_path / "p.yaml"
    cfg = _sensitivity_pipeline(tmp_path / "run")
    path.write_text(yaml.safe_dump({**cfg, "stages": cfg["stages"][:1]}))
    assert main(["sensitivity", str(path), "--sparsities", "0.5", "--bits", "2",
                 "--max-batches", "1", "-o", str(tmp_path / "scan")]) == 0
    assert "| 1 | linear | 2,048 |" in capsys.readouterr().out
    record = json.loads((tmp_path / "scan" / "sensitivity.json").read_text())
    assert record["split"] != "test" and list(record["layers"]) == ["1.weight", "3.weight"]
    assert main(["sensitivity", str(path), "--bits", "two"]) != 0
    assert "--bits" in capsys.readouterr().err


def test_allocation_by_sensitivity_needs_a_scan_to_read(tmp_path):
    from compresspipe.core.errors import ConfigError

    cfg = _sensitivity_pipeline(tmp_path / "run")
    no_scan = {**cfg, "stages": [cfg["stages"][0], cfg["stages"][2]]}
    no_scan["stages"][1]["prune"]["allocation"] = {"rule": "sensitivity"}
    with pytest.raises(ConfigError, match="needs a sensitivity stage"):
        load_pipeline(no_scan)
    wrong = {**cfg, "stages": [cfg["stages"][0], cfg["stages"][2]]}
    wrong["stages"][1]["prune"]["allocation"] = {"rule": "sensitivity", "scan": "stage:dense"}
    with pytest.raises(ConfigError, match="not a sensitivity stage"):
        load_pipeline(wrong)
