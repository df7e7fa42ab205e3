"""Disk footprint of a pipeline run, MLflow included, and of a 20-trial search against one run.

1. The embedded quickstart (resnet18 on digits; dense -> IMP prune -> cluster -> huffman ->
   export, MLflow on its default sqlite store, the registered model) into a temporary
   directory, one torch thread. Reported: bytes on disk (``du``: allocated blocks) and apparent
   bytes of the output directory (stage directories, mlflow.db, MLflow's artifact store split
   into run artifacts and logged models) and of the stage cache beside it (tensor store
   objects, cache entries). Target: everything <= 200 MB.
2. A tiny search: LeNet-300-100 on digits 8x8 (dense 3 epochs -> one-shot prune to 90 % ->
   cluster -> huffman, MLflow on), 20 TPE trials over the cluster stage's linear bits (2..8),
   every trial an MLflow child run; against one run of the same pipeline (its own directory
   and cache). Reported: the ratio of their footprints (output directory + cache).
   Target: <= 3x.

The machine is shared (2 cores, several agents): the wall times printed are indicative only.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/footprint.py [--skip-quickstart]
Saves benchmarks/results/footprint.json and footprint.md (a partial run: footprint_partial.*).
``--skip-quickstart --update`` measures the search only and writes it into footprint.json/md,
keeping the quickstart's numbers from the last full run (the file says so) and quoting the
search numbers it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1e6
QUICKSTART_TARGET = 200 * MB
SEARCH_TARGET = 3.0
TRIALS = 20


def usage(*paths: Path) -> dict[str, int]:
    """{'du': allocated bytes, 'bytes': apparent bytes, 'files': count} under ``paths``
    (hard links counted once, as one du over all of them does: the cache's entries are hard
    links to the run's stage files)."""
    seen: set[tuple[int, int]] = set()
    du = apparent = files = 0
    for path in (p for p in paths if p.exists()):
        for p in [path, *path.rglob("*")]:
            st = p.lstat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            du += st.st_blocks * 512
            if p.is_file() and not p.is_symlink():
                apparent += st.st_size
                files += 1
    return {"du": du, "bytes": apparent, "files": files}


def mlflow_parts(out: Path) -> dict[str, dict[str, int]]:
    """MLflow's artifact store split into logged models and run artifacts, by stage name where
    the logged model says it."""
    parts: dict[str, dict[str, int]] = {}
    root = out / "mlartifacts"  # <run id>/artifacts/... and models/<model id>/artifacts/...
    if not root.is_dir():
        return parts
    for model in sorted((root / "models").glob("*")):
        key = f"mlflow logged model: {_model_stage(out, model.name)}"
        parts[key] = _add(parts.get(key), usage(model))
    for run in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "models"):
        parts["mlflow run artifacts"] = _add(parts.get("mlflow run artifacts"), usage(run))
    return parts


def _add(a: dict[str, int] | None, b: dict[str, int]) -> dict[str, int]:
    return b if a is None else {k: a[k] + b[k] for k in b}


def _model_stage(out: Path, model_id: str) -> str:
    """The stage a logged model belongs to, from the run's or the trials' summaries (the
    export stage's ONNX model is not in them: its MLmodel says onnx)."""
    for summary in [out / "summary.json", *sorted(out.glob("trials/*/summary.json"))]:
        if not summary.is_file():
            continue
        for record in json.loads(summary.read_text()).get("stages", []):
            if record.get("model_id") == model_id:
                return record["name"]
    mlmodel = out / "mlartifacts" / "models" / model_id / "artifacts" / "MLmodel"
    if mlmodel.is_file() and "onnx:" in mlmodel.read_text():
        return "export (onnx)"
    return "other"


def breakdown(out: Path, cache: Path) -> dict:
    """Every place a run wrote to, and the totals."""
    rows: dict[str, dict[str, int]] = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "mlartifacts"):
        rows[f"output: {d.name}/"] = usage(d)
    for f in sorted(p for p in out.iterdir() if p.is_file()):
        rows[f"output: {f.name}"] = usage(f)
    rows.update(mlflow_parts(out))
    rows["cache: tensor store objects"] = usage(cache / "objects")
    rows["cache: entries"] = usage(cache / "entries")
    rest = usage(cache)
    for key in ("cache: tensor store objects", "cache: entries"):
        rest = {k: rest[k] - rows[key][k] for k in rest}
    rows["cache: other"] = rest
    total = usage(out, cache)
    return {"rows": rows, "output_dir": usage(out), "cache": usage(cache),
            "mlflow_artifacts": usage(out / "mlartifacts"),
            "total_du": total["du"], "total_bytes": total["bytes"]}


def quickstart(work: Path) -> dict:
    import compresspipe

    cfg = yaml.safe_load((resources.files("compresspipe") / "pipelines" / "quickstart.yaml")
                         .read_text())
    out = work / "runs" / "quickstart"
    cfg["output_dir"] = str(out)
    started = time.perf_counter()
    summary = compresspipe.run(cfg)
    wall = time.perf_counter() - started
    res = breakdown(out, work / "runs" / ".compresspipe-cache")
    res.update(wall_s=wall, final_model_bytes=summary["stages"][-1]["metrics"]["model_bytes"],
               met=res["total_du"] <= QUICKSTART_TARGET)
    return res


def tiny_pipeline(out: Path, cache: Path) -> dict:
    return {"name": "tiny", "seed": 0, "output_dir": str(out), "cache": {"dir": str(cache)},
            "model": {"factory": "compresspipe.zoo:lenet_300_100", "kwargs": {"image_size": 8}},
            "data": {"name": "digits", "image_size": 8, "batch_size": 64},
            "tracking": {"experiment": "footprint-tiny"},
            "stages": [
                {"name": "dense", "train": {"epochs": 3, "lr": 0.05}},
                {"name": "prune", "prune": {"method": "oneshot", "sparsity": 0.9,
                                            "train": {"epochs": 1, "lr": 0.01}}},
                {"name": "cluster", "cluster": {"linear_bits": 5, "finetune": {"epochs": 1}}},
                {"name": "huffman", "huffman": {}}]}


def search_ratio(work: Path) -> dict:
    import compresspipe
    from compresspipe.pipeline.loader import load_pipeline
    from compresspipe.pipeline.search import run_search

    one_out, one_cache = work / "one" / "run", work / "one" / "cache"
    started = time.perf_counter()
    compresspipe.run(tiny_pipeline(one_out, one_cache))
    one_wall = time.perf_counter() - started
    cfg = tiny_pipeline(work / "search" / "run", work / "search" / "cache")
    cfg["search"] = {"parameters": {"stages.cluster.cluster.linear_bits": {
        "choices": [2, 3, 4, 5, 6, 7, 8]}},
        "objective": {"kind": "min_bytes", "max_val_top1_drop": 100},
        "budget": {"trials": TRIALS}, "sampler": "tpe", "prune_margin_pt": None}
    started = time.perf_counter()
    result = run_search(load_pipeline(cfg, check_model=False))
    search_wall = time.perf_counter() - started
    one = breakdown(one_out, one_cache)
    srch = breakdown(work / "search" / "run", work / "search" / "cache")
    srch["trials_dirs"] = usage(work / "search" / "run" / "trials")
    ratio = srch["total_du"] / one["total_du"]
    return {"one_run": one, "search": srch, "ratio": ratio, "met": ratio <= SEARCH_TARGET,
            "trials": TRIALS, "stage_runs_executed": result["stage_runs_executed"],
            "one_wall_s": one_wall, "search_wall_s": search_wall}


def before_summary(res: dict) -> dict:
    """The totals of an earlier measurement and its rows (MB on disk)."""
    q, s = res.get("quickstart") or {}, res.get("search") or {}
    return {"command": res.get("command"), "quickstart_du": q.get("total_du"),
            "quickstart_rows": {k: v["du"] for k, v in q.get("rows", {}).items()},
            "search_du": (s.get("search") or {}).get("total_du"),
            "one_run_du": (s.get("one_run") or {}).get("total_du"), "ratio": s.get("ratio")}


def updated(res: dict, previous: dict) -> dict:
    """``res`` (a search-only run) with the quickstart part of ``previous`` (the last full
    run's results), which it says it kept, and the search numbers it replaces."""
    res = {**res, "quickstart": previous.get("quickstart"),
           "before": res.get("before") or previous.get("before")}
    res["quickstart_from"] = previous.get("quickstart_from") or previous.get("command")
    old = previous.get("search") or {}
    res["search_before"] = {"command": previous.get("search_command") or previous.get("command"),
                            "ratio": old.get("ratio"),
                            "search_du": (old.get("search") or {}).get("total_du"),
                            "one_run_du": (old.get("one_run") or {}).get("total_du"),
                            "rows": {k: v["du"] for k, v in
                                     (old.get("search") or {}).get("rows", {}).items()}}
    res["search_command"] = res["command"]
    return res


def markdown(res: dict) -> str:
    lines = []
    if res.get("quickstart_from"):
        lines += [f"The quickstart part is from the last full run (`{res['quickstart_from']}`); "
                  f"the search part from `{res['search_command']}`.", ""]
    b = res.get("before")
    if b:
        lines += [f"Before (`{b['command']}`): quickstart {b['quickstart_du'] / MB:.1f} MB; "
                  f"search {b['search_du'] / MB:.2f} MB vs one run {b['one_run_du'] / MB:.2f} MB "
                  f"= {b['ratio']:.2f}x.", ""]
    q = res.get("quickstart")
    if q:
        lines += [f"Quickstart (resnet18 on digits, MLflow on, 1 torch thread, shared machine; "
                  f"final .cpz {q['final_model_bytes']:,} B; wall {q['wall_s']:.0f} s): "
                  f"**{q['total_du'] / MB:.1f} MB** on disk (output directory + stage cache; "
                  f"{q['total_bytes'] / MB:.1f} MB apparent; a file hard-linked into both "
                  f"counted once). Target <= 200 MB: "
                  f"{'met' if q['met'] else 'MISSED'}.", "",
                  "| where | MB on disk | MB apparent | files | before: MB on disk |",
                  "|---|---:|---:|---:|---:|"]
        before_rows = (b or {}).get("quickstart_rows", {})
        for key in dict.fromkeys([*q["rows"], *before_rows]):
            u = q["rows"].get(key, {"du": 0, "bytes": 0, "files": 0})
            was = before_rows.get(key)
            lines.append(f"| {key} | {u['du'] / MB:.2f} | {u['bytes'] / MB:.2f} | {u['files']} | "
                         f"{'' if was is None else f'{was / MB:.2f}'} |")
        lines += [f"| **output directory** | {q['output_dir']['du'] / MB:.2f} | "
                  f"{q['output_dir']['bytes'] / MB:.2f} | {q['output_dir']['files']} | |",
                  f"| of which MLflow artifacts | {q['mlflow_artifacts']['du'] / MB:.2f} | "
                  f"{q['mlflow_artifacts']['bytes'] / MB:.2f} | "
                  f"{q['mlflow_artifacts']['files']} | |",
                  f"| **cache** | {q['cache']['du'] / MB:.2f} | {q['cache']['bytes'] / MB:.2f} | "
                  f"{q['cache']['files']} | |", ""]
    s = res.get("search")
    if s:
        one, srch = s["one_run"], s["search"]
        lines += [f"Search footprint: LeNet-300-100 on digits 8x8, {s['trials']} TPE trials over "
                  f"the cluster stage's linear bits (2..8) after one fixed prune, MLflow on: "
                  f"{srch['total_du'] / MB:.2f} MB against one run's {one['total_du'] / MB:.2f} "
                  f"MB = **{s['ratio']:.2f}x** (target <= {SEARCH_TARGET}x: "
                  f"{'met' if s['met'] else 'MISSED'}; apparent bytes "
                  f"{srch['total_bytes'] / one['total_bytes']:.2f}x: the rest is 4 KB blocks of "
                  f"small files and directories); {s['stage_runs_executed']} stage runs "
                  f"executed of {5 * s['trials']}; wall {s['search_wall_s']:.0f} s vs "
                  f"{s['one_wall_s']:.0f} s."
                  ]
        sb = res.get("search_before")
        if sb:
            lines[-1] += (f" Before (`{sb['command']}`): {sb['search_du'] / MB:.2f} MB vs "
                          f"{sb['one_run_du'] / MB:.2f} MB = {sb['ratio']:.2f}x.")
        lines += ["", "| where | one run MB | search MB |" + (" before: search MB |" if sb else ""),
                  "|---|---:|---:|" + ("---:|" if sb else "")]
        before_rows = (sb or {}).get("rows", {})
        keys = list(dict.fromkeys([*one["rows"], *srch["rows"], *before_rows]))
        for key in keys:
            a, b = one["rows"].get(key), srch["rows"].get(key)
            if key.startswith("mlflow logged model") and b is None and key not in before_rows:
                continue
            was = before_rows.get(key)
            lines.append(f"| {key} | {a['du'] / MB if a else 0:.2f} | "
                         f"{b['du'] / MB if b else 0:.2f} |" +
                         (f" {'' if was is None else f'{was / MB:.2f}'} |" if sb else ""))
        models = [u["du"] for k, u in srch["rows"].items() if k.startswith("mlflow logged model")]
        lines.append(f"| (search: {len(models)} logged models with files, summed above per stage) | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-quickstart", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--update", action="store_true", help="with --skip-quickstart: write the "
                   "search into footprint.json/md, keeping the last full run's quickstart part")
    p.add_argument("--before", help="results JSON of the same measurement on an earlier tree, "
                   "quoted beside this one")
    args = p.parse_args()
    if args.tables_only:
        res = json.loads((RESULTS / "footprint.json").read_text())
        (RESULTS / "footprint.md").write_text(markdown(res) + "\n")
        print(markdown(res))
        return 0
    torch.set_num_threads(1)
    os.environ.pop("COMPRESSPIPE_CACHE_DIR", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = Path(args.keep or tempfile.mkdtemp(prefix="footprint-"))
    res: dict = {"benchmark": "footprint",
                 "command": "python benchmarks/footprint.py " + " ".join(sys.argv[1:]),
                 "machine": f"{platform.processor() or platform.machine()}, shared, "
                 "1 torch thread", "torch": torch.__version__}
    if not args.skip_quickstart:
        res["quickstart"] = quickstart(work / "quickstart")
    if not args.skip_search:
        res["search"] = search_ratio(work / "search")
    if args.before:
        res["before"] = before_summary(json.loads(Path(args.before).read_text()))
    RESULTS.mkdir(exist_ok=True)
    name = "footprint" if not (args.skip_quickstart or args.skip_search) else "footprint_partial"
    if args.update and args.skip_quickstart and not args.skip_search:
        res = updated(res, json.loads((RESULTS / "footprint.json").read_text()))
        name = "footprint"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
