"""Deep-Compression weight sharing: k-means codebooks, centroid gradients, exact rebuilds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_pipeline
from safetensors.torch import load_file

import compresspipe
from compresspipe.compress.quant.cluster import (
    CODEBOOK_FILE,
    CentroidHook,
    centroid_gradient,
    cluster_model,
    cluster_weight,
    kmeans_1d,
    load_layers,
)
from compresspipe.core.errors import ConfigError
from compresspipe.pipeline.loader import load_pipeline

PRUNED = "layer1.0.conv1.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- k-means and codebooks ---------------------------------------------------------------------


def test_kmeans_is_linear_initialised_nearest_and_deterministic():
    torch.manual_seed(0)
    x = torch.randn(5000)
    centroids, assign = kmeans_1d(x, 16, iters=0)
    assert torch.allclose(centroids, torch.linspace(float(x.min()), float(x.max()), 16,
                                                    dtype=torch.float64))
    centroids, assign = kmeans_1d(x, 16)
    again = kmeans_1d(x, 16)
    assert torch.equal(centroids, again[0]) and torch.equal(assign, again[1])
    assert torch.all(centroids[1:] >= centroids[:-1])
    distance = (x.double()[:, None] - centroids[None, :]).abs()
    assert torch.allclose(distance.gather(1, assign[:, None]).squeeze(1), distance.min(1).values)


def test_kmeans_finds_well_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    x = (centres[torch.randint(0, 3, (3000,))] + 0.01 * torch.randn(3000))
    centroids, _ = kmeans_1d(x, 3)
    assert torch.allclose(centroids.float(), centres, atol=0.01)


def test_pruned_weights_get_the_fixed_zero_centroid():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    mask = w.abs() > 0.5
    w = w * mask
    layer = cluster_weight("w", w, bits=3, mask=mask)
    assert layer.codebook.numel() == 8 and layer.codebook[0] == 0.0
    assert torch.equal(layer.indices == 0, ~mask)  # index 0 is exactly the pruned weights
    rebuilt = layer.weight()
    assert torch.equal(rebuilt[~mask], torch.zeros(int((~mask).sum())))
    assert rebuilt.unique().numel() <= 8
    # survivors are clustered among themselves: nothing near zero steals a pruned slot
    assert (rebuilt[mask].abs() > 0.4).all()


# -- centroid fine-tuning -----------------------------------------------------------------------


def _toy(bits=2, mask=None, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(12, 5, bias=False)
    if mask is not None:
        with torch.no_grad():
            layer.weight.mul_(mask)
    layers = cluster_model(layer, {"weight": bits}, {"weight": mask} if mask is not None else {})
    return layer, layers["weight"]


def test_centroid_gradient_is_the_sum_of_member_gradients():
    layer, clustered = _toy(bits=2)
    x, target = torch.randn(7, 12), torch.randn(7, 5)
    # the plain gradient of every weight, without the hook
    raw = torch.autograd.grad(torch.nn.functional.mse_loss(layer(x), target), layer.weight)[0]
    expected = torch.stack([raw[clustered.indices == k].sum() for k in range(4)])
    assert torch.allclose(centroid_gradient(raw, clustered.indices, 4), expected, atol=1e-7)

    hook = CentroidHook({"weight": clustered})
    hook.attach(layer)
    torch.nn.functional.mse_loss(layer(x), target).backward()
    assert torch.allclose(layer.weight.grad, expected[clustered.indices], atol=1e-7)
    # one plain SGD step moves each centroid by -lr * (sum of its members' gradients)
    before = clustered.codebook.clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    hook.after_step(layer, 1)
    used = torch.bincount(clustered.indices.reshape(-1), minlength=4) > 0
    assert torch.allclose((clustered.codebook - before)[used], -0.1 * expected[used], atol=1e-6)
    assert torch.equal(layer.weight.detach(), clustered.codebook[clustered.indices])
    hook.close()


def test_members_stay_equal_under_adamw_and_pruned_stay_zero():
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    layer, clustered = _toy(bits=3, mask=mask)
    hook = CentroidHook({"weight": clustered})
    hook.attach(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(4, 12)).pow(2).mean().backward()
        opt.step()  # no projection: equal members must stay equal by themselves
    w = layer.weight.detach()
    reps = clustered.representatives
    assert torch.equal(w, w.reshape(-1)[reps.clamp(min=0)][clustered.indices])
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.equal(w, clustered.codebook[clustered.indices])  # centroids did move
    hook.close()


# -- the stage ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "out"
    cfg = tiny_pipeline(out, tracking={"enabled": False})
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 2, "lr": 0.05, "warmup_epochs": 0.5}},
        {"name": "prune", "stages_for_tests:ZeroHalf": {"tensor": PRUNED}},
        {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 3,
                                        "overrides": {"fc": 2, "conv1.*": None},
                                        "finetune": {"epochs": 1, "lr": 0.0005}}},
    ]
    return out, compresspipe.run(cfg)


def test_indices_and_codebooks_rebuild_the_weights_exactly(clustered_run):
    out, _ = clustered_run
    art = compresspipe.load(out / "cluster")
    params = dict(art.model.named_parameters())
    layers = art.quant["cluster"]["layers"]
    assert layers["fc.weight"]["bits"] == 2 and layers["layer1.0.conv2.weight"]["bits"] == 4
    assert not any(name.startswith("conv1.") for name in layers)  # skipped by the override
    deployed = dict(art.deployed_model(out / "cluster").named_parameters())
    for name, desc in layers.items():
        indices = art.extras[f"cluster.{name}.indices"]
        codebook = art.extras[f"cluster.{name}.codebook"]
        assert indices.dtype == torch.uint8 and list(indices.shape) == desc["shape"]
        assert codebook.dtype == torch.float32 and codebook.numel() == 2 ** desc["bits"]
        rebuilt = codebook[indices.long()]
        assert torch.equal(rebuilt, params[name].detach())  # model.safetensors
        assert torch.equal(rebuilt, deployed[name].detach())  # the codebook file
    assert set(load_layers(art.extras, art.quant)) == set(layers)


def test_pruned_weights_stay_on_the_zero_centroid(clustered_run):
    out, _ = clustered_run
    art = compresspipe.load(out / "cluster")
    desc = art.quant["cluster"]["layers"][PRUNED]
    indices = art.extras[f"cluster.{PRUNED}.indices"].long()
    mask = art.masks[PRUNED]
    assert desc["zero_index"] == 0 and art.extras[f"cluster.{PRUNED}.codebook"][0] == 0.0
    assert torch.equal(indices == 0, ~mask)
    assert desc["pruned"] == int((~mask).sum())
    assert art.quant["cluster"]["layers"]["fc.weight"]["zero_index"] is None


def test_reported_accuracy_and_size_are_the_codebook_files(clustered_run):
    out, summary = clustered_run
    record = summary["stages"][-1]
    assert record["model_files"] == [CODEBOOK_FILE]
    assert record["metrics"]["model_bytes"] == (out / "cluster" / CODEBOOK_FILE).stat().st_size
    assert record["metrics"]["model_bytes"] < summary["stages"][1]["metrics"]["model_bytes"] / 3
    stored = load_file(str(out / "cluster" / CODEBOOK_FILE))
    assert stored[f"{PRUNED}.indices"].dtype == torch.uint8 and PRUNED not in stored
    art = compresspipe.load(out / "cluster")
    from compresspipe.core.data import build_data
    from compresspipe.core.measure import evaluate

    data = build_data(compresspipe.core.config.DataConfig(name="digits", image_size=16))
    assert evaluate(art.deployed_model(out / "cluster"), data.test_loader()) == pytest.approx(
        {k.removeprefix("test_"): v for k, v in record["metrics"].items()
         if k in ("test_top1", "test_top5", "test_loss")})
    assert record["metrics"]["test_top1"] > 80.0
    meta = json.loads((out / "cluster" / "artifact.json").read_text())
    assert "codebook[indices]" in meta["quant"]["cluster"]["convention"]


def test_override_patterns_are_checked_against_the_model(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [{"cluster": {"overrides": {"layer9.*": 4, "fc": 2},
                                  "finetune": {"epochs": 1, "freeze": ["nope.*"]}}}]
    with pytest.raises(ConfigError) as err:
        load_pipeline(cfg)
    text = str(err.value)
    assert "stages[0].cluster.overrides.layer9.*: pattern 'layer9.*' matches no conv or linear" in text
    assert "stages[0].cluster.finetune.freeze[0]" in text
    assert "'fc'" not in text
    cfg["stages"] = [{"cluster": {"conv_bits": None, "linear_bits": None}}]
    with pytest.raises(ConfigError, match="no layer is left to cluster"):
        load_pipeline(cfg)
    cfg["stages"] = [{"cluster": {"overrides": {"fc": 0}}}]
    with pytest.raises(ConfigError, match=r"overrides: 'fc': bits must be between 1 and 16"):
        load_pipeline(cfg)


def test_training_after_cluster_drops_the_stale_sharing_and_huffman_still_codes(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", tracking={"enabled": False})
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
        {"name": "cluster", "cluster": {"conv_bits": 3, "linear_bits": 3}},
        {"name": "retrain", "train": {"epochs": 1, "lr": 0.01, "freeze": ["fc.*"]}},
        {"name": "huffman", "huffman": {}},
    ]
    compresspipe.run(cfg)
    clustered = compresspipe.load(tmp_path / "out" / "cluster").quant["cluster"]["layers"]
    retrained = compresspipe.load(tmp_path / "out" / "retrain")
    # the frozen classifier kept its codebook; every retrained conv lost its stale one
    assert set(retrained.quant["cluster"]["layers"]) == {"fc.weight"} < set(clustered)
    assert not [k for k in retrained.extras if k.startswith("cluster.") and "fc.weight" not in k]
    meta = json.loads((tmp_path / "out" / "huffman" / "artifact.json").read_text())
    assert meta["quant"]["cluster"]["layers"].keys() == {"fc.weight"}


def test_centroid_finetuning_distils_from_an_earlier_stage(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
        {"name": "prune", "stages_for_tests:ZeroHalf": {"tensor": PRUNED}},
        {"name": "cluster", "cluster": {"conv_bits": 3, "linear_bits": 3,
                                        "finetune": {"epochs": 1},
                                        "distill": {"teacher": "stage:dense"}}},
    ]
    summary = compresspipe.run(cfg)
    client = MlflowClient(summary["tracking_uri"])
    run = summary["stage_runs"]["cluster"]
    assert [m.step for m in client.get_metric_history(run, "train_kd")] == [1]
    art = compresspipe.load(tmp_path / "out" / "cluster")
    indices = art.extras[f"cluster.{PRUNED}.indices"].long()
    assert torch.equal(indices == 0, ~art.masks[PRUNED])  # sparsity survives joint KD
    bad = tiny_pipeline(tmp_path / "bad")
    bad["stages"] = [{"name": "cluster", "cluster": {"distill": {"teacher": "stage:nope"}}}]
    with pytest.raises(ConfigError, match="nope"):
        load_pipeline(bad)
