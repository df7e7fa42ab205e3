"""The cross-run stage cache: a matching prefix is reused, a changed earlier stage or library
version invalidates it, the size limit evicts, and `compresspipe cache ls|prune` work."""

from __future__ import annotations

import pytest

import compresspipe
from compresspipe.cli import main
from compresspipe.pipeline import cache as cache_module
from compresspipe.pipeline.cache import StageCache

# the MLflow side of a reuse (a tag naming the original run, a pointer instead of copies) is
# checked by test_search.py, whose later trials reuse the first one's stages


def _pipeline(out, sparsity=0.5, tracking=False):
    return {
        "name": "cached", "seed": 0, "output_dir": str(out),
        "model": {"factory": "factories_for_tests:mlp", "kwargs": {"hidden": 16}},
        "data": {"name": "digits", "image_size": 8, "batch_size": 128, "limit_train": 256},
        "tracking": {"enabled": tracking},
        "stages": [
            {"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
            {"name": "prune", "prune": {"method": "oneshot", "sparsity": sparsity,
                                             "train": {"epochs": 1, "lr": 0.01}}},
            {"name": "finetune", "train": {"epochs": 1, "lr": 0.01}},
        ],
    }


@pytest.fixture
def cache_on(monkeypatch, one_thread):
    monkeypatch.delenv("COMPRESSPIPE_NO_CACHE", raising=False)


def _reused(summary):
    return [s["name"] for s in summary["stages"] if s.get("cached_from_run", 0) != 0]


def test_second_run_reuses_and_a_changed_stage_invalidates_what_follows(tmp_path, cache_on,
                                                                         capsys):
    first = compresspipe.run(_pipeline(tmp_path / "a"))
    assert _reused(first) == []
    second = compresspipe.run(_pipeline(tmp_path / "b"))
    assert _reused(second) == ["input", "dense", "prune", "finetune"]
    assert "reused from the stage cache" in capsys.readouterr().out
    # the reused outputs are the same artifacts, measured the same
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert a["metrics"]["test_top1"] == b["metrics"]["test_top1"]
        assert a["fingerprint"] == b["fingerprint"]
    restored = compresspipe.load(tmp_path / "b" / "finetune")
    assert restored.masks  # masks survive through the cache

    changed = compresspipe.run(_pipeline(tmp_path / "c", sparsity=0.7))
    assert _reused(changed) == ["input", "dense"]  # prune changed: it and all after it rerun


def test_library_version_change_invalidates_and_no_cache_runs_everything(tmp_path, cache_on,
                                                                         monkeypatch):
    compresspipe.run(_pipeline(tmp_path / "a"))
    cfg = _pipeline(tmp_path / "b")
    cfg["cache"] = {"enabled": False}
    assert _reused(compresspipe.run(cfg)) == []
    real = cache_module.library_versions()
    monkeypatch.setattr(cache_module, "library_versions", lambda: {**real, "torch": "9.9.9"})
    monkeypatch.setattr("compresspipe.pipeline.runner.library_versions",
                        cache_module.library_versions)
    assert _reused(compresspipe.run(_pipeline(tmp_path / "c"))) == []


def test_size_limit_evicts_lru_and_cli_ls_prune(tmp_path, cache_on, capsys):
    root = tmp_path / ".compresspipe-cache"
    compresspipe.run(_pipeline(tmp_path / "a"))
    cache = StageCache(root)
    assert len(cache.entries()) == 4
    capsys.readouterr()
    assert main(["cache", "ls", "--dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "finetune" in listing and "cached" in listing
    oldest = cache.entries()[0].key
    result = cache.prune(cache.size() - 1)
    assert result["evicted"] >= 1 and oldest not in {e.key for e in cache.entries()}
    # the run directory still names its tensors: they stay, and it still loads
    assert compresspipe.load(tmp_path / "a" / "finetune").masks
    assert main(["cache", "prune", "--dir", str(root), "--all"]) == 0
    assert StageCache(root).entries() == []
    assert compresspipe.load(tmp_path / "a" / "prune").masks
