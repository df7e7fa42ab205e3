"""What the ``qat`` and ``ptq`` stages do with their int8 file: check, measure, attach.

Every number here is of the file onnxruntime runs: its accuracy on the test set, its bytes, the
ops onnxruntime really executes in int8, and its latency against the fp32 torch model measured
in the same process with the same thread count.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core import artifact_keys
from ...core.artifact import Artifact
from ...core.context import RunContext
from ...core.measure import evaluate, file_bytes, median_seconds
from .conv_taps import apply_window, recorded_windows
from .onnx_int8 import (
    INT8_FILE,
    OnnxModel,
    check_int8_masks,
    deploy_entry,
    export_onnx,
    fused_op_counts,
)
from .pt2e import example_batch

# onnxruntime kernels that compute in int8 (QDQ islands fused, or dynamic quantization)
INT8_KERNELS = {"QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "NhwcQLinearConv"}
FP32_WEIGHTED = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def op_summary(ops: dict[str, int]) -> dict[str, float]:
    """How many weighted ops onnxruntime runs in int8 and how many stayed fp32."""
    int8 = sum(n for op, n in ops.items() if op.startswith("QLinear") or op in INT8_KERNELS)
    fp32 = sum(n for op, n in ops.items() if op in FP32_WEIGHTED)
    return {"int8_kernels": float(int8), "fp32_weighted_ops": float(fp32)}


def trimmed_entries(path: Path, model: nn.Module) -> dict[str, int]:
    """{weight: entries the file does not store} for the convolutions whose padding-only taps
    were trimmed (see ``compresspipe.compress.quant.conv_taps``)."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read


    params = dict(model.state_dict())
    out = {}
    for name, window in recorded_windows(onnx.load(str(path), load_external_data=False)).items():
        if name in params:
            full = params[name]
            out[name] = full.numel() - int(apply_window(full.cpu().numpy(), window).size)
    return out


def latency_metrics(fp32_model: nn.Module, path: Path, data, repeats: int,
                    threads: int, trim_taps: bool = True) -> dict[str, float]:
    """Median latency (ms) at batch 1 and the loader's batch of the int8 file against two fp32
    baselines: the torch model (the pipeline's fp32 deployable) and the same model exported to
    ONNX and run by onnxruntime (same runtime, same tap trimming). All on ``threads`` CPU
    threads (few threads: stable numbers on a shared machine), the three timed one after
    another at each batch size."""

    fp32_model = fp32_model.cpu().eval()
    int8 = OnnxModel(path, threads=threads)
    batch = data.config.batch_size
    out: dict[str, float] = {"latency_threads": float(threads)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_ort = OnnxModel(export_onnx(fp32_model, example_batch(data.test),
                                             Path(tmp) / "fp32.onnx", trim_taps=trim_taps),
                                 threads=threads)
        for label, n in (("b1", 1), (f"b{batch}", batch)):
            # timing inputs only (no decision): the test set, for batches of the full size
            x = example_batch(data.test, n)
            with torch.no_grad():
                fp32 = 1e3 * median_seconds(lambda x=x: fp32_model(x), repeats)
            ort32 = 1e3 * median_seconds(lambda x=x: fp32_ort(x), repeats)
            q = 1e3 * median_seconds(lambda x=x: int8(x), repeats)
            out.update({f"latency_fp32_{label}_ms": fp32, f"latency_int8_{label}_ms": q,
                        f"latency_fp32_onnxruntime_{label}_ms": ort32,
                        f"latency_int8_over_fp32_{label}": q / fp32,
                        f"latency_int8_over_fp32_onnxruntime_{label}": q / ort32})
    finally:
        torch.set_num_threads(previous)
    return out


def finish_int8(artifact: Artifact, ctx: RunContext, path: Path, fp32_model: nn.Module,
                info: dict[str, Any], latency_repeats: int, latency_threads: int,
                trim_taps: bool = True) -> dict[str, float]:
    """Check the masks in ``path``, measure it, log, and make it the artifact's deployed form."""
    import onnxruntime  # lazy: onnxruntime loads only where an ONNX model runs

    absent = check_int8_masks(path, artifact.masks, ctx.name)
    checked = len(artifact.masks) - len(absent)
    int8 = OnnxModel(path)
    test = ctx.data.test_loader()  # reported numbers, beside the runner's test_top1
    fp32 = evaluate(fp32_model.to(ctx.device), test, ctx.device)
    q = evaluate(int8, test, "cpu")
    ops = fused_op_counts(path)
    trimmed = trimmed_entries(path, fp32_model)
    metrics = {
        "fp32_top1": fp32["top1"], "int8_top1": q["top1"], "int8_top1_drop": fp32["top1"] - q["top1"],
        "fp32_loss": fp32["loss"], "int8_loss": q["loss"],
        "int8_bytes": float(file_bytes([path])), "int8_masked_tensors_checked": float(checked),
        "trimmed_conv_weights": float(len(trimmed)),
        "trimmed_weight_entries": float(sum(trimmed.values())),
        **op_summary(ops),
    }
    if latency_repeats > 0:
        metrics.update(latency_metrics(fp32_model, path, ctx.data, latency_repeats,
                                       latency_threads, trim_taps))
    ctx.log_metrics(metrics, None)

    artifact.outputs[INT8_FILE] = lambda dest, src=path: shutil.copyfile(src, dest)
    artifact.deploy = deploy_entry()
    artifact_keys.set_int8(artifact, {
        **info, "file": INT8_FILE, "weights": "int8 symmetric (zero point 0), range [-127, 127]",
        "onnxruntime_ops": ops, "masked_tensors_checked": checked,
        "masked_tensors_not_in_file": absent, "trimmed_weight_entries": trimmed,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    })
    _print(ctx.name, metrics)
    return metrics


def _print(stage: str, m: dict[str, float]) -> None:
    text = (f"[{stage}] fp32 top1 {m['fp32_top1']:.2f}% -> int8 top1 {m['int8_top1']:.2f}%, "
            f"{m['int8_bytes']:,.0f} bytes, {m['int8_kernels']:.0f} int8 kernels, "
            f"{m['fp32_weighted_ops']:.0f} fp32 weighted ops")
    if m["trimmed_conv_weights"]:
        text += (f", {m['trimmed_weight_entries']:,.0f} weights of {m['trimmed_conv_weights']:.0f} "
                 "convolutions trimmed (they only read padding)")
    if "latency_int8_over_fp32_b1" in m:
        text += f", int8/fp32 latency b1 {m['latency_int8_over_fp32_b1']:.2f}x"
    print(text, flush=True)
    slower = [(k.rsplit("_", 1)[-1], v) for k, v in m.items()
              if k.startswith("latency_int8_over_fp32_onnxruntime_") and v > 1.0]
    if slower:
        where = ", ".join(f"{b} {v:.2f}x" for b, v in slower)
        print(f"[{stage}] note: the int8 file is not faster than the same model in fp32 "
              f"onnxruntime ({where}); for this model an fp32 ONNX export (export stage) may be "
              "the faster deployment", flush=True)
