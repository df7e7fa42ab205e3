"""Run the benchmarks and assemble benchmarks/REPORT.md from the results they saved.

    .venv/bin/python benchmarks/report.py                 # REPORT.md from benchmarks/results/
    .venv/bin/python benchmarks/report.py --run           # run every benchmark first (make bench)
    .venv/bin/python benchmarks/report.py --run --quick   # their --quick variants (make bench-quick)
    .venv/bin/python benchmarks/report.py --run --only distill quantize

A benchmark is every ``benchmarks/*.py`` script with a ``__main__`` block; each saves its numbers
under ``benchmarks/results/`` (``<name>.json``, ``<name>_quick.json`` for quick runs, optionally a
``<name>.md`` of its own tables). This script never measures anything itself: it reads those
files and writes a headline table, then one section per result with the command, the date of
the file, the machine it describes and the benchmark's tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
REPORT = HERE / "REPORT.md"
QUICK = "_quick"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # the Debian package's files


@dataclass
class Result:
    """One benchmark's saved numbers (the quick or the full variant)."""

    name: str
    files: list[Path]
    data: Any = None
    markdown: str | None = None

    @property
    def quick(self) -> bool:
        return self.files[0].stem.endswith(QUICK) or (
            isinstance(self.data, dict) and self.data.get("quick") is True)

    @property
    def measured(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(max(f.stat().st_mtime for f in self.files), dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# Running


def benchmark_scripts(only: list[str] | None = None) -> list[Path]:
    """Scripts under benchmarks/ that run as programs (helpers without ``__main__`` are skipped)."""
    scripts = [p for p in sorted(HERE.glob("*.py")) if p.name != Path(__file__).name
               and re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)]
    if only:
        unknown = sorted(set(only) - {p.stem for p in scripts})
        if unknown:
            raise SystemExit(f"error: no benchmark {', '.join(unknown)} "
                             f"(have: {', '.join(p.stem for p in scripts)})")
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def run_benchmarks(scripts: list[Path], quick: bool) -> dict[str, str]:
    """Run each script in turn from the repository root; return {name: why it failed}."""
    if not FASHION_MNIST.is_dir():  # most benchmarks measure on it: say so before hours of runs
        raise SystemExit(f"error: the benchmarks need Fashion-MNIST in {FASHION_MNIST}: "
                         "apt-get install dataset-fashion-mnist")
    failed = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    for script in scripts:
        flags = ["--quick"] if quick and '"--quick"' in script.read_text() else []
        command = [sys.executable, str(script.relative_to(ROOT)), *flags]
        print(f"\n== {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT, env=env)
        seconds = time.perf_counter() - started
        print(f"== {script.stem}: exit {code} after {seconds:.0f} s", flush=True)
        if code != 0:
            failed[script.stem] = f"exit status {code} after {seconds:.0f} s"
    return failed


# ---------------------------------------------------------------------------------------------
# Reading results


def read_results(results: Path, prefer_quick: bool) -> list[Result]:
    """One Result per benchmark: its full run, or its quick one when that is preferred or the
    only one there is."""
    variants: dict[str, dict[bool, list[Path]]] = {}
    for path in sorted(results.glob("*")):
        if path.suffix not in (".json", ".md"):
            continue
        quick = path.stem.endswith(QUICK)
        name = path.stem.removesuffix(QUICK)
        variants.setdefault(name, {}).setdefault(quick, []).append(path)
    out = []
    for name, by_quick in sorted(variants.items()):
        files = by_quick.get(prefer_quick) or by_quick[not prefer_quick]
        files = sorted(files, key=lambda p: p.suffix != ".json")  # the JSON first
        result = Result(name, files)
        for f in files:
            text = f.read_text(encoding="utf-8")
            if f.suffix == ".json":
                try:
                    result.data = json.loads(text)
                except ValueError as exc:
                    raise SystemExit(f"error: {f}: not valid JSON ({exc})") from None
            else:
                result.markdown = text
        out.append(result)
    return out


# ---------------------------------------------------------------------------------------------
# Per-benchmark views: headline lines and a markdown body, both from the saved numbers only


def _synthetic_headline(m: dict) -> str:
    return (f"synthetic resnet18-sized model, 90% pruned, 16 clusters: .cpz "
            f"**{m['compression_vs_fp32']:.1f}x** smaller than fp32 "
            f"({m['bits_per_weight']:.3f} bits/weight, "
            f"{m['ratio_to_entropy_with_tables']:.4f}x the entropy bound)")


def headline_coding(d: dict) -> list[str]:
    lines = [f"{p['pipeline']} (digits): .cpz **{p['ratio']:.1f}x** smaller than fp32, "
             f"top-1 {p['cpz_top1']:.2f}% ({-p['top1_drop']:+.2f} pt vs dense)"
             for p in d.get("pipelines", [])]
    return lines + [_synthetic_headline(d["synthetic"]["model"])]


def headline_coding_codec(d: dict) -> list[str]:
    return [_synthetic_headline(d["model"])]


def body_coding_codec(d: dict) -> str:
    m, s = d["model"], d["stream"]
    rows = ["| stream | symbols | bits/symbol | entropy bits/symbol | ratio |", "|---|---:|---:|---:|---:|"]
    for key in ("positions_stream", "values_stream"):
        r = m[key]
        rows.append(f"| {key.removesuffix('_stream')} | {r['symbols']:,} | {r['bits_per_symbol']:.4f} "
                    f"| {r['entropy_bits_per_symbol']:.4f} | {r['ratio_to_entropy']:.4f} |")
    b = m["baselines_bytes"]
    rows += ["", "| bytes | .cpz | zlib -9 | zlib huffman-only |", "|---|---:|---:|---:|"]
    for key in ("positions", "values"):
        z = b[f"{key}_stream"]
        rows.append(f"| {key} | {b[f'cpz_{key}_stream']:,} | {z['zlib9']:,} | "
                    f"{z['zlib_huffman_only']:,} |")
    rows += ["", f"Whole model: {m['cpz_bytes']:,} B vs {m['fp32_bytes']:,} B fp32 "
             f"({m['compression_vs_fp32']:.1f}x, {m['bits_per_weight']:.3f} bits/weight). "
             f"A single {s['symbols']:,}-symbol stream decodes at "
             + ", ".join(f"{s[f'group{g}']['decode_symbols_per_second'] / 1e6:.0f} M symbols/s "
                         f"({g} symbol(s) per code)" for g in (1, 2) if f"group{g}" in s) + "."]
    return "\n".join(rows)


def _mean_std(stats: dict) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def headline_distill(d: dict) -> list[str]:
    diffs = "; ".join(f"{name}: {row['kd']['top1']['mean'] - row['ce']['top1']['mean']:+.2f}"
                      for name, row in d["regimes"].items())
    who = (f"{d['dataset']}, {d['teacher']['model']} ({d['teacher']['top1']:.2f}%) → "
           f"{d['student']}; " if d.get("dataset") and d.get("student") else "")
    return [f"{who}KD − plain CE top-1 (pt, mean of {len(d['seeds'])} seeds): {diffs}"]


def body_distill(d: dict) -> str:
    kd = d["kd"]
    rows = [f"Teacher {d['teacher']['model']} top-1 {d['teacher']['top1']:.2f}%; KD T={kd['temperature']:g}, "
            f"α={kd['alpha']:g}, γ={kd['gamma']:g}; {d.get('dataset', 'digits')} {d['image_size']}px; "
            + (f"student {d['student']}; " if d.get("student") else "") +
            f"{len(d['seeds'])} seeds, mean ± std.", "",
            "| regime | CE top-1 % | KD top-1 % | KD − CE | CE loss | KD loss | agreement CE / KD % |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in d["regimes"].items():
        ce, k = row["ce"], row["kd"]
        rows.append(f"| {name} | {_mean_std(ce['top1'])} | {_mean_std(k['top1'])} | "
                    f"{k['top1']['mean'] - ce['top1']['mean']:+.2f} | {ce['loss']['mean']:.3f} | "
                    f"{k['loss']['mean']:.3f} | {ce['agreement']['mean']:.1f} / "
                    f"{k['agreement']['mean']:.1f} |")
    rows += ["", verdict_distill(d)]
    t = d.get("epoch_time_s")
    if t:
        rows += ["", "| student epoch | CPU s | wall s | wall vs plain |", "|---|---:|---:|---:|"]
        for arm, label in (("plain", "plain CE"), ("kd", "KD, teacher every step"),
                           ("kd_cached", "KD, cached teacher logits")):
            rows.append(f"| {label} | {t[arm]['cpu']:.3f} | {t[arm]['wall']:.3f} | "
                        f"{t[arm]['wall'] / t['plain']['wall']:.2f}x |")
    return "\n".join(rows)


def verdict_distill(d: dict) -> str:
    """Does KD help? Per regime, the KD − CE difference of the seed means against its standard
    error (Welch): beyond two standard errors KD helps or hurts, within them it is noise."""
    groups: dict[str, list[str]] = {"helps": [], "hurts": [], "noise": []}
    for name, row in d["regimes"].items():
        ce, kd = row["ce"]["top1"], row["kd"]["top1"]
        n_ce, n_kd = (len(row[arm].get("runs") or d["seeds"]) for arm in ("ce", "kd"))
        diff = kd["mean"] - ce["mean"]
        se = (ce["std"] ** 2 / n_ce + kd["std"] ** 2 / n_kd) ** 0.5
        kind = "helps" if diff > 2 * se else "hurts" if diff < -2 * se else "noise"
        groups[kind].append(f"{name} ({diff:+.2f} ± {se:.2f} pt)")
    said = {"helps": "KD helps in {}.", "hurts": "It hurts in {}.",
            "noise": "The difference is within noise in {}."}
    text = ["**Verdict.**"] + [said[k].format("; ".join(v)) for k, v in groups.items() if v]
    text.append("(± is the standard error of the KD − CE difference of the seed means; helps "
                "and hurts mean beyond two standard errors.)")
    t = d.get("epoch_time_s")
    if t:
        text.append(f"A KD epoch takes {t['kd']['wall'] / t['plain']['wall']:.2f}x the wall time "
                    "of a plain one with the teacher run at every step, "
                    f"{t['kd_cached']['wall'] / t['plain']['wall']:.2f}x with cached teacher "
                    "logits.")
    return " ".join(text)


def headline_mask_overhead(d: dict) -> list[str]:
    r = d["rows"]
    return [f"training step with masks enforced in place: **{r['compresspipe masks']['ratio_vs_dense']:.3f}x** "
            f"dense (torch.nn.utils.prune: {r['torch.nn.utils.prune']['ratio_vs_dense']:.3f}x); "
            f"{d['model']}, batch {d['batch']}, {d['threads']} thread(s)"]


def body_mask_overhead(d: dict) -> str:
    rows = [f"{d['model']}, batch {d['batch']}, {d['threads']} thread(s), median step time.", "",
            "| variant | median step ms | vs dense |", "|---|---:|---:|"]
    rows += [f"| {k} | {r['median_ms']:.1f} | {r['ratio_vs_dense']:.3f}x |" for k, r in d["rows"].items()]
    return "\n".join(rows)


def headline_quantize(d: dict) -> list[str]:
    out = []
    for name, r in d["results"].items():
        a, b, lat = r["accuracy"], r["model_bytes"], r["latency_ms"]
        batch = max(lat, key=lambda k: int(k[1:]))
        t = lat[batch]
        full = r.get("qat_untrimmed_bytes")
        untrimmed = f" ({b['dense'] / full:.2f}x with untrimmed kernels)" if full else ""
        out.append(f"{name} int8 (QAT): top-1 {a['qat']:.2f}% vs {a['dense']:.2f}% fp32, "
                   f"**{b['dense'] / b['qat']:.2f}x** smaller{untrimmed}; latency at batch {batch[1:]} "
                   f"{t['int8_onnxruntime'] / t['fp32_torch']:.2f}x fp32 torch's, "
                   f"{t['int8_onnxruntime'] / t['fp32_onnxruntime']:.2f}x fp32 onnxruntime's; "
                   f"QAT step {r['qat_step']['qat_over_fp32']:.2f}x fp32")
    return out


def headline_quantize_fashion(d: dict) -> list[str]:
    st = d["stats"]
    top1 = ", ".join(f"{k} {_mean_std(st[k]['test_top1'])}" for k in ("dense", "ptq", "qat"))
    return [f"{d['model']} on {d['dataset']}, test top-1 % of the deployed files ({len(d['seeds'])} "
            f"seeds): {top1}; int8 file **{st['dense']['model_bytes']['mean'] / st['qat']['model_bytes']['mean']:.2f}x** "
            "smaller than fp32"]


def body_quantize(d: dict) -> str:
    res = d["results"]
    rows = [f"{d.get('threads', '?')} thread(s); accuracy and bytes of the int8 ONNX files reloaded "
            "from disk. The deployed files drop convolution taps that only ever read padding at "
            "the fixed input size (`compresspipe.compress.quant.conv_taps`: resnet18's layer4 runs 3x3 convs on "
            "1x1 maps at 32 px), which also shrinks them; the fp32 onnxruntime baseline gets the "
            "same trimming, and both are timed untrimmed in brackets.", "",
            "| model | fp32 top-1 | PTQ int8 | QAT int8 | fp32 bytes | int8 bytes (QAT) | "
            "int8 bytes untrimmed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        a, b = r["accuracy"], r["model_bytes"]
        full = r.get("qat_untrimmed_bytes")
        full_text = f"{full:,} ({b['dense'] / full:.2f}x)" if full else "—"
        rows.append(f"| {name} | {a['dense']:.2f} | {a['ptq']:.2f} | {a['qat']:.2f} | "
                    f"{b['dense']:,} | {b['qat']:,} ({b['dense'] / b['qat']:.2f}x) | "
                    f"{full_text} |")
    rows += ["", "| model | batch | fp32 torch ms | fp32 onnxruntime ms | int8 onnxruntime ms | "
             "int8 / fp32 torch | int8 / fp32 onnxruntime |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        for batch, t in r["latency_ms"].items():
            untrimmed = "fp32_onnxruntime_untrimmed" in t

            def ms(key: str, t=t, untrimmed=untrimmed) -> str:
                return (f"{t[key]:.3f} ({t[key + '_untrimmed']:.3f})" if untrimmed
                        else f"{t[key]:.3f}")

            ratio = t["int8_onnxruntime"] / t["fp32_onnxruntime"]
            full = (f" ({t['int8_onnxruntime_untrimmed'] / t['fp32_onnxruntime_untrimmed']:.2f}x)"
                    if untrimmed else "")
            rows.append(f"| {name} | {batch[1:]} | {t['fp32_torch']:.3f} | "
                        f"{ms('fp32_onnxruntime')} | {ms('int8_onnxruntime')} | "
                        f"{t['int8_onnxruntime'] / t['fp32_torch']:.2f}x | {ratio:.2f}x{full} |")
    large = {k: r["large_input_latency"] for k, r in res.items() if "large_input_latency" in r}
    if large:
        side = next(iter(large.values()))["input"][2]
        rows += ["", f"Timing only, batch 8 of 3x{side}x{side} (untrained weights):", "",
                 "| model | fp32 onnxruntime ms | int8 onnxruntime ms | int8 / fp32 |",
                 "|---|---:|---:|---:|"]
        rows += [f"| {k} | {t['fp32_onnxruntime']:.1f} | {t['int8_onnxruntime']:.1f} | "
                 f"{t['int8_over_fp32_onnxruntime']:.2f}x |" for k, t in large.items()]
    rows += ["", "| model | fp32 step ms | QAT step ms | QAT / fp32 | with torchao's fused "
             "fake-quant kernels |", "|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        q = r["qat_step"]
        fused = (f"{q['qat_torchao_fused_step_ms']:.1f} ({q['qat_torchao_fused_over_fp32']:.2f}x)"
                 if "qat_torchao_fused_step_ms" in q else "—")
        rows.append(f"| {name} | {q['fp32_step_ms']:.1f} | {q['qat_step_ms']:.1f} | "
                    f"{q['qat_over_fp32']:.2f}x | {fused} |")
    targets = [f"{name}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["targets"].items())
               for name, r in res.items() if "targets" in r]
    if targets:
        rows += ["", "Targets (issue 6):", ""] + [f"- {t}" for t in targets]
    sharing = [(name, row) for name, r in res.items() for row in r.get("weight_sharing", [])]
    if sharing:
        rows += ["", "| model | conv/linear bits | fp32 | before fine-tuning | after | "
                 "codebook file bytes |", "|---|---|---:|---:|---:|---:|"]
        rows += [f"| {name} | {row['bits']} | {row['fp32_top1']:.2f} | "
                 f"{row['top1_before_finetune']:.2f} | {row['top1_after_finetune']:.2f} | "
                 f"{row['codebook_file_bytes']:,} |" for name, row in sharing]
    return "\n".join(rows)


def headline_structured(d: dict) -> list[str]:
    two = [r for r in d["speedups"] if r["macs_reduction_target"] == 2 and r["scope"] == "global"]
    out = ["2x fewer MACs (L1, global) → CPU speed-up at batch 1 / 32: " + ", ".join(
        f"{r['family']} {r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x" for r in two)]
    pas = {}
    for r in d.get("pas_vs_uniform_l1", []):
        pas.setdefault(r["method"], []).append(r["top1"])
    if pas:
        seeds = max(len(v) for v in pas.values())
        out.append("same MACs budget (2x), top-1 mean of " + f"{seeds} seeds: " + " vs ".join(
            f"{m} {statistics.mean(v):.2f}%" for m, v in pas.items()))
    return out


def headline_support_matrix(d: dict) -> list[str]:
    families = d["families"]
    out = [f"{chain} chain complete on {len(done)} of {len(families)} families"
           for chain, done in d["chains_complete"].items()]
    timed = [e["validate"]["seconds"] for e in families.values() if e.get("validate")]
    if timed:
        per_file = all("per_file" in e["validate"] for e in families.values() if e.get("validate"))
        out.append(f"`compresspipe validate` ≤ {max(timed):.0f} s "
                   + ("per file (slowest of each family's 3, each in a fresh process; target "
                      f"≤ 30 s: {'met' if max(timed) <= 30 else 'MISSED'})" if per_file
                      else "per family (3 files together)"))
    return out


def headline_pruning_methods(d: list) -> list[str]:
    """The literature's claims at the highest sparsity where pruned-and-retrained nets still work."""
    mean = {(r["method"], r["sparsity"]): statistics.mean(
        x["top1"] for x in r["runs"] if x["top1"] is not None) for r in d}
    usable = [s for (m, s), v in mean.items() if m == "IMP+ALLR" and v >= 90]
    if not usable:
        return ["see its section"]
    s = max(usable)
    pairs = [("LTH (late rewind)", "LTH random re-init control"), ("IMP+ALLR", "IMP+FT"),
             ("IMP+LRW", "IMP+FT"), ("SynFlow at init", "IMP+LRW")]
    return [f"at {s:.0%} sparsity, top-1 mean of seeds: " + "; ".join(
        f"{a} {mean[a, s]:.2f}% vs {b} {mean[b, s]:.2f}%" for a, b in pairs
        if (a, s) in mean and (b, s) in mean)]


def headline_seed_claims(d: dict) -> list[str]:
    """Each seed paper's claim and its verdict from the numbers."""
    return [f"{c['claim']} at {c['sparsity']:.2%}: {c['verdict']} ({c['a']} "
            f"{c['mean_a']:.2f} vs {c['b']} {c['mean_b']:.2f} layers emptied)"
            if c.get("metric") == "collapsed_layers" else
            f"{c['claim']}: {c['verdict']} ({c['diff']:+.2f} ± {c['se']:.2f} pt)"
            for c in d["claims"]]


def headline_deep_compression_lenet(d: dict) -> list[str]:
    out = []
    for model, rows in d["runs"].items():
        losses = [r["dense_top1"] - r["cpz_top1"] for r in rows]
        out.append(f"{model} ({len(rows)} seed{'s' * (len(rows) > 1)}): .cpz "
                   f"{statistics.mean(r['ratio_cpz'] for r in rows):.1f}× "
                   f"(pruned {statistics.mean(r['ratio_pruned'] for r in rows):.1f}×, + quant. "
                   f"{statistics.mean(r['ratio_quantized'] for r in rows):.1f}×) at "
                   f"{statistics.mean(losses):+.2f} pt top-1 loss (worst seed "
                   f"{max(losses):+.2f}) on Fashion-MNIST; paper 40× / 39× on MNIST")
    return out


def headline_soak(d: dict) -> list[str]:
    c, k, f = d["concurrent"], d["kills"], d["fuzz"]
    cases = sum(r["cases"] for r in f.values())
    bad = sum(r["crashes"] + r["hangs"] + r["over_memory"] + r["worker_deaths"] for r in f.values())
    return [f"**{'PASS' if d['passed'] else 'FAIL'}**: {c['completed']}/{c['pipelines']} pipelines "
            f"at once on one mlflow server; {k['identical']}/{k['rounds']} SIGKILL + --resume "
            f"rounds identical; {cases:,} fuzzed inputs over {len(f)} readers, {bad} crashes, "
            "hangs or memory overruns"]


def headline_mlflow_ui_check(d: dict) -> list[str]:
    failed = [k for k, ok in d["checks"].items() if not ok]
    return [f"**{'PASS' if not failed else 'FAIL'}**: {len(d['checks']) - len(failed)}/"
            f"{len(d['checks'])} checks of what the MLflow UI shows (runs, datasets, a logged "
            "model per stage, registered version and alias, pyfunc from the server)"
            + (f"; failed: {', '.join(failed)}" if failed else "")]


def headline_search(d: dict) -> list[str]:
    h, b = d["hand_written"], d["searched"]["best"]
    if not b:
        return [f"**MISSED**: no searched trial within {d['max_drop']} pt validation drop"]
    return [f"**{'met' if d['target_met'] else 'MISSED'}**: searched .cpz {b['bytes']:,} B vs "
            f"hand-written {h['bytes']:,} B = {d['ratio']:.2f}× smaller at "
            f"{b['val_top1_drop']:.2f} pt validation drop (target ≥ 1.5× at ≤ {d['max_drop']} pt), "
            f"LeNet-300-100 on Fashion-MNIST, {d['searched']['trials_started']} trials run"]


def headline_footprint(d: dict) -> list[str]:
    out = []
    if d.get("quickstart"):
        q = d["quickstart"]
        out.append(f"quickstart {q['total_du'] / 1e6:.1f} MB on disk, MLflow and cache included "
                   f"(target ≤ 200 MB: {'met' if q['met'] else 'MISSED'})")
    if d.get("search"):
        s = d["search"]
        out.append(f"{s['trials']}-trial search {s['ratio']:.2f}× one run (target ≤ 3×: "
                   f"{'met' if s['met'] else 'MISSED'})")
    return out


def headline_quickstart_target(d: dict) -> list[str]:
    runs = d["runs"]
    return [f"quickstart ≥ {d['target']['ratio']:.0f}× at ≤ {d['target']['loss_pt']} pt: "
            f"**{'met' if d['met'] else 'MISSED'}** on {len(runs)} seed(s) ("
            + "; ".join(f"seed {r['seed']}: {r['ratio']:.1f}× at {r['loss_pt']:+.2f} pt"
                        for r in runs) + ")"]


def headline_quickstart_target_fashion(d: dict) -> list[str]:
    return [line.replace("quickstart", "quickstart pipeline on Fashion-MNIST (resnet18, 28 px)", 1)
            for line in headline_quickstart_target(d)]


def headline_dsd(d: dict) -> list[str]:
    """DSD's claim and the two questions that explain its verdict, per regime."""
    return [f"DSD, {c['regime']} regime, {c['question']}: {c['verdict']} "
            f"({c['diff']:+.2f} ± {c['se']:.2f} pt)" for c in d["verdicts"]]


def headline_uniform_vs_kmeans(d: dict) -> list[str]:
    """Per seed, the smallest uniform file at least as accurate (validation) as k-means'."""
    found = [v for v in d["verdicts"] if v["uniform"]]
    return [f"uniform vs k-means 6 bit (LeNet-300-100, Fashion-MNIST, same chain): a uniform "
            f"file at ≥ k-means' validation top-1 and ≤ its loss on {len(found)} of {len(d['verdicts'])} "
            "seeds" + (" (" + "; ".join(f"seed {v['seed']}: {v['uniform']}, {v['ratio']:.3f}× "
                                        "the bytes" for v in found) + ")" if found else "")]


HEADLINES: dict[str, Callable[[Any], list[str]]] = {
    "search": headline_search, "footprint": headline_footprint,
    "coding": headline_coding, "coding_codec": headline_coding_codec,
    "distill": headline_distill, "distill_fashion_mnist": headline_distill,
    "mask_overhead": headline_mask_overhead,
    "quantize": headline_quantize, "quantize_fashion_mnist": headline_quantize_fashion,
    "structured": headline_structured,
    "pruning_methods": headline_pruning_methods, "soak": headline_soak,
    "mlflow_ui_check": headline_mlflow_ui_check, "support_matrix": headline_support_matrix,
    "seed_claims_fashion_mnist": headline_seed_claims,
    "pas_vs_uniform_fashion_mnist_2x": headline_seed_claims,
    "pas_vs_uniform_fashion_mnist_4x": headline_seed_claims,
    "deep_compression_lenet": headline_deep_compression_lenet,
    "quickstart_target": headline_quickstart_target,
    "quickstart_target_fashion_mnist": headline_quickstart_target_fashion,
    "dsd_fashion_mnist": headline_dsd,
    "uniform_vs_kmeans": headline_uniform_vs_kmeans,
}
BODIES: dict[str, Callable[[Any], str]] = {
    "coding_codec": body_coding_codec, "distill": body_distill, "distill_fashion_mnist": body_distill,
    "mask_overhead": body_mask_overhead, "quantize": body_quantize,
}


def generic_body(data: Any, limit: int = 40) -> str:
    """The scalar numbers of an unknown result file, as a two-column table."""
    rows = ["| value | |", "|---|---:|"]
    flat = list(_scalars(data))
    for key, value in flat[:limit]:
        rows.append(f"| {key} | {value:,.4g} |" if isinstance(value, float)
                    else f"| {key} | {value} |")
    if len(flat) > limit:
        rows.append(f"| … {len(flat) - limit} more in the JSON file | |")
    return "\n".join(rows)


def _scalars(data: Any, prefix: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _scalars(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _scalars(v, f"{prefix}[{i}]")
    elif isinstance(data, int | float | str | bool) or data is None:
        yield prefix, data


def demote(markdown: str, levels: int = 2) -> str:
    """A benchmark's own markdown nested under its section: headings moved down."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", markdown,
                  flags=re.M).strip()


# a benchmark that changed its result layout must not take the whole report down
LAYOUT_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError,
                 statistics.StatisticsError)


def body(result: Result) -> str:
    if result.markdown:
        return demote(result.markdown)
    if isinstance(result.data, dict) and isinstance(result.data.get("table"), str):
        return result.data["table"]  # the benchmark's own tables
    if result.name in BODIES:
        try:
            return BODIES[result.name](result.data)
        except LAYOUT_ERRORS as exc:
            return (f"(this report does not know the layout of this file: "
                    f"{type(exc).__name__} {exc}; its numbers as saved:)\n\n"
                    + generic_body(result.data))
    return generic_body(result.data)


def headlines(result: Result) -> list[str]:
    if result.name in HEADLINES and result.data is not None:
        try:
            return HEADLINES[result.name](result.data)
        except LAYOUT_ERRORS as exc:
            return [f"(unknown result layout: {type(exc).__name__} {exc}; see its section)"]
    return [f"see [its section](#{anchor(result.name)})"]


def machine_of(data: Any) -> str:
    """What a result file says about where it ran (keys differ between benchmarks)."""
    if not isinstance(data, dict):
        return "not recorded"
    parts = []
    for key in ("machine", "environment", "platform", "processor", "torch", "threads", "cpus"):
        value = data.get(key)
        if isinstance(value, dict):
            parts += [f"{k} {v}" for k, v in value.items() if v not in (None, "", False)]
        elif value not in (None, "", False):
            parts.append(f"{key} {value}" if key in ("torch", "threads", "cpus") else str(value))
    return ", ".join(dict.fromkeys(parts)) or "not recorded"


def seconds_of(data: Any) -> float | None:
    """The wall time a result file records, if it does."""
    if isinstance(data, dict):
        for key in ("wall_time_s", "wall_s", "seconds"):
            if isinstance(data.get(key), int | float):
                return float(data[key])
    return None


def wall_of(data: Any) -> str:
    seconds = seconds_of(data)
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", name.lower().replace(" ", "-"))


def this_machine() -> str:
    versions = []
    for package in ("torch", "timm", "onnxruntime", "numpy"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, " + ", ".join(versions))


# ---------------------------------------------------------------------------------------------
# Assembling


def assemble(results: list[Result], failed: dict[str, str] | None = None,
             now: dt.datetime | None = None) -> str:
    """REPORT.md text: headline table, then one section per benchmark."""
    failed = failed or {}
    now = now or dt.datetime.now(dt.timezone.utc)
    recorded = [s for r in results if (s := seconds_of(r.data)) is not None]
    lines = ["# Benchmark report", "",
             f"Assembled {now:%Y-%m-%d %H:%M} UTC by `python benchmarks/report.py` from "
             "`benchmarks/results/` (nothing is measured by the report itself). "
             "Regenerate: `make bench` (runs every benchmark in full; the "
             f"{len(recorded)} runs here that record their wall time took "
             f"{sum(recorded) / 60:.0f} min), `make bench-quick` (their `--quick` variants) or "
             "`make bench-report` (only this file).",
             "", f"Assembled on: {this_machine()}. Each section names the machine its numbers "
             "come from and the time its result file was written.", "",
             "| benchmark | headline (see its section for the set-up) | run | measured |",
             "|---|---|---|---|"]
    for r in results:
        kind = "quick" if r.quick else "full"
        for i, text in enumerate(headlines(r)):
            first = i == 0
            lines.append(f"| {f'[{r.name}](#{anchor(r.name)})' if first else ''} | {text} | "
                         f"{kind if first else ''} | {f'{r.measured:%Y-%m-%d}' if first else ''} |")
    missing = [s.stem for s in benchmark_scripts() if s.stem not in {r.name for r in results}]
    if missing:
        lines += ["", "No results yet from: " + ", ".join(f"`benchmarks/{m}.py`" for m in missing)
                  + "."]
    for r in results:
        script = HERE / f"{r.name}.py"
        recorded = r.data.get("command") if isinstance(r.data, dict) else None
        command = f"`{recorded}`" if isinstance(recorded, str) else (f"`python benchmarks/{r.name}.py{' --quick' if r.quick and r.files[0].stem.endswith(QUICK) else ''}`"
                   if script.is_file() else "(no script of this name)")
        lines += ["", f"## {r.name}", "",
                  f"{command} — {'quick' if r.quick else 'full'} run; result written "
                  f"{r.measured:%Y-%m-%d %H:%M} UTC; wall time {wall_of(r.data)}; machine: "
                  f"{machine_of(r.data)}. Files: "
                  + ", ".join(f"`{_shown(f)}`" for f in r.files) + "."]
        if r.name in failed:
            lines += ["", f"**The last run of this benchmark failed ({failed[r.name]}); "
                      "the numbers below are from an earlier run.**"]
        lines += ["", body(r)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the benchmarks first")
    parser.add_argument("--quick", action="store_true",
                        help="with --run: pass --quick to benchmarks that have it; report the "
                        "quick results where both exist")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="with --run: only these")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("-o", "--output", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    failed = run_benchmarks(benchmark_scripts(args.only), args.quick) if args.run else {}
    results = read_results(args.results, prefer_quick=args.quick)
    if not results:
        print(f"error: no results in {args.results}; run make bench", file=sys.stderr)
        return 2
    args.output.write_text(assemble(results, failed), encoding="utf-8")
    print(f"wrote {args.output} ({len(results)} benchmarks)")
    for name, why in failed.items():
        print(f"error: benchmark {name} failed: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
