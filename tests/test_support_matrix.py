"""The structural part of the README's "Model support" table, kept true in CI.

benchmarks/support_matrix.py runs whole pipelines per family (too slow for CI); here the
families that used to fail are narrowed to 2x fewer MACs with the channel_prune algorithm, saved
and rebuilt from their spec (no pickle), and must give the same outputs; the tangled group search
(RexNet's partial residual) must stop quickly; ``validate`` must name the layers that keep their
width with the ``ignore:`` patterns.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load, save
from torch import nn

import compresspipe
from compresspipe.compress.structured.allocate import allocate, remove_units
from compresspipe.compress.structured.cost import CostModel
from compresspipe.compress.structured.graph import StructuredGraph
from compresspipe.compress.structured.importance import make_importance, unit_scores
from compresspipe.core.errors import CompressPipeError
from compresspipe.core.measure import count_macs
from compresspipe.core.models import build_from_spec
from compresspipe.core.structure import describe_structure
from compresspipe.pipeline.loader import load_pipeline


def _matrix():
    spec = importlib.util.spec_from_file_location(
        "support_matrix", ROOT / "benchmarks" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MATRIX = _matrix()
# the families whose structured chain failed before (group emptied, forward broken after
# removal, attention refused), and two that always worked
CI_FAMILIES = ["ghostnet", "mobilevitv2", "swin", "edgenext", "efficientnet", "vit"]


def _spec(family: str) -> tuple[dict, tuple[int, ...]]:
    name, kwargs, size = MATRIX.FAMILIES[family]
    spec = {"source": "timm", "name": name, "kwargs": {"num_classes": 10, "in_chans": 1,
                                                       **kwargs}}
    return spec, (1, 1, size, size)


@pytest.mark.parametrize("family", CI_FAMILIES)
def test_family_narrows_to_half_the_macs_and_reloads_without_pickle(family, one_thread):
    torch.manual_seed(0)
    spec, shape = _spec(family)
    model = build_from_spec(spec).eval()
    graph = StructuredGraph(model, shape)
    assert graph.groups, graph.skipped
    cost = CostModel(graph)
    dense = count_macs(model, shape)["macs"]
    allocation = allocate(graph, cost, unit_scores(graph, make_importance("l1")), "macs",
                          float(cost.evaluate()["macs"]) * 0.5)
    remove_units(graph, allocation.removals)
    assert count_macs(model, shape)["macs"] == pytest.approx(dense / 2, rel=0.03)
    for m in model.modules():  # every layer keeps at least one channel
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert min(m.weight.shape[:2]) >= 1
    rebuilt = build_from_spec({**spec, "structure": describe_structure(model,
                                                                       build_from_spec(spec))})
    rebuilt.load_state_dict(load(save(model.state_dict())), strict=True)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


class _PartialResidual(nn.Module):
    """RexNet's block: the shortcut is added to the first channels only."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin = cin
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, :self.cin] + x, y[:, self.cin:]], dim=1)


def _rexnet_like() -> nn.Module:
    blocks = [_PartialResidual(8 + 4 * i, 12 + 4 * i) for i in range(8)]
    return nn.Sequential(nn.Conv2d(1, 8, 3), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(40, 10))


def test_a_tangled_group_search_stops_and_is_skipped_with_its_reason():
    model = _rexnet_like().eval()
    graph = StructuredGraph(model, (1, 1, 8, 8))
    # the channels the shortcut is added to are cut at a size fixed in the block's code: they
    # keep their width, with the reason; the rest is pruned and the network still runs
    reasons = " | ".join(graph.skipped.values())
    assert "slices these channels" in reasons or "do not resolve" in reasons, reasons
    if graph.groups:
        cost = CostModel(graph)
        allocation = allocate(graph, cost, unit_scores(graph, make_importance("l1")), "macs",
                              float(cost.evaluate()["macs"]) * 0.9)
        remove_units(graph, allocation.removals)


def test_the_group_budget_is_a_clear_error():
    with pytest.raises(CompressPipeError, match=r"took more than 0 CPU s .*ignore"):
        StructuredGraph(_rexnet_like().eval(), (1, 1, 8, 8), budget_s=0)


def test_validate_names_the_layers_that_keep_their_width(tmp_path):
    name, kwargs, size = MATRIX.FAMILIES["swin"]
    pipeline = load_pipeline({
        "name": "v", "output_dir": str(tmp_path), "model": {"name": name, "kwargs": kwargs},
        "data": {"name": "digits", "image_size": size},
        # round_to 1: the plan lands on 2.0x exactly (the default 8 is coarse at 24 channels)
        "stages": [{"name": "slim", "channel_prune": {"ratio": 0.5, "round_to": 1}}]})
    text = "\n".join(pipeline.notes)
    assert "stage 'slim'" in text and "planned 2.0" in text
    assert "WindowAttention" in text and "ignore: ['" in text


def test_the_readme_table_comes_from_the_matrix_results():
    result = json.loads((ROOT / "benchmarks" / "results" / "support_matrix.json").read_text())
    assert result["table"] == MATRIX.table(result)
    assert result["table"] in (ROOT / "README.md").read_text(encoding="utf-8")
    for family in CI_FAMILIES:  # what CI checks here, the matrix must not contradict
        if family in result["families"]:
            assert result["families"][family]["stages"]["channel_prune"].startswith("ok"), family


def test_the_matrix_results_record_every_stage_of_every_family_that_ran_the_chains():
    result = json.loads((ROOT / "benchmarks" / "results" / "support_matrix.json").read_text())
    assert list(result["families"]) == [f for f in MATRIX.FAMILIES if f in result["families"]]
    chained = {f: e for f, e in result["families"].items()
               if set(MATRIX.FULL_CHAINS) <= set(e["chains"])}
    assert chained
    for family, entry in chained.items():
        assert set(entry["stages"]) == set(MATRIX.STAGE_TYPES), family
        assert all(v == "ok" or v.strip() for v in entry["stages"].values()), family
        assert entry["validate"]["pipelines"] == list(MATRIX.FULL_CHAINS), family
    assert result["chains_complete"] == MATRIX.chains_complete(result)


def test_the_table_shows_every_stage_column_its_reasons_and_the_validate_time():
    result = {"families": {"resnet": {
        "model": "test_resnet", "image_size": 32, "chains": list(MATRIX.FULL_CHAINS),
        "stages": {**dict.fromkeys(MATRIX.STAGE_TYPES, "ok"),
                   "qat": "CompressPipeError: export | check refused"},
        "validate": {"seconds": 21.4, "pipelines": list(MATRIX.FULL_CHAINS),
                     "verdict": "valid"}}}}
    text = MATRIX.table(result)
    header, _, row = text.splitlines()[:3]
    assert header.split(" | ")[2:-1] == list(MATRIX.STAGE_TYPES)
    assert row.count("✓") == len(MATRIX.STAGE_TYPES) - 1
    assert "export / check refused" in row and row.endswith("| 21 |")
    assert "int8 chain (train → prune → qat → export) complete on 0 of 1 families" in text
    assert "structured chain (train → channel_prune → cluster → huffman → export) complete on " \
        "1 of 1 families" in text


def test_a_failed_chain_names_the_stage_it_stopped_at(tmp_path, monkeypatch):
    def fails_at_cluster(spec):
        (tmp_path / "summary.json").write_text(json.dumps({"stages": [
            {"name": "input"}, {"name": "train"}, {"name": "channel_prune"}]}))
        raise CompressPipeError("expected weight to be at least 1 at dimension 0")

    monkeypatch.setattr(compresspipe, "run", fails_at_cluster)
    cells = MATRIX.run_chain("resnet", "structured", tmp_path)
    assert cells == {"train": "ok", "channel_prune": "ok",
                     "cluster": "CompressPipeError: expected weight to be at least 1 at "
                                "dimension 0",
                     "huffman": "not reached", "export": "not reached"}
    merged = {"cluster": "not reached"}
    MATRIX.merge(merged, cells)
    assert merged["cluster"].startswith("CompressPipeError") and merged["train"] == "ok"
