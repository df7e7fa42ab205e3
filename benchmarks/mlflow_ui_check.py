"""A pipeline as an MLflow user sees it: start ``mlflow server`` (sqlite backend, proxied
artifacts), run a tiny pipeline against it (dense 1 epoch -> huffman -> export, the final stage
registered with an alias), then ask the server's REST API what the UI asks it: the experiment's
runs, the nested stage runs, their datasets, the logged models with their linked metrics, the
registered version and its alias; finally load ``models:/NAME@ALIAS`` with mlflow.pyfunc from
the server and check its predictions against the reported accuracy.

    .venv/bin/python benchmarks/mlflow_ui_check.py [--keep DIR]

Saves benchmarks/results/mlflow_ui_check.{json,md}; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))
from harness import MlflowServer  # noqa: E402

import compresspipe  # noqa: E402
from compresspipe.core.config import DataConfig  # noqa: E402
from compresspipe.core.data import build_data  # noqa: E402
from compresspipe.tracking.tracker import process_tracking_uri  # noqa: E402

NAME, ALIAS, EXPERIMENT = "ui-check-digits", "champion", "mlflow-ui-check"


def pipeline(out: Path, uri: str) -> dict:
    return {
        "name": "ui_check", "seed": 0, "output_dir": str(out),
        "model": {"name": "test_resnet"},
        "data": {"name": "digits", "image_size": 16, "batch_size": 64},
        "tracking": {"uri": uri, "experiment": EXPERIMENT,
                     "register": {"name": NAME, "alias": ALIAS}},
        "stages": [{"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
                   {"name": "huffman", "huffman": {}},
                   {"name": "export", "export": {"formats": ["onnx"]}}],
    }


class Api:
    """The REST calls the MLflow UI makes (its ``ajax-api`` prefix)."""

    def __init__(self, url: str):
        self.base = f"{url}/ajax-api/2.0/mlflow"

    def get(self, path: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.base}/{path}?{urllib.parse.urlencode(query)}",
                                    timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.base}/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())


def inspect(api: Api, summary: dict) -> dict:
    """What the UI shows, as the server reports it."""
    experiment = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = api.post("runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                    "max_results": 100})["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    parent = by_id[summary["parent_run_id"]]
    nested = [r for r in runs if {"key": "mlflow.parentRunId",
                                  "value": summary["parent_run_id"]} in r["data"].get("tags", [])]

    def datasets(run: dict) -> list[dict]:
        return [{"name": d["dataset"]["name"], "digest": d["dataset"]["digest"],
                 "context": next((t["value"] for t in d.get("tags", [])
                                  if t["key"] == "mlflow.data.context"), None),
                 "rows": json.loads(d["dataset"].get("profile") or "{}").get("num_rows")}
                for d in run.get("inputs", {}).get("dataset_inputs", [])]

    models = api.post("logged-models/search", {"experiment_ids": [experiment["experiment_id"]],
                                               "max_results": 50})["models"]
    version = api.get("registered-models/alias", name=NAME, alias=ALIAS)["model_version"]
    return {
        "experiment": experiment["name"],
        "parent_run": {"name": parent["info"]["run_name"], "datasets": datasets(parent)},
        "stage_runs": [{"name": r["info"]["run_name"], "status": r["info"]["status"],
                        "datasets": datasets(r),
                        "model_outputs": [o["model_id"] for o in
                                          r.get("outputs", {}).get("model_outputs", [])]}
                       for r in sorted(nested, key=lambda r: r["info"]["start_time"])],
        "logged_models": [{"name": m["info"]["name"], "model_id": m["info"]["model_id"],
                           "status": m["info"].get("status"),
                           "source_run_id": m["info"].get("source_run_id"),
                           "lineage": next((t["value"] for t in m["info"].get("tags", [])
                                            if t["key"] == "compresspipe.source_model_id"), None),
                           "metrics": {x["key"]: x["value"] for x in m["data"].get("metrics", [])}}
                          for m in models],
        "registered": {"name": version["name"], "version": version["version"],
                       "aliases": version.get("aliases", []), "source": version["source"],
                       "tags": {t["key"]: t["value"] for t in version.get("tags", [])}},
    }


def checks(seen: dict, summary: dict, served_top1: float) -> dict[str, bool]:
    records = {r["name"]: r for r in summary["stages"][1:]}
    stage_runs = {r["name"]: r for r in seen["stage_runs"]}
    models = {m["model_id"]: m for m in seen["logged_models"]}
    export = records["export"]
    return {
        "nested stage runs, finished": sorted(stage_runs) == sorted(records)
        and all(r["status"] == "FINISHED" for r in stage_runs.values()),
        "pipeline run lists train and test data": {"test", "train"} <= {
            d["context"] for d in seen["parent_run"]["datasets"]},
        "dense run lists train and test, huffman test only":
            {"test", "train"} <= {d["context"] for d in stage_runs["dense"]["datasets"]}
            and [d["context"] for d in stage_runs["huffman"]["datasets"]] == ["test"],
        "one logged model per stage, linked to its run": all(
            stage_runs[n]["model_outputs"] == [r["model_id"]] for n, r in records.items()),
        "logged models list size and accuracy": all(
            abs(models[records[n]["model_id"]]["metrics"].get("test_top1", -1)
                - records[n]["metrics"]["test_top1"]) < 1e-6
            and models[records[n]["model_id"]]["metrics"].get("model_bytes")
            == records[n]["metrics"]["model_bytes"] for n in ("dense", "huffman")),
        "export's ONNX model lists its own bytes and onnxruntime top-1":
            "export_onnx_bytes" in models[export["model_id"]]["metrics"]
            and "export_onnx_top1" in models[export["model_id"]]["metrics"],
        "lineage: each model names the one it came from":
            models[records["huffman"]["model_id"]]["lineage"] == records["dense"]["model_id"]
            and models[export["model_id"]]["lineage"] == records["huffman"]["model_id"],
        "registered version carries the alias and tags": ALIAS in seen["registered"]["aliases"]
            and seen["registered"]["source"] == f"models:/{export['model_id']}"
            and {"ratio", "test_top1", "sparsity", "bits_per_weight", "pipeline", "fingerprint"}
            <= set(seen["registered"]["tags"]),
        "version tags describe the registered ONNX file": float(
            seen["registered"]["tags"]["model_bytes"]) == tag_value(
            models[export["model_id"]]["metrics"]["export_onnx_bytes"]),
        "models:/NAME@ALIAS from the server predicts the reported top-1":
            abs(served_top1 - models[export["model_id"]]["metrics"]["export_onnx_top1"]) < 1e-6,
    }


def tag_value(value: float) -> float:
    """``value`` as a version tag holds it (6 significant digits)."""
    return float(f"{value:.6g}")


def pyfunc_top1(uri: str) -> float:
    """Top-1 on the test split of ``models:/NAME@ALIAS``, loaded through the server."""
    import mlflow.pyfunc  # lazy: after the pipeline's own imports, as a user's script would

    data = build_data(DataConfig(name="digits", image_size=16))
    x = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    y = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    with process_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    out = model.predict(x)
    logits = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
    return 100.0 * float((logits.argmax(1) == y).mean())


def markdown(result: dict) -> str:
    lines = ["| check | result |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in result["checks"].items()]
    lines += ["", "| logged model | model_bytes | test top1 | compression_ratio | source model |",
              "|---|---|---|---|---|"]
    for m in result["seen"]["logged_models"]:
        x = m["metrics"]
        lines.append(f"| {m['name']} | {x.get('model_bytes', x.get('export_onnx_bytes', ''))} "
                     f"| {x.get('test_top1', x.get('export_onnx_top1', ''))} "
                     f"| {x.get('compression_ratio', x.get('export_onnx_compression_ratio', ''))}"
                     f" | {m['lineage'] or '-'} |")
    reg = result["seen"]["registered"]
    lines += ["", f"Registered: `models:/{reg['name']}@{ALIAS}` = version {reg['version']} "
              f"(source `{reg['source']}`), tags {reg['tags']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep the server's store and the run here")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mlflow-ui-check-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with MlflowServer(root) as server:
        up = time.perf_counter() - started
        summary = compresspipe.run(pipeline(root / "out", server.url))
        ran = time.perf_counter() - started - up
        seen = inspect(Api(server.url), summary)
        served_top1 = pyfunc_top1(server.url)
    result = {"seconds": {"server_start": round(up, 1), "pipeline": round(ran, 1),
                          "total": round(time.perf_counter() - started, 1)},
              "note": "one shared 2-core machine; times are for orientation only",
              "pyfunc_top1": served_top1, "seen": seen}
    result["checks"] = checks(seen, summary, served_top1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mlflow_ui_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "mlflow_ui_check.md").write_text(markdown(result))
    print(markdown(result))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
