"""The prune stage: exact sparsity, N:M blocks, rewinding, ALLR, GMP, DSD, at-init, validation."""

from __future__ import annotations

import math

import pytest
import torch

import compresspipe
from compresspipe.compress.pruning.schedules import (
    OriginalSchedule,
    allr_eta_init,
    cubic_sparsity,
    imp_rate,
    imp_sparsities,
    norm_removed,
)
from compresspipe.compress.pruning.scopes import Targets, compute_masks, nm_layout
from compresspipe.core.errors import ConfigError
from compresspipe.pipeline.loader import load_pipeline


def _pipeline(out, *stages, dense_epochs=1, record=None):
    dense = {"epochs": dense_epochs, "lr": 0.05}
    if record is not None:
        dense["record_rewind"] = record
    return {
        "name": "prune-test", "output_dir": str(out), "tracking": {"enabled": False},
        "model": {"name": "test_resnet"},
        "data": {"name": "digits", "image_size": 16, "batch_size": 128, "limit_train": 512},
        "stages": [{"name": "dense", "train": dense}, *stages],
    }


def _prune(**kw):
    kw.setdefault("train", {"epochs": 1, "lr": 0.02})
    return {"name": "prune", "prune": kw}


def _targets_sparsity(artifact):
    params = dict(artifact.model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in artifact.masks)
    total = sum(params[n].numel() for n in artifact.masks)
    return zeros / total


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_oneshot_exact_sparsity(tmp_path, scope):
    compresspipe.run(_pipeline(tmp_path, _prune(sparsity=0.8, scope=scope)))
    art = compresspipe.load(tmp_path / "prune")
    masks = art.masks
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - round(0.8 * total) if scope == "global" else True
    if scope == "layer":
        for name, m in masks.items():
            assert int(m.sum()) == m.numel() - round(0.8 * m.numel()), name
    params = dict(art.model.named_parameters())
    for name, m in masks.items():
        assert torch.count_nonzero(params[name][~m]) == 0


def test_nm_blocks(tmp_path):
    # the stem's first conv has one input channel: no block of 4 along it
    with pytest.raises(ConfigError, match="input dimension of 'conv1.0.weight' is 1"):
        load_pipeline(_pipeline(tmp_path, _prune(granularity="2:4", scope="layer")))
    compresspipe.run(_pipeline(tmp_path, _prune(granularity="2:4", scope="layer",
                                                first_layer="exclude")))
    art = compresspipe.load(tmp_path / "prune")
    params = dict(art.model.named_parameters())
    assert "conv1.0.weight" not in art.masks and len(art.masks) > 5
    for name, mask in art.masks.items():
        blocks = nm_layout(mask).reshape(-1, 4)
        assert (blocks.sum(dim=1) == 2).all(), name  # every block of 4 keeps exactly 2
        nonzero = nm_layout(params[name] != 0).reshape(-1, 4).sum(dim=1)
        assert (nonzero <= 2).all(), name


def test_nm_mask_unit():
    score = torch.tensor([[4.0, 1, 3, 2, 0, 9, 8, 7]])
    mask = compute_masks({"w": score}, Targets(["w"]), 0.5, "layer", "2:4")["w"]
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]


def test_imp_rate_and_sparsities():
    assert imp_rate(0.9, 2) == pytest.approx(1 - math.sqrt(0.1))
    s = imp_sparsities(0.99, 3)
    assert s[-1] == pytest.approx(0.99) and s[0] == pytest.approx(1 - 0.01 ** (1 / 3))


def test_lth_rewinds_to_recorded_weights(tmp_path):
    compresspipe.run(_pipeline(tmp_path, _prune(method="lth", sparsity=0.5, rounds=1,
                                                train={"epochs": 0}),
                               dense_epochs=2, record={"step": 2}))
    dense = compresspipe.load(tmp_path / "dense")
    ticket = compresspipe.load(tmp_path / "prune")
    rewind = {k.removeprefix("rewind/"): v for k, v in dense.extras.items()}
    assert dense.meta["rewind"]["step"] == 2 and rewind
    final = dict(ticket.model.named_parameters())
    for name, mask in ticket.masks.items():
        # no retraining epochs: the ticket is exactly the rewound weights under the mask
        assert torch.equal(final[name][mask], rewind[name][mask]), name
        assert not torch.allclose(dense.model.state_dict()[name][mask], rewind[name][mask])


def test_rewind_needs_a_recorded_point(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\].prune.rewind_to: weight rewinding needs"):
        load_pipeline(_pipeline(tmp_path, _prune(method="lth", sparsity=0.5)))


def test_allr_eta_init_by_hand():
    # d = 0.3, s = 0.36: (0.3 / 0.6) * 0.1 = 0.05, inside [min(2/10, 1) * 0.1, 0.1] = [0.02, 0.1]
    assert allr_eta_init(0.3, 0.36, 0.1, 2, 10) == pytest.approx(0.05)
    assert allr_eta_init(0.01, 0.36, 0.1, 2, 10) == pytest.approx(0.02)  # clipped below
    assert allr_eta_init(0.9, 0.1, 0.1, 2, 10) == pytest.approx(0.1)  # clipped above
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    d = norm_removed(model, {"weight": torch.tensor([[False, True]])})
    assert d == pytest.approx(3 / 5)  # sqrt(25 - 16) / 5


def test_bimp_uses_allr_and_budget(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _pipeline(tmp_path, _prune(
        method="bimp", sparsity=0.9, rounds=2, bimp={"total_epochs": 4, "dense_epochs": 2},
        train={"epochs": 1, "lr": 0.05}))
    cfg.pop("tracking")
    summary = compresspipe.run(cfg)
    art = compresspipe.load(tmp_path / "prune")
    assert _targets_sparsity(art) == pytest.approx(0.9, abs=1e-4)
    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["stages"][-1]["run_id"]
    # the whole budget, and nothing more: 2 dense epochs + 2 rounds of 1 epoch
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [1, 2, 3, 4]
    etas = client.get_metric_history(run_id, "round_eta_init")
    assert [m.step for m in etas] == [1, 2]
    # η_init lies between the budget floor (1/2 of η_max) and η_max = 0.05
    assert all(0.025 - 1e-9 <= m.value <= 0.05 + 1e-9 for m in etas)


def test_gmp_follows_cubic_curve():
    assert cubic_sparsity(0, 0.0, 0.9, 10, 4, 5) == 0.0
    assert cubic_sparsity(10, 0.0, 0.9, 10, 4, 5) == pytest.approx(0.0)
    assert cubic_sparsity(20, 0.0, 0.9, 10, 4, 5) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cubic_sparsity(30, 0.0, 0.9, 10, 4, 5) == pytest.approx(0.9)
    assert cubic_sparsity(99, 0.0, 0.9, 10, 4, 5) == pytest.approx(0.9)  # frozen


def test_gmp_reaches_target(tmp_path):
    compresspipe.run(_pipeline(tmp_path, _prune(method="gmp", sparsity=0.75,
                                                gmp={"frequency": 2, "end_epoch": 1.5},
                                                train={"epochs": 2, "lr": 0.05})))
    art = compresspipe.load(tmp_path / "prune")
    total = sum(m.numel() for m in art.masks.values())
    assert sum(int(m.sum()) for m in art.masks.values()) == total - round(0.75 * total)


def test_dsd_ends_dense(tmp_path):
    # layers 1-2 only: at 16x16 input, layers 3-4 see 1x1 maps, where the 3x3 kernels' border
    # taps only ever multiply padding and get exactly zero gradient
    cfg = _pipeline(tmp_path, _prune(method="dsd", sparsity=0.5, scope="layer",
                                     include=["layer1.*", "layer2.*"],
                                     dsd={"sparse_epochs": 1, "redense_epochs": 1}))
    compresspipe.run(cfg)
    art = compresspipe.load(tmp_path / "prune")
    assert art.masks == {}
    params = dict(art.model.named_parameters())
    for name in ("layer1.0.conv1.weight", "layer2.0.conv2.weight"):
        # half of the layer was zero after the sparse phase; re-dense regrew it
        assert (params[name] == 0).float().mean() < 0.02, name


def test_layer_collapse_guard_keeps_global_total_exact():
    scores = {"a": torch.arange(100.0), "b": torch.arange(100.0) / 1000}  # b ranks last
    bare = compute_masks(scores, Targets(["a", "b"]), 0.9, "global")
    assert not bare["b"].any()  # pure global magnitude empties layer b
    guarded = compute_masks(scores, Targets(["a", "b"], min_keep=0.05), 0.9, "global")
    assert int(guarded["b"].sum()) == 5 and guarded["b"][-5:].all()
    assert int(guarded["a"].sum()) + 5 == 20  # still exactly 10% kept overall


@pytest.mark.parametrize("criterion", ["snip", "grasp", "synflow", "random"])
def test_at_init_keeps_every_layer_alive(tmp_path, criterion):
    cfg = _pipeline(tmp_path, _prune(method="at_init", criterion=criterion, sparsity=0.95,
                                     synflow_rounds=20))
    cfg["stages"] = cfg["stages"][1:]  # prune the untrained network
    compresspipe.run(cfg)
    art = compresspipe.load(tmp_path / "prune")
    assert _targets_sparsity(art) >= 0.95 - 1e-3
    for name, mask in art.masks.items():
        assert mask.any(), f"{criterion} emptied {name}"


def test_masks_survive_following_train_stage(tmp_path):
    compresspipe.run(_pipeline(tmp_path, _prune(sparsity=0.7),
                               {"name": "after", "train": {"epochs": 1, "lr": 0.05}}))
    pruned = compresspipe.load(tmp_path / "prune")
    after = compresspipe.load(tmp_path / "after")
    params = dict(after.model.named_parameters())
    assert after.masks.keys() == pruned.masks.keys()
    for name, mask in after.masks.items():
        assert torch.equal(mask, pruned.masks[name])
        assert torch.count_nonzero(params[name][~mask]) == 0


def test_wanda_oneshot_on_linear(tmp_path):
    compresspipe.run(_pipeline(tmp_path, _prune(criterion="wanda", sparsity=0.5, scope="layer",
                                                include=["fc.*"])))
    art = compresspipe.load(tmp_path / "prune")
    assert list(art.masks) == ["fc.weight"]
    assert _targets_sparsity(art) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("prune, message", [
    ({"method": "gmp", "criterion": "snip"}, "method 'gmp' prunes by magnitude"),
    ({"method": "lth", "retrain": "ft"}, "lth always rewinds weights"),
    ({"method": "imp", "criterion": "synflow"}, "use it with method at_init"),
    ({"granularity": "2:4", "scope": "global"}, "use scope 'layer'"),
    ({"granularity": "2:4", "scope": "layer", "sparsity": 0.9}, "2:4 means sparsity 0.5"),
    ({"granularity": "4:2"}, "0 < N < M"),
    ({"method": "bimp"}, "needs a 'bimp' block"),
    ({"rounds": 3}, "rounds apply to imp, lth and bimp"),
    ({"include": ["layer9.*"]}, "pattern 'layer9.*' matches no parameter"),
    ({"overrides": {"fc.weight": 1.5}}, "must be in [0, 1)"),
])
def test_bad_combinations_rejected_at_validation(tmp_path, prune, message):
    with pytest.raises(ConfigError) as info:
        load_pipeline(_pipeline(tmp_path, {"prune": prune}))
    assert message in str(info.value)
    assert "stages[1].prune" in str(info.value)


def test_original_schedule_replay():
    from compresspipe.compress.pruning.schedules import retrain_schedule
    from compresspipe.core.config import TrainConfig

    orig = OriginalSchedule(TrainConfig(epochs=10, lr=0.1, schedule="step", step_size=5,
                                        gamma=0.1), steps_per_epoch=10)
    assert orig.eta_max == pytest.approx(0.1) and orig.last_lr == pytest.approx(0.01)
    ft = retrain_schedule("ft", orig)
    assert ft(0, 20) == ft(19, 20) == pytest.approx(0.01)
    wr = retrain_schedule("wr", orig, rewind_step=30)
    assert wr(0, 70) == pytest.approx(0.1) and wr(30, 70) == pytest.approx(0.01)
    lrw = retrain_schedule("lrw", orig)  # tail of the schedule: the last 40 steps
    assert lrw(0, 40) == pytest.approx(0.01)
    llr = retrain_schedule("llr", orig)
    assert llr(9, 100) == pytest.approx(0.1) and llr(99, 100) < 0.002
