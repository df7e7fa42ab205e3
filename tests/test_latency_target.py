"""channel_prune's ``target: {latency: f}``: the bisection, the config's validation, and the
stage on a tiny model (the pruned copies it times are the model it keeps)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_pipeline

import compresspipe
import compresspipe.pipeline.loader
from compresspipe.compress.structured.allocate import Allocation
from compresspipe.compress.structured.latency_budget import search_latency
from compresspipe.core.errors import CompressPipeError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake(removed: float) -> Allocation:
    return Allocation([], {"macs": 1 - removed}, 1 - removed)


def test_search_finds_the_least_removal_that_meets_the_goal():
    # latency falls slower than MACs (fixed overhead): ratio = 0.4 + 0.6 * kept MACs
    def measure(a: Allocation) -> float:
        return 0.4 + 0.6 * a.predicted["macs"]

    search = search_latency(_fake, measure, goal=0.7, iterations=8)
    # 0.4 + 0.6 * (1 - f) <= 0.7  <=>  f >= 0.5: bisection lands just above 0.5
    assert 0.5 <= search.macs_removed < 0.51
    assert search.latency_ratio <= 0.7
    # the top, 8 bisection steps, and the answer timed a second time
    assert len(search.trials) == 10 and search.trials[0].macs_removed == pytest.approx(0.95)
    assert search.trials[-1].macs_removed == search.macs_removed


def test_a_lucky_timing_is_not_the_answer():
    timings = iter([0.5, 0.6, 0.9, 0.9])  # top, 0.475, 0.2375, then 0.475 timed again

    search = search_latency(_fake, lambda a: next(timings), goal=0.7, iterations=2)
    # 0.475 met the goal once, then measured 0.9: the top (met by the first timing) is chosen
    assert search.macs_removed == pytest.approx(0.95)


def test_search_says_when_the_budget_is_out_of_reach_and_lowers_an_unreachable_top():
    def allocate_at(removed: float) -> Allocation:
        if removed > 0.8:  # the layers' caps stop the allocation here
            raise CompressPipeError("cannot reduce macs")
        return _fake(removed)

    with pytest.raises(CompressPipeError, match=r"0\.30x .* out of reach: removing 80%"):
        search_latency(allocate_at, lambda a: 0.4 + 0.6 * a.predicted["macs"], 0.3, 4)


def _pipeline(tmp_path, stage: dict) -> dict:
    cfg = tiny_pipeline(tmp_path / "out", epochs=1)
    cfg["data"].update(image_size=32, limit_train=64, limit_test=64)
    cfg["stages"] = [{"name": "cp", "channel_prune": stage}]
    cfg["tracking"] = {"enabled": False}
    return cfg


def test_config_errors_name_the_place(tmp_path):
    cases = [({"target": {"latency": 1.2}}, "stages[0].channel_prune.target.budget.latency"),
             ({"target": {"latency": 0.5}, "latency": None}, "remove 'latency: null'"),
             ({"target": {"latency": 0.5}, "ratio": 0.5}, "'ratio' does not apply"),
             ({"target": {"latency": 0.5, "steps": 3}}, "target.budget.steps: unknown key")]
    for stage, where in cases:
        with pytest.raises(ConfigError) as info:
            compresspipe.pipeline.loader.load_pipeline(_pipeline(tmp_path, stage))
        assert where in str(info.value), (stage, str(info.value))


def test_stage_prunes_to_a_measured_latency_budget(tmp_path):
    # a generous budget: on a shared machine the tiny model must still reach it reliably
    stage = {"target": {"latency": 0.85, "search_steps": 2},
             "latency": {"batch_sizes": [1], "repeats": 5, "rounds": 2}}
    compresspipe.run(_pipeline(tmp_path, stage))
    record = json.loads((tmp_path / "out" / "cp" / "artifact.json").read_text())
    record = record["meta"]["structured"]["cp"]
    search = record["steps"][0]["latency_search"]
    assert record["target"] == {"latency": 0.85, "search_steps": 2}
    assert len(search["trials"]) >= 3
    # the chosen removal measured within the budget, and no smaller one did twice
    assert search["trials"][-1]["latency_ratio"] <= 0.85 or search["macs_removed"] == max(
        t["macs_removed"] for t in search["trials"])
    # the model is the copy that was timed: the MACs the allocation chose, removed for real
    assert record["macs"] == pytest.approx(record["macs_before"] * (1 - search["macs_removed"]),
                                           rel=0.03)
    assert "speedup_b1" in record
