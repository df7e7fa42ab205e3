"""benchmarks/report.py: REPORT.md assembled from saved results only, robust to new layouts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _mask(ratio: float) -> dict:
    return {"model": "resnet18", "batch": 64, "threads": 1,
            "rows": {"dense": {"median_ms": 100.0, "ratio_vs_dense": 1.0},
                     "compresspipe masks": {"median_ms": 100 * ratio, "ratio_vs_dense": ratio},
                     "torch.nn.utils.prune": {"median_ms": 110.0, "ratio_vs_dense": 1.1}}}


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "mask_overhead.json").write_text(json.dumps(_mask(1.007)))
    (d / "mask_overhead_quick.json").write_text(json.dumps(_mask(1.5)))
    (d / "newbench.json").write_text(json.dumps({"wall_s": 90, "top1": 97.25, "nested": {"n": 3}}))
    (d / "tabled.json").write_text(json.dumps({"quick": True, "x": 1}))
    (d / "tabled.md").write_text("# Own title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (d / "quantize.json").write_text(json.dumps({"results": {"m": {"accuracy": {}}}}))
    return d


def test_report_has_headlines_sections_and_only_saved_numbers(report, results):
    found = report.read_results(results, prefer_quick=False)
    assert [r.name for r in found] == ["mask_overhead", "newbench", "quantize", "tabled"]
    text = report.assemble(found, failed={"newbench": "exit status 1 after 3 s"})
    head, _, sections = text.partition("\n## ")
    assert "| [mask_overhead](#mask_overhead) | training step with masks enforced in place: " \
           "**1.007x** dense" in head  # the full run, not the quick one
    assert "| [tabled](#tabled) | see [its section](#tabled) | quick |" in head
    assert "(unknown result layout: KeyError" in head  # quantize.json lacks its keys
    assert "| compresspipe masks | 100.7 | 1.007x |" in sections
    assert "\n### Own title\n" in sections and "| 1 | 2 |" in sections  # own tables, nested
    assert "| top1 | 97.25 |" in sections and "| nested.n | 3 |" in sections
    assert "wall time 1.5 min" in sections
    assert "**The last run of this benchmark failed (exit status 1 after 3 s)" in sections
    assert sections.index("newbench") < sections.index("tabled")


def test_quick_results_preferred_when_asked(report, results):
    found = {r.name: r for r in report.read_results(results, prefer_quick=True)}
    assert found["mask_overhead"].quick and found["mask_overhead"].data["rows"][
        "compresspipe masks"]["ratio_vs_dense"] == 1.5
    assert "`python benchmarks/mask_overhead.py --quick`" in report.assemble(list(found.values()))


def test_runs_scripts_with_quick_only_where_they_take_it(report, tmp_path, monkeypatch):
    log = tmp_path / "argv.txt"
    takes = tmp_path / "takes.py"
    takes.write_text(f'import sys\nopen({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + '
                     f'"|")\nif __name__ == "__main__":\n    ap = "--quick"\n')
    plain = tmp_path / "plain.py"
    plain.write_text(f'import sys\nopen({str(log)!r}, "a").write("plain|")\nsys.exit(3)\n')
    monkeypatch.setattr(report, "ROOT", tmp_path)
    failed = report.run_benchmarks([takes, plain], quick=True)
    assert log.read_text() == "--quick|plain|"
    assert list(failed) == ["plain"] and failed["plain"].startswith("exit status 3")


def test_every_benchmark_script_is_found_and_report_is_not(report):
    names = [p.stem for p in report.benchmark_scripts()]
    assert "report" not in names and {"distill", "quantize", "structured"} <= set(names)
    with pytest.raises(SystemExit, match="no benchmark nope"):
        report.benchmark_scripts(["nope"])


def test_cli_writes_the_report(report, results, tmp_path, capsys):
    out = tmp_path / "REPORT.md"
    assert report.main(["--results", str(results), "-o", str(out)]) == 0
    assert out.read_text().startswith("# Benchmark report\n")
    assert report.main(["--results", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "no results" in capsys.readouterr().err


def _arm(mean: float, std: float) -> dict:
    runs = [{"top1": mean, "loss": 0.1, "agreement": 90.0}] * 5
    return {"runs": runs, "top1": {"mean": mean, "std": std}, "loss": {"mean": 0.1, "std": 0.0},
            "agreement": {"mean": 90.0, "std": 0.0}}


def test_distill_section_states_a_verdict_from_the_numbers(report):
    d = {"seeds": [0, 1, 2, 3, 4], "image_size": 16,
         "teacher": {"model": "resnet18", "top1": 99.0},
         "kd": {"temperature": 4.0, "alpha": 0.9, "gamma": 0.1},
         "regimes": {"scarce": {"ce": _arm(86.0, 1.0), "kd": _arm(90.0, 1.0)},
                     "short": {"ce": _arm(96.5, 0.5), "kd": _arm(93.5, 1.5)},
                     "long": {"ce": _arm(98.4, 0.4), "kd": _arm(98.8, 0.4)}},
         "epoch_time_s": {"plain": {"cpu": 1, "wall": 1.0}, "kd": {"cpu": 2, "wall": 2.2},
                          "kd_cached": {"cpu": 1, "wall": 1.1}}}
    text = report.body_distill(d)
    # standard errors: sqrt(2 * 1 / 5) = 0.63, sqrt((0.25 + 2.25) / 5) = 0.71, 0.25
    assert "KD helps in scarce (+4.00 ± 0.63 pt)." in text
    assert "It hurts in short (-3.00 ± 0.71 pt)." in text
    assert "within noise in long (+0.40 ± 0.25 pt)." in text
    assert "2.20x the wall time of a plain one" in text and "1.10x with cached" in text


def test_distill_fashion_mnist_result_gets_the_distill_headline_and_section(report, tmp_path):
    d = {"dataset": "fashion_mnist", "student": "compresspipe.zoo:lenet_300_100", "seeds": [0, 1, 2],
         "image_size": 28, "teacher": {"model": "compresspipe.zoo:lenet_5", "top1": 91.5},
         "kd": {"temperature": 4.0, "alpha": 0.9, "gamma": 0.1},
         "regimes": {"few labels": {"ce": _arm(60.0, 1.0), "kd": _arm(65.0, 1.0)}}}
    (tmp_path / "distill_fashion_mnist.json").write_text(json.dumps(d))
    found = report.read_results(tmp_path, prefer_quick=False)
    text = report.assemble(found)
    head, _, section = text.partition("\n## ")
    assert ("fashion_mnist, compresspipe.zoo:lenet_5 (91.50%) → compresspipe.zoo:lenet_300_100; "
            "KD − plain CE top-1 (pt, mean of 3 seeds): few labels: +5.00") in head
    assert "fashion_mnist 28px; student compresspipe.zoo:lenet_300_100; 3 seeds" in section
    assert "KD helps in few labels (+5.00 ± 0.63 pt)." in section


def test_quantize_fashion_mnist_headline_is_computed_from_its_stats(report):
    def stage(top1: float, std: float, size: float) -> dict:
        return {"test_top1": {"mean": top1, "std": std}, "model_bytes": {"mean": size, "std": 0.0}}
    d = {"model": "compresspipe.zoo:lenet_5", "dataset": "fashion_mnist", "seeds": [0, 1, 2],
         "stats": {"dense": stage(90.5, 0.2, 1_000_000), "ptq": stage(90.4, 0.25, 250_000),
                   "qat": stage(90.6, 0.1, 250_000)}}
    assert report.HEADLINES["quantize_fashion_mnist"](d) == [
        "compresspipe.zoo:lenet_5 on fashion_mnist, test top-1 % of the deployed files (3 seeds): "
        "dense 90.50 ± 0.20, ptq 90.40 ± 0.25, qat 90.60 ± 0.10; int8 file **4.00x** smaller than fp32"]
