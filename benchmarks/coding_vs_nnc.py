"""The .cpz against NNCodec (MPEG NNC, ISO/IEC 15938-17, DeepCABAC) on the same trained models.

For each model (the quickstart's pruned resnet18 on digits, LeNet-300-100 on Fashion-MNIST) the
run's own ``huffman/model.cpz`` is one arm; NNCodec gets the same network through files (a
safetensors file in, a bitstream and a safetensors file of decoded tensors out; no pickle), run
by benchmarks/baselines/nnc_worker.py in the baseline venv (`make nnc-venv`: nncodec needs
numpy<2). NNCodec arms, every one decoded from its written bitstream:
  * uniform quantization of the pruned fp32 weights (the prune stage's output, BatchNorm folded
    as the .cpz folds it), a sweep of qp, with and without dependent quantization (DQ);
  * its codebook mode on our clustered weights (the cluster stage's output);
  * "+mask": DQ turns pruned zeros into +-step; the arm with the mask re-applied after decoding,
    charged the bytes our .cpz spends on positions (the mask as we code it).
Every arm's model is evaluated on the same validation and test split as the .cpz's decoded
model. "Equal or better" is decided on the validation split (top-1 >= and loss <= the .cpz);
the test split is only reported. Pruned zeros are counted against the cluster stage's masks.
Beside the verdict, the entropy floor (ORDER0, OVERFIT) of the clustered weights' positions and
values: what any coder of those symbols needs under the best entropy model measured.

    .venv/bin/python benchmarks/coding_vs_nnc.py [--reuse quickstart=RUN_DIR] [--only NAME]

Without --reuse a model's pipeline is run into --workdir first (1 thread: minutes). Saves
benchmarks/results/coding_vs_nnc.json and .md (results of models not run are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coding_codec import best_time  # noqa: E402
from coding_context import context_totals  # noqa: E402

import compresspipe  # noqa: E402
from compresspipe.compress.quant.batchnorm import STATISTICS, fold_statistics  # noqa: E402
from compresspipe.core.artifact import Artifact  # noqa: E402
from compresspipe.core.data import build_data  # noqa: E402
from compresspipe.core.measure import evaluate  # noqa: E402
from compresspipe.core.models import allow_named_factories  # noqa: E402
from compresspipe.formats import cpz  # noqa: E402
from compresspipe.formats.cpz_model import read_model_cpz  # noqa: E402
from compresspipe.pipeline.loader import load_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKER = ROOT / "benchmarks" / "baselines" / "nnc_worker.py"
NNC_PYTHON = ROOT / ".venv-nnc" / "bin" / "python"
TARGET = 0.8  # .cpz <= 0.8x NNCodec's smallest file at equal or better accuracy
# reported beside the target, never instead of it: "equal" up to a few validation images
NEAR = {"top1_tolerance": 0.1, "loss_tolerance": 0.01}
# name: (pipeline, overrides, pruned stage, clustered stage). LeNet with fewer epochs than the
# pipeline file (15 / 3 / 3) so that the benchmark fits a shared 2-core machine.
MODELS = {
    "quickstart": (ROOT / "pipelines" / "quickstart.yaml", [], "prune", "cluster"),
    "lenet_300_100_fashion_mnist": (
        ROOT / "pipelines" / "deep_compression_lenet.yaml",
        ["stages.0.train.epochs=8", "stages.1.prune.train.epochs=2",
         "stages.2.cluster.finetune.epochs=2"], "prune", "cluster"),
}
# The floor: bytes the clustered weights' positions and values (what NNCodec's codebook arms code
# too) need under the entropy models of benchmarks/coding_context.py, per tensor and summed:
# "order-0" the smaller of the order-0 entropies of gaps and of significance flags, plus the
# values'; "best measured" the smallest position and value figures of every model measured
# (plug-in estimates among them, so optimistic), less the gap given the output channel: it fits
# one histogram to ~70 gaps per channel, and its adaptive form costs more than order 0.
ORDER0 = (("positions_h0_escaped", "positions_h_flags_order0"), ("values_h0",))
OVERFIT = {"positions_h_gap_given_out_channel"}
CODEBOOK_QPS = (-40, -52)
# NNC step 2**(qp/4): 1/8 down to 1/128, every 2 qp (a step 1.41x finer each) so that NNCodec's
# smallest file at our accuracy is not missed between two coarse settings
QPS = tuple(range(-12, -29, -2))


def folded_state(artifact: Artifact) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model with BatchNorm statistics folded (as the huffman stage writes it) and the
    float tensors a coder must carry: everything but the folded statistics."""
    model = copy.deepcopy(artifact.model).eval()
    folded = fold_statistics(model)
    omitted = {f"{bn}.{s}" for bn in folded for s in STATISTICS}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if k not in omitted and v.is_floating_point()}
    return model, state


def zeros_kept(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """Pruned positions (mask 0) that are exactly zero in ``state``."""
    pruned = kept = 0
    for name, mask in masks.items():
        off = ~mask.bool()
        pruned += int(off.sum())
        kept += int((state[name][off] == 0).sum())
    return {"pruned": pruned, "zeros_kept": kept, "all_kept": kept == pruned}


def scores(model: torch.nn.Module, bundle) -> dict:
    val = evaluate(model, bundle.val_loader(purpose="the equal-accuracy decision"))
    test = evaluate(model, bundle.test_loader())
    return {"val_top1": val["top1"], "val_loss": val["loss"],
            "test_top1": test["top1"], "test_loss": test["loss"]}


def cpz_arm(run_dir: Path, bundle, masks: dict[str, torch.Tensor]) -> dict:
    """Our file as the pipeline wrote it, decoded from disk."""
    path = run_dir / "huffman" / "model.cpz"
    data = path.read_bytes()
    model = read_model_cpz(path).model
    stats = cpz.inspect_cpz(data)
    metrics = json.loads((run_dir / "huffman" / "metrics.json").read_text())
    return {"arm": ".cpz (pipeline's huffman stage)", "bytes": len(data), **scores(model, bundle),
            **zeros_kept(model.state_dict(), masks),
            "positions_bytes": sum(s["positions_bytes"] for s in stats),
            "encode_seconds": metrics.get("wall_time_s"),
            "decode_seconds": best_time(lambda: cpz.read_cpz(path), 3),
            "load_seconds": best_time(lambda: read_model_cpz(path), 3)}


def nnc_jobs(qps: tuple[int, ...] = QPS) -> list[dict]:
    """Uniform quantization of the pruned fp32 weights (qp x DQ) and of our clustered weights
    (NNCodec re-coding what we quantized: its best chance at our accuracy), and its codebook
    mode on our clustered weights."""
    jobs = [{"id": f"uniform_qp{-qp}_{'dq' if dq else 'nodq'}", "input": "pruned.safetensors",
             "qp": qp, "use_dq": dq, "codebook": False} for qp in qps for dq in (True, False)]
    jobs += [{"id": f"uniform_on_clustered_qp{-qp}_{'dq' if dq else 'nodq'}",
              "input": "clustered.safetensors", "qp": qp, "use_dq": dq, "codebook": False}
             for qp in qps if qp <= -20 for dq in (True, False)]
    # NNCodec's codebook mode first rounds values to the qp grid, then indexes the distinct
    # ones: fine steps (2**-10, 2**-13) keep our centroids, whose count sets the bytes
    jobs += [{"id": f"codebook_on_clustered_qp{-qp}", "input": "clustered.safetensors",
              "qp": qp, "use_dq": False, "codebook": True} for qp in CODEBOOK_QPS]
    return jobs


def run_worker(jobdir: Path, python: Path) -> dict:
    if not python.exists():
        raise SystemExit(f"error: {python} missing: the NNCodec baseline venv is built by "
                         "`make nnc-venv`")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    code = subprocess.call([str(python), str(WORKER), str(jobdir)], env=env)
    if code != 0:
        raise SystemExit(f"error: {WORKER.name} exited with status {code}")
    return json.loads((jobdir / "results.json").read_text())


def nnc_arms(pruned: Artifact, clustered: Artifact, bundle, masks, jobdir: Path,
             python: Path, mask_bytes: int, qps: tuple[int, ...]) -> tuple[list[dict], dict]:
    """Every NNCodec job decoded, loaded into the network and evaluated; DQ arms also +mask."""
    bases = {}
    for key, artifact in (("pruned", pruned), ("clustered", clustered)):
        model, state = folded_state(artifact)
        save_file(state, str(jobdir / f"{key}.safetensors"))
        bases[f"{key}.safetensors"] = model
    jobs = nnc_jobs(qps)
    (jobdir / "jobs.json").write_text(json.dumps(jobs))
    worker = run_worker(jobdir, python)
    arms = []
    for job, res in zip(jobs, worker["jobs"], strict=True):
        decoded = load_file(str(jobdir / f"{job['id']}.decoded.safetensors"))
        model = copy.deepcopy(bases[job["input"]])
        own = model.state_dict()
        model.load_state_dict({**own, **decoded})
        row = {"arm": f"NNCodec {job['id']}", **job, **res, **scores(model, bundle),
               **zeros_kept(model.state_dict(), masks), "needs_mask": False}
        arms.append(row)
        if not row["all_kept"]:
            with torch.no_grad():
                for name, mask in masks.items():
                    model.get_parameter(name).mul_(mask.to(torch.float32))
            arms.append({**row, "arm": row["arm"] + " +mask", "id": job["id"] + "+mask",
                         "bytes": res["bytes"] + mask_bytes, "mask_bytes": mask_bytes,
                         **scores(model, bundle), **zeros_kept(model.state_dict(), masks),
                         "needs_mask": True})
    return arms, worker["versions"]


def smallest(ours: dict, arms: list[dict], top1_tolerance: float = 0.0,
             loss_tolerance: float = 0.0) -> dict | None:
    """The smallest arm keeping every pruned zero whose validation top-1 is at least ours less
    ``top1_tolerance`` points and whose loss is at most ours times (1 + ``loss_tolerance``).
    A "+mask" arm is left out: its bytes add our positions section to NNCodec's file, a sum
    of two measured parts, not the size of one file that decodes to that model."""
    eligible = [a for a in arms if a["all_kept"] and not a.get("needs_mask")
                and a["val_top1"] >= ours["val_top1"] - top1_tolerance
                and a["val_loss"] <= ours["val_loss"] * (1 + loss_tolerance)]
    return min(eligible, key=lambda a: a["bytes"]) if eligible else None


def entropy_floor(clustered: Artifact) -> dict[str, float]:
    """Bytes of positions and values: order 0, and the best of every model measured."""
    totals = context_totals(clustered)
    models = [k for k in totals if ("_h" in k or "adaptive" in k) and k not in OVERFIT]
    best = [min(totals[k] for k in models if k.startswith(part))
            for part in ("positions", "values")]
    order0 = [min(totals[k] for k in keys) for keys in ORDER0]
    return {"order-0": sum(order0) / 8, "best measured": sum(best) / 8}


def compare(ours: dict, arms: list[dict], floor: dict[str, float]) -> dict:
    """The target's verdict: the smallest NNCodec arm at equal or better validation top-1 and
    loss, every zero kept; beside it (not the target) the same within NEAR's tolerances, and
    the entropy floor of our clustered weights against the bytes the target allows."""
    smallest_any = min(arms, key=lambda a: a["bytes"])
    out = {"smallest_nnc_any_accuracy": {"arm": smallest_any["arm"],
                                          "bytes": smallest_any["bytes"]}, "floor": floor}
    near = smallest(ours, arms, **NEAR)
    out["near"] = None if near is None else {
        **NEAR, "arm": near["arm"], "bytes": near["bytes"], "ratio": ours["bytes"] / near["bytes"],
        "target_bytes": TARGET * near["bytes"]}
    best = smallest(ours, arms)
    if best is None:
        out.update(best=None, ratio=None, target_met=False,
                   why="no NNCodec arm reached the .cpz's validation top-1 and loss with every "
                       "pruned zero kept")
        return out
    ratio = ours["bytes"] / best["bytes"]
    out.update(best=best["arm"], best_bytes=best["bytes"], ratio=ratio,
               target_met=ratio <= TARGET, target_bytes=TARGET * best["bytes"])
    return out


def measure_model(name: str, run_dir: Path, python: Path, qps: tuple[int, ...] = QPS) -> dict:
    pipeline_path, overrides, pruned_stage, clustered_stage = MODELS[name]
    pipeline = load_pipeline(pipeline_path, overrides, check_model=False)
    allow_named_factories(pipeline.raw)  # the run's artifacts name the pipeline's own factory
    torch.manual_seed(0)
    bundle = build_data(pipeline.config.data)
    pruned = Artifact.load(run_dir / pruned_stage)
    clustered = Artifact.load(run_dir / clustered_stage)
    masks = {k: v.bool() for k, v in clustered.masks.items()}
    ours = cpz_arm(run_dir, bundle, masks)
    with tempfile.TemporaryDirectory() as tmp:
        arms, versions = nnc_arms(pruned, clustered, bundle, masks, Path(tmp), python,
                                  ours["positions_bytes"], qps)
    return {"run_dir": str(run_dir), "pipeline": str(pipeline_path.relative_to(ROOT)),
            "overrides": overrides, "cpz": ours, "nnc": arms, "versions": versions,
            "comparison": compare(ours, arms, entropy_floor(clustered))}


def markdown(result: dict) -> str:
    lines = [f"# .cpz against NNCodec ({result['date']}, {result['machine']}; shared machine, "
             "times are indicative)", ""]
    for name, m in result["models"].items():
        c = m["comparison"]
        verdict = (f"ratio .cpz / NNCodec-best = **{c['ratio']:.3f}** ({c['best']}); target "
                   f"<= {TARGET}: **{'met' if c['target_met'] else 'missed'}**"
                   if c["ratio"] is not None else f"**missed**: {c['why']}")
        near = c.get("near")
        near_text = ("" if near is None else
                     f" Within {near['top1_tolerance']} pt top-1 and {near['loss_tolerance']:.0%} "
                     f"loss (not the target): {near['arm']}, {near['bytes']:,} B, ratio "
                     f"{near['ratio']:.3f}.")
        floor = c.get("floor")
        floor_text = "" if floor is None else (
            " Entropy floor of the clustered weights' positions and values alone: "
            + ", ".join(f"{k} {v:,.0f} B" for k, v in floor.items())
            + (f"; the target allows {c['target_bytes']:,.0f} B for the whole file"
               if c.get("target_bytes") is not None else
               f"; {TARGET}x the near-equal NNCodec file is {near['target_bytes']:,.0f} B"
               if near is not None and "target_bytes" in near else "") + ".")
        lines += [f"## {name}", "", f"`{m['pipeline']}` {' '.join(m['overrides'])}; NNCodec "
                  f"{m['versions']['nncodec']} (numpy {m['versions']['numpy']}). {verdict}."
                  f"{near_text}{floor_text}", "",
                  "| arm | bytes | val top-1 / loss | test top-1 / loss | pruned zeros kept | "
                  "encode s | decode s |", "|---|---:|---:|---:|---:|---:|---:|"]
        footnote = ("encode s: NNCodec's encoder alone; for the .cpz its huffman stage's wall "
                    "time, evaluations included (an upper bound). decode s: the .cpz reader "
                    "best of 3 calls, NNCodec one call in its own process. \"+mask\" rows: "
                    "NNCodec's file plus our positions section (two measured parts, not one "
                    "file), shown for reference and left out of the verdict.")
        for a in [m["cpz"], *m["nnc"]]:
            enc = a.get("encode_seconds")
            lines.append(
                f"| {a['arm']} | {a['bytes']:,} | {a['val_top1']:.2f} / {a['val_loss']:.4f} | "
                f"{a['test_top1']:.2f} / {a['test_loss']:.4f} | {a['zeros_kept']:,} of "
                f"{a['pruned']:,} | {'' if enc is None else f'{enc:.1f}'} | "
                f"{a['decode_seconds']:.2f} |")
        lines += ["", footnote, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="use an existing run of that model's pipeline")
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpz_vs_nnc")
    parser.add_argument("--nnc-python", type=Path, default=NNC_PYTHON)
    parser.add_argument("--qps", type=int, nargs="+", default=list(QPS), help="NNCodec qp sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    measured = {}
    for name in args.only or MODELS:
        run_dir = Path(reuse[name]) if name in reuse else args.workdir / name
        if name not in reuse:
            pipeline_path, overrides = MODELS[name][:2]
            compresspipe.run(pipeline_path, [f"output_dir={run_dir}", *overrides], resume=True)
        measured[name] = measure_model(name, run_dir, args.nnc_python, tuple(args.qps))
    out_json = RESULTS / "coding_vs_nnc.json"  # read last: other models' results are kept
    result = json.loads(out_json.read_text()) if out_json.exists() else {"models": {}}
    result["models"].update(measured)
    result.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, "
                  f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread")
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    (RESULTS / "coding_vs_nnc.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
