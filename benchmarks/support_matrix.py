"""Model support matrix: which stage types complete on which timm family (tiny settings, digits).

For every family, a tiny variant (timm's ``test_*`` models where they exist, the smallest
published width otherwise) runs three pipelines with ``compresspipe.run``, each visiting several
stage types, so that every stage type is exercised once per family:

    int8: train -> prune (80%) -> qat -> export (the int8 ONNX file)
    structured: train -> channel_prune (2x fewer MACs) -> cluster (4 bit) -> huffman -> export
                (.cpz and ONNX, each checked by its consumer in a fresh process)
    more: train -> distill -> pas (2x fewer MACs) -> ptq -> export (and ptq -> export alone
          when pas stopped the chain)

Training is one epoch on 256 digits images; the point is that every stage runs and every
written file loads, not accuracy. A cell is "ok" when its stage completed, otherwise the
stage's error (or "not reached" after an earlier stage failed). Each pipeline runs in its own
process with a time limit; ``compresspipe validate`` of each file is timed in its own process.
Results merge into benchmarks/results/support_matrix.json (``--families`` re-runs
some), and ``python -m compresspipe.pipeline.docs`` renders the README's "Model support" table
from that file. tests/test_support_matrix.py keeps the structural part of it true in CI.

Run: .venv/bin/python benchmarks/support_matrix.py [--quick] [--families resnet vit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULT_FILE = RESULTS / "support_matrix.json"

# family label -> (timm model, kwargs, image size)
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "resnet": ("test_resnet", {}, 32),
    "resnext": ("resnext26ts", {}, 32),
    "regnet": ("regnetx_002", {}, 32),
    "mobilenetv2": ("mobilenetv2_050", {}, 32),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),
    "mobilenetv4": ("mobilenetv4_conv_small_035", {}, 32),
    "efficientnet": ("test_efficientnet", {}, 32),
    "ghostnet": ("ghostnet_050", {}, 32),
    "lcnet": ("lcnet_035", {}, 32),
    "rexnet": ("rexnet_100", {}, 32),
    "repvgg": ("repvgg_a0", {}, 32),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": [1, 1, 1, 1]}, 32),
    "dla": ("dla46_c", {}, 32),
    "convnext": ("test_convnext", {}, 32),
    "edgenext": ("edgenext_xx_small", {}, 32),
    "vit": ("test_vit", {}, 32),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4, "embed_dim": 24,
                                              "depths": [1, 1, 1, 1],
                                              "num_heads": [1, 2, 2, 4]}, 32),
    "levit": ("levit_128s", {"img_size": 32}, 32),
    "efficientvit": ("efficientvit_b0", {}, 32),
    "fastvit": ("fastvit_t8", {}, 32),
    "mobilevit": ("mobilevit_xxs", {}, 32),
    "mobilevitv2": ("mobilevitv2_050", {}, 32),
    "coatnet": ("test_coatnet", {"img_size": 64}, 64),
    "maxvit": ("test_maxvit", {"img_size": 64}, 64),
}
STAGE_TYPES = ("train", "prune", "channel_prune", "pas", "distill", "cluster", "qat", "ptq",
               "huffman", "export")
ONE_EPOCH = {"epochs": 1, "lr": 0.01, "schedule": "constant"}
CHAINS: dict[str, list[dict]] = {
    # the two chains, as a new user writes them
    "int8": [
        {"name": "train", "train": ONE_EPOCH},
        {"name": "prune", "prune": {"method": "oneshot", "sparsity": 0.8}},
        {"name": "qat", "qat": {"epochs": 1, "freeze_bn_after": None,
                                "freeze_observers_after": None}},
        {"name": "export", "export": {"formats": ["onnx"], "log_model": False}},
    ],
    "structured": [
        {"name": "train", "train": ONE_EPOCH},
        {"name": "channel_prune", "channel_prune": {"ratio": 0.5, "latency": None}},
        {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 4,
                                        "finetune": ONE_EPOCH}},
        {"name": "huffman", "huffman": {}},
        {"name": "export", "export": {"log_model": False}},
    ],
    # the remaining stage types: distill (teacher: the trained model), pas, ptq
    "more": [
        {"name": "train", "train": ONE_EPOCH},
        {"name": "distill", "distill": {"teacher": "stage:train", "train": ONE_EPOCH}},
        {"name": "pas", "pas": {"p": 0.5, "search": ONE_EPOCH, "latency": None}},
        {"name": "ptq", "ptq": {"calibration_batches": 1}},
        {"name": "export", "export": {"log_model": False}},
    ],
    # run only when "more" stopped before ptq (PaS failed): ptq must not hide behind PaS
    "ptq": [
        {"name": "ptq", "ptq": {"calibration_batches": 1}},
        {"name": "export", "export": {"log_model": False}},
    ],
    # --quick: the structural core only (a random-weight model narrowed, exported, run by
    # onnxruntime in a fresh process)
    "channel_prune-onnx": [
        {"name": "channel_prune", "channel_prune": {"ratio": 0.5, "latency": None}},
        {"name": "export", "export": {"formats": ["onnx"], "log_model": False}},
    ],
}
# --structural: not a pipeline; ``structural()`` runs the channel_prune algorithm alone
CHAINS["structural"] = [{"name": "channel_prune", "channel_prune": {"ratio": 0.5}}]
FULL_CHAINS = ("int8", "structured", "more")


def pipeline(family: str, chain: str, out: Path) -> dict:
    name, kwargs, size = FAMILIES[family]
    return {"name": f"{family}-{chain}", "seed": 0, "output_dir": str(out),
            "model": {"name": name, "kwargs": kwargs},
            "data": {"name": "digits", "image_size": size, "batch_size": 32, "limit_train": 256,
                     "limit_val": 64, "limit_test": 128},
            "tracking": {"enabled": False}, "stages": CHAINS[chain],
            # private: concurrent pipelines sharing one cache raced on its temporary files
            "cache": {"dir": str(out / ".cache")}}


def short(message: str, limit: int = 160) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_chain(family: str, chain: str, out: Path) -> dict[str, str]:
    """{stage type: "ok" | why not} for one pipeline, run in this process."""
    import compresspipe  # lazy: the parent process only schedules

    stages = CHAINS[chain]
    error = None
    try:
        compresspipe.run(pipeline(family, chain, out))
    except Exception as exc:  # noqa: BLE001 - the matrix records every failure as text
        error = f"{type(exc).__name__}: {exc}"
    done = stages_done(out)
    failed_at = None
    if error is not None:
        match = re.search(r"stages\.(\d+)", error)  # a validation problem names its stage
        failed_at = int(match.group(1)) if match and not done else None
    cells: dict[str, str] = {}
    for i, stage in enumerate(stages):
        kind = next(k for k in stage if k != "name")
        if stage["name"] in done:
            cells[kind] = "ok"
        elif error is not None and (failed_at is None or failed_at == i) and \
                not any(v != "ok" for v in cells.values()):
            cells[kind] = short(error)
        else:
            cells[kind] = "not reached"
    return cells


def structural(family: str) -> dict[str, str]:
    """The channel_prune algorithm alone, in this process: narrow the random-weight model to
    2x fewer MACs (L1, global), rebuild it from its spec (no pickle), load the weights strictly
    and compare outputs. A cell of this check reads "✓ (structural)"."""
    # lazy: only the child process that measures imports torch
    import torch
    from safetensors.torch import load, save

    from compresspipe.compress.structured.allocate import allocate, remove_units
    from compresspipe.compress.structured.cost import CostModel
    from compresspipe.compress.structured.graph import StructuredGraph
    from compresspipe.compress.structured.importance import make_importance, unit_scores
    from compresspipe.core.measure import count_macs
    from compresspipe.core.models import build_from_spec
    from compresspipe.core.structure import describe_structure

    name, kwargs, size = FAMILIES[family]
    spec = {"source": "timm", "name": name, "kwargs": {"num_classes": 10, "in_chans": 1,
                                                       **kwargs}}
    shape = (1, 1, size, size)
    try:
        torch.manual_seed(0)
        model = build_from_spec(spec).eval()
        graph = StructuredGraph(model, shape)
        cost = CostModel(graph)
        dense = count_macs(model, shape)["macs"]
        allocation = allocate(graph, cost, unit_scores(graph, make_importance("l1")), "macs",
                              float(cost.evaluate()["macs"]) * 0.5)
        remove_units(graph, allocation.removals)
        reduction = dense / count_macs(model, shape)["macs"]
        rebuilt = build_from_spec({**spec, "structure": describe_structure(
            model, build_from_spec(spec))})
        rebuilt.load_state_dict(load(save(model.state_dict())), strict=True)
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            diff = float((rebuilt.eval()(x) - model(x)).abs().max())
        if diff > 1e-4 or reduction < 1.9:
            return {"channel_prune": f"rebuilt model differs by {diff:.2g} or MACs only "
                    f"/{reduction:.2f}"}
        kept = len(graph.skipped)
        return {"channel_prune": f"ok (structural: MACs /{reduction:.2f}, {len(graph.groups)} "
                f"groups narrowed, {kept} kept)"}
    except Exception as exc:  # noqa: BLE001 - the matrix records every failure as text
        return {"channel_prune": short(f"{type(exc).__name__}: {exc}")}


def stages_done(out: Path) -> set[str]:
    """Names of the stages a pipeline's summary lists as completed (it is written after each)."""
    summary = out / "summary.json"
    return ({s["name"] for s in json.loads(summary.read_text())["stages"]}
            if summary.is_file() else set())


def timed_out(chain: str, done: set[str], timeout: float) -> dict[str, str]:
    """Cells of a pipeline stopped at the time limit: its completed stages are ok, the one it
    was running is over the limit, the rest not reached."""
    cells: dict[str, str] = {}
    for stage in CHAINS[chain]:
        kind = next(k for k in stage if k != "name")
        cells[kind] = ("ok" if stage["name"] in done else "not reached"
                       if any(v.startswith("over") for v in cells.values())
                       else f"over the {timeout:.0f} s limit of its {chain} pipeline")
    return cells


def run_isolated(family: str, chain: str, timeout: float) -> tuple[dict[str, str], float]:
    """run_chain in a fresh process (a crash or a hang costs one pipeline, not the matrix)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, __file__, "--one", family, chain, "--out", str(out)]
        if chain == "structural":
            cmd = [sys.executable, __file__, "--structural-one", family]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            cells = (json.loads(lines[-1]) if lines
                     else {next(k for k in CHAINS[chain][0] if k != "name"):
                           short(f"process failed: {proc.stderr.strip()[-300:]}")})
        except subprocess.TimeoutExpired:
            cells = timed_out(chain, stages_done(out), timeout)
    return cells, time.perf_counter() - started


def time_validate(family: str, chains: list[str], timeout: float) -> dict:
    """``compresspipe validate`` of each of this family's pipeline files in its own fresh
    process, as a user runs it (imports, model build, the structural dry runs of channel_prune
    and pas included): wall seconds per file, the slowest, and the verdict."""
    files = [c for c in chains if c in FULL_CHAINS]
    if not files:
        return {}
    seconds: dict[str, float] = {}
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for chain in files:  # JSON is YAML: the file a user would write, key for key
            path = Path(tmp) / f"{family}-{chain}.yaml"
            path.write_text(json.dumps(pipeline(family, chain, Path(tmp) / chain)))
            cmd = [sys.executable, "-m", "compresspipe", "validate", str(path)]
            started = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      env=env)
                if proc.returncode:
                    verdicts.append(short(proc.stderr.strip().replace(tmp + "/", "")))
            except subprocess.TimeoutExpired:
                verdicts.append(f"{chain}: over the {timeout:.0f} s limit")
            seconds[chain] = round(time.perf_counter() - started, 1)
    return {"seconds": max(seconds.values()), "per_file": seconds, "pipelines": files,
            "verdict": "; ".join(verdicts) or "valid", "load": round(os.getloadavg()[0], 1)}


def merge(cells: dict[str, dict[str, str]], new: dict[str, str]) -> None:
    """A stage type is ok when any chain completed it; otherwise the first reason stands."""
    for kind, value in new.items():
        if cells.get(kind) != "ok" and (value == "ok" or kind not in cells
                                        or cells[kind] == "not reached"):
            cells[kind] = value


def cell_text(value: str | None) -> str:
    if value is None:
        return "·"
    if value.startswith("ok (structural"):
        return "✓ᵃ"
    return "✓" if value == "ok" else value.replace("|", "/")


def table(result: dict) -> str:
    """The README's "Model support" table: family x stage type."""
    lines = ["| family (tiny variant) | px | " + " | ".join(STAGE_TYPES) + " | validate s |",
             "|---" * (len(STAGE_TYPES) + 3) + "|"]
    for family, entry in result["families"].items():
        cells = [cell_text(entry["stages"].get(k)) for k in STAGE_TYPES]
        check = entry.get("validate") or {}
        timed = (f"{check['seconds']:.0f}" + ("" if check["verdict"] == "valid"
                                               else f" ({cell_text(check['verdict'])})")
                 if check else "·")
        lines.append(f"| {family} (`{entry['model']}`) | {entry.get('image_size', '')} | "
                     + " | ".join(cells) + f" | {timed} |")
    missing = [f for f in FAMILIES if f not in result["families"]]
    lines += ["", "✓ the stage completed in a pipeline and the files it wrote loaded; ✓ᵃ the "
              "channel_prune algorithm alone (`--structural`): 2x fewer MACs, rebuilt from its "
              "spec without pickle, same outputs; · not measured yet. validate s: wall seconds of "
              "`compresspipe validate FILE` for the slowest of the family's three pipeline "
              "files, each in its own fresh process (imports included; 2-core machine). "
              "Pipelines run: "
              + ", ".join(sorted({c for e in result["families"].values()
                                  for c in e.get("chains", [])})) + ".", ""]
    measured = [f for f, e in result["families"].items()
                if set(FULL_CHAINS) <= set(e.get("chains", []))]
    for chain, done in chains_complete(result).items():
        if measured:
            lines.append(f"- {chain} chain ({' → '.join(s['name'] for s in CHAINS[chain])}) "
                         f"complete on {len(done)} of {len(measured)} families.")
    if missing:
        lines.append("Not measured yet: " + ", ".join(missing) + ".")
    return "\n".join(lines)


def chains_complete(result: dict) -> dict[str, list[str]]:
    """Per pipeline of the issue (int8, structured): the families where every stage completed."""
    out: dict[str, list[str]] = {}
    for chain in ("int8", "structured"):
        kinds = [next(k for k in s if k != "name") for s in CHAINS[chain]]
        out[chain] = [f for f, e in result["families"].items() if chain in e.get("chains", [])
                      and all(e["stages"].get(k) == "ok" for k in kinds)]
    return out


def fresh_entry(family: str, chains: list[str]) -> dict:
    name, kwargs, size = FAMILIES[family]
    return {"model": name, "kwargs": kwargs, "image_size": size, "stages": {}, "seconds": {},
            "chains": list(chains)}


def save_entry(family: str, entry: dict, key: str | None = None) -> None:
    """Merge one family (or one ``key`` of its entry) into the results file, read again just
    before writing (several runs with disjoint --families may share it)."""
    result = _read()
    if key is None:
        result["families"][family] = entry
    else:
        current = fresh_entry(family, [])
        known = result["families"].get(family, {})
        if any(known.get(k) != current[k] for k in ("model", "kwargs", "image_size")):
            result["families"][family] = current  # measured with other settings: stale
        result["families"][family][key] = entry
    result["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
                         f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    _write(result)


def render() -> None:
    """Write the summary and the table of the results file again (nothing measured)."""
    _write(_read())


def _read() -> dict:
    return json.loads(RESULT_FILE.read_text()) if RESULT_FILE.is_file() else {"families": {}}


def _write(result: dict) -> None:
    result["families"] = {f: result["families"][f] for f in FAMILIES if f in result["families"]}
    result["chains_complete"] = chains_complete(result)
    result["wall_s"] = round(sum(sum(e.get("seconds", {}).values())
                                 for e in result["families"].values()), 1)
    result["table"] = table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULT_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(RESULT_FILE)
    RESULT_FILE.with_suffix(".md").write_text(result["table"] + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--chains", nargs="*", default=list(FULL_CHAINS), choices=list(CHAINS))
    parser.add_argument("--quick", action="store_true",
                        help="channel_prune -> ONNX export only (the structural core)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pipeline")
    parser.add_argument("--structural", action="store_true",
                        help="only the channel_prune algorithm per family (minutes, no runner)")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="do not time `compresspipe validate` per family")
    parser.add_argument("--render", action="store_true",
                        help="only write the summary and the table again from the results")
    parser.add_argument("--validate-only", action="store_true",
                        help="only time `compresspipe validate` again for --families")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "CHAIN"), help=argparse.SUPPRESS)
    parser.add_argument("--structural-one", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_chain(*args.one, args.out)), flush=True)
        return
    if args.structural_one:
        print(json.dumps(structural(args.structural_one)), flush=True)
        return
    chains = (["structural"] if args.structural else ["channel_prune-onnx"] if args.quick
              else args.chains)
    if args.render:
        render()
        print(json.loads(RESULT_FILE.read_text())["table"])
        return
    if args.validate_only:
        for family in args.families:
            check = time_validate(family, list(FULL_CHAINS), args.timeout)
            print(f"{family:<13} validate     {check}", flush=True)
            save_entry(family, check, key="validate")
        return
    for family in args.families:
        entry = fresh_entry(family, chains)
        if args.validate:
            entry["validate"] = time_validate(family, chains, args.timeout)
            print(f"{family:<13} validate     {entry['validate']}", flush=True)
        for chain in chains:
            cells, seconds = run_isolated(family, chain, args.timeout)
            merge(entry["stages"], cells)
            entry["seconds"][chain] = round(seconds, 1)
            print(f"{family:<13} {chain:<12} {seconds:6.0f} s  {cells}", flush=True)
        if "more" in chains and entry["stages"].get("ptq") == "not reached":
            cells, seconds = run_isolated(family, "ptq", args.timeout)  # PaS stopped it
            merge(entry["stages"], cells)
            entry["seconds"]["ptq"] = round(seconds, 1)
            entry["chains"].append("ptq")
            print(f"{family:<13} {'ptq':<12} {seconds:6.0f} s  {cells}", flush=True)
        save_entry(family, entry)
    result = json.loads(RESULT_FILE.read_text())
    print("\n" + table(result))


if __name__ == "__main__":
    main()
