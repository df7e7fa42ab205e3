"""benchmarks/coding_vs_nnc.py's verdict rules and decode_speed.py's view of a .cpz's streams.

NNCodec itself lives in a venv of its own (`make nnc-venv`) and is not run here; what is tested
is how the benchmark decides: which NNCodec arm counts as "equal or better", and what counts as
a kept pruned zero.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compresspipe.formats import cpz, huffman

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    yield _load("coding_vs_nnc")
    del sys.modules["bench_coding_vs_nnc"]


def _arm(name: str, size: int, top1: float, loss: float, kept: bool = True) -> dict:
    return {"arm": name, "bytes": size, "val_top1": top1, "val_loss": loss, "all_kept": kept}


OURS = {"bytes": 800, "val_top1": 90.0, "val_loss": 0.30}


def test_best_arm_is_the_smallest_at_equal_accuracy_with_every_zero_kept(bench):
    arms = [_arm("dq", 500, 95.0, 0.10, kept=False),  # smallest, but drops pruned zeros
            _arm("worse top-1", 600, 89.9, 0.10),
            _arm("worse loss", 650, 92.0, 0.31),
            _arm("equal", 1000, 90.0, 0.30),
            _arm("better", 1200, 93.0, 0.20)]
    verdict = bench.compare(OURS, arms, {})
    assert verdict["best"] == "equal"
    assert verdict["ratio"] == pytest.approx(0.8)
    assert verdict["target_met"]  # 0.8 is the target itself
    assert verdict["smallest_nnc_any_accuracy"] == {"arm": "dq", "bytes": 500}
    assert verdict["target_bytes"] == pytest.approx(800)


def _shared_layer(idx: torch.Tensor):
    from compresspipe.core import artifact_keys
    from compresspipe.core.artifact import Artifact

    artifact = Artifact(model=torch.nn.Linear(idx.shape[1], idx.shape[0], bias=False), spec={})
    artifact_keys.set_cluster(artifact, {"layers": {"weight": {"bits": 2, "zero_index": 0}}},
                              {"weight": (idx, torch.tensor([0.0, -1.0, 1.0]))})
    return artifact


def test_entropy_floor_is_the_order0_entropy_of_positions_and_values(bench):
    """Nothing pruned and two indices equally often: positions cost nothing, values 1 bit each.
    With 8 kept weights of 64, order 0 is at most 64 H(1/8) bits of flags plus 8 of values."""
    dense = torch.tensor([1, 2], dtype=torch.uint8).repeat(4, 8)
    assert bench.entropy_floor(_shared_layer(dense))["order-0"] == pytest.approx(64 / 8)
    sparse = torch.zeros(4, 16, dtype=torch.uint8)
    sparse.view(-1)[torch.arange(0, 64, 8)] = torch.tensor([1, 2] * 4, dtype=torch.uint8)
    floor = bench.entropy_floor(_shared_layer(sparse))
    h = -(1 / 8 * math.log2(1 / 8) + 7 / 8 * math.log2(7 / 8))
    assert 8 / 8 <= floor["order-0"] <= (64 * h + 8) / 8 + 1e-9
    assert 0 < floor["best measured"] <= floor["order-0"] + 1e-9


def test_target_missed_when_ours_is_not_small_enough_or_nothing_qualifies(bench):
    assert not bench.compare(OURS, [_arm("equal", 999, 90.0, 0.30)], {})["target_met"]
    verdict = bench.compare(OURS, [_arm("dq", 500, 95.0, 0.1, kept=False)], {})
    assert verdict["ratio"] is None and not verdict["target_met"] and "no NNCodec arm" in verdict["why"]


def test_near_equal_view_is_reported_beside_the_strict_verdict(bench):
    arms = [_arm("a hair worse", 700, 89.95, 0.302), _arm("far worse", 400, 89.0, 0.30)]
    verdict = bench.compare(OURS, arms, {})
    assert verdict["best"] is None and not verdict["target_met"]  # the target stays strict
    assert verdict["near"]["arm"] == "a hair worse"
    assert verdict["near"]["ratio"] == pytest.approx(800 / 700)
    assert verdict["near"]["target_bytes"] == pytest.approx(560)


def test_zeros_kept_counts_only_pruned_positions(bench):
    mask = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    state = {"w": torch.tensor([[0.0, 0.0, 0.25], [0.0, 0.0, 1.0]])}  # one pruned entry is not 0
    assert bench.zeros_kept(state, {"w": mask}) == {"pruned": 3, "zeros_kept": 2, "all_kept": False}
    state["w"][0, 2] = 0.0
    assert bench.zeros_kept(state, {"w": mask})["all_kept"]


def test_decode_speed_sees_every_stream_of_the_file():
    speed = _load("decode_speed")
    rng = np.random.default_rng(0)
    indices = (rng.random((64, 32, 3, 3)) < 0.2) * rng.integers(1, 16, (64, 32, 3, 3))
    tensors = {"w": cpz.encode_clustered(indices.astype(np.uint8),
                                         np.linspace(0, 1, 16, dtype=np.float32)),
               "b": cpz.encode_raw(np.ones(64, np.float32))}
    data = cpz.pack_cpz(tensors, {"spec": {}})
    args = speed.stream_args(data)
    assert len(args) == 2  # the values and the positions of "w"; "b" is raw
    decoded = huffman.decode_many(args)
    assert sum(d.size for d in decoded) == sum(a[2] for a in args) > np.count_nonzero(indices)
    del sys.modules["bench_decode_speed"]
